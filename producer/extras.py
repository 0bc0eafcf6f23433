"""The optional extras a command needs, read from the installed package's own declaration.

A machine that only submits jobs installs ``fluxfleet`` without extras; a command that needs one
(``compare``, ``report``, ``worker``, ...) ends with one sentence naming the pip command instead of an
``ImportError`` traceback. What each extra holds is written once, in pyproject.toml; this module reads
it back from the package metadata, so the two cannot disagree.

Usage::

    @app.command()
    @needs_extra("report")
    def compare(...) -> None: ...
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

DISTRIBUTION = "fluxfleet"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def extra_requirements(extra: str) -> list[str] | None:
    """Distribution names the ``extra`` declares; None when fluxfleet's metadata is not installed."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    names = []
    for requirement in requires:
        requirement_extra = _EXTRA.search(requirement)
        name = _NAME.match(requirement)
        if requirement_extra and requirement_extra.group(1) == extra and name:
            names.append(name.group(0))
    return names


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing_extra(extra: str, command: str) -> str | None:
    """The sentence to print when ``command`` cannot run for lack of ``extra``; None when it can."""
    names = extra_requirements(extra)
    if names is None:  # running from a source tree that was never installed: nothing to compare with
        return None
    missing = [n for n in names if not _installed(n)]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"`fluxfleet {command}` needs the '{extra}' extra ({', '.join(missing)} {verb} not installed): "
        f"run `pip install 'fluxfleet[{extra}]'`"
    )


def needs_extra(extra: str) -> Callable[[F], F]:
    """Decorate a command so it ends with the install command, exit code 1, when ``extra`` is missing.

    The check runs when the command runs, never at import, so ``fluxfleet --help`` lists every command.
    """

    def decorate(command: F) -> F:
        name = command.__name__.replace("_", "-")

        @functools.wraps(command)
        def checked(*args: Any, **kwargs: Any) -> Any:
            sentence = missing_extra(extra, name)
            if sentence is not None:
                import typer
                from rich.console import Console
                from rich.markup import escape

                # escape: `fluxfleet[report]` would otherwise read as a markup tag and vanish
                Console(stderr=True).print(f"[red]error:[/red] {escape(sentence)}", highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            return command(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate
