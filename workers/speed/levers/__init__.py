"""The ``[speed]`` levers, applied in the order ``fluxfleet.levers.LEVERS`` declares them.

Lever NAME is ``workers/speed/levers/NAME.py``: ``apply(pipe, preset, device, report)`` changes the placed
pipeline before anything is compiled or called (compilation traces the modules as the levers left them).
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from fluxfleet.levers import active_levers
from fluxfleet.presets import Preset
from workers.speed.report import SpeedReport

logger = logging.getLogger(__name__)


def unwrap(module: Any) -> Any:
    """The module itself where ``torch.compile`` wrapped it."""
    return getattr(module, "_orig_mod", module)


def apply_levers(pipe: Any, preset: Preset, device: str) -> SpeedReport:
    """Apply the preset's active levers; a no-op for presets without any."""
    report = SpeedReport()
    started = time.perf_counter()
    for lever in active_levers(preset):
        importlib.import_module(f"{__name__}.{lever.name}").apply(pipe, preset, device, report)
    report.quantize_s = time.perf_counter() - started
    return report
