"""A Celery app for Celery's own tools, built from the ``FLUXFLEET_*`` settings.

``celery -A fluxfleet inspect ping`` (Celery finds this module as ``fluxfleet.celery``), likewise
``inspect active``, ``inspect stats``, ``events`` and Flower (``celery -A fluxfleet flower``). The app
has the broker and serializer settings of the fleet and nothing of a worker: no task, no torch, and the
only queue it would consume is ``fluxfleet.default``, which nothing publishes to, so a stray
``celery -A fluxfleet worker`` takes no job's work. Workers run with ``fluxfleet worker``.

The app is built on first access of ``app`` (or ``celery``, the other name Celery looks for), so
importing this module reads no environment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

_app: Celery | None = None


def build_app() -> Celery:
    """The fleet's Celery app from the current environment (broker URL, password, TLS, timeouts)."""
    from fluxfleet.celery_config import make_celery
    from fluxfleet.settings import Settings

    return make_celery(Settings(), name="fluxfleet")


def __getattr__(name: str) -> Any:
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = build_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
