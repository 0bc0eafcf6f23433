"""Fault injection for the reliability tests; does nothing unless ``FLUXFLEET_TEST_FAULTS`` is set.

The variable holds comma-separated ``name=value`` pairs, read once in the pool child:

- ``step_delay=S``   sleep S seconds at every denoising step, inside the diffusers step callback
                     (a slow GPU: cancels and time limits interrupt it through the same callback)
- ``slow_on=WORD``   apply ``step_delay`` only to batches holding a prompt that contains WORD
- ``crash_on=WORD``  the pool child SIGKILLs itself when a batch holds a prompt containing WORD
                     (a segfault, or the kernel's OOM killer)
- ``oom_over=N``     raise ``torch.OutOfMemoryError`` for every batch of more than N items
- ``oom_on=WORD``    raise ``torch.OutOfMemoryError`` for every batch holding a prompt containing WORD
- ``load_fail=1``    fail in the pool child while loading the pipeline
- ``hang_on=WORD``   never return, ignoring the soft time limit, for a batch holding a prompt with WORD
                     (a stuck CUDA call: only the hard time limit ends it)
- ``fail_on=WORD``   raise a RuntimeError for a batch holding a prompt containing WORD (a library bug)

Production never sets it; a worker logs a warning when it does.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fluxfleet.schema import Item

logger = logging.getLogger(__name__)

ENV = "FLUXFLEET_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    step_delay: float = 0.0
    slow_on: str = ""
    crash_on: str = ""
    oom_over: int = 0
    oom_on: str = ""
    load_fail: bool = False
    hang_on: str = ""
    fail_on: str = ""

    @property
    def active(self) -> bool:
        return self != Faults()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Faults:
        raw = (environ if environ is not None else os.environ).get(ENV, "").strip()
        if not raw:
            return cls()
        values: dict[str, Any] = {}
        for part in raw.split(","):
            name, _, value = part.strip().partition("=")
            if name in ("step_delay",):
                values[name] = float(value)
            elif name == "oom_over":
                values[name] = int(value)
            elif name == "load_fail":
                values[name] = value not in ("", "0", "false")
            elif name in ("slow_on", "crash_on", "oom_on", "hang_on", "fail_on"):
                values[name] = value
            else:
                raise ValueError(f"{ENV}: unknown fault '{name}'")
        return cls(**values)


def _holds(batch: list[Item], word: str) -> bool:
    return bool(word) and any(word in item.prompt for item in batch)


def out_of_memory(batch_size: int) -> BaseException:
    import torch

    return torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate 2.00 GiB (injected fault, batch of {batch_size})"
    )


def _hang() -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    logger.error("injected hang: ignoring the soft time limit")
    while True:
        try:
            time.sleep(1)
        except SoftTimeLimitExceeded:
            continue


def with_faults(generate: Callable[..., list[Any]], faults: Faults) -> Callable[..., list[Any]]:
    """``generate`` with the configured faults injected; ``generate`` itself when none are."""
    if not faults.active:
        return generate
    logger.warning("%s is set: injecting faults %s (tests only)", ENV, faults)

    def faulty(batch: list[Item], should_stop: Callable[[], bool]) -> list[Any]:
        if _holds(batch, faults.crash_on):
            logger.error("injected crash: SIGKILL to the pool child")
            os.kill(os.getpid(), signal.SIGKILL)
        if _holds(batch, faults.hang_on):
            _hang()
        if _holds(batch, faults.fail_on):
            raise RuntimeError("injected failure (FLUXFLEET_TEST_FAULTS fail_on)")
        if (faults.oom_over and len(batch) > faults.oom_over) or _holds(batch, faults.oom_on):
            raise out_of_memory(len(batch))
        if faults.step_delay and (not faults.slow_on or _holds(batch, faults.slow_on)):

            def slow_should_stop() -> bool:
                time.sleep(faults.step_delay)
                return should_stop()

            return generate(batch, slow_should_stop)
        return generate(batch, should_stop)

    return faulty
