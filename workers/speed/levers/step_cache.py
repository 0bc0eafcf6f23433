"""``step_cache``: the transformer's forward routed through ``workers.speed.step_cache.StepCache`` on every preset,
so any item may ask for a cache policy; a ``cache = none`` item runs the forward exactly as loaded. Installed
before the CUDA graph wraps the forward, which then keeps one graph per mode."""

from __future__ import annotations

from typing import Any

from fluxfleet.presets import Preset
from workers.speed.levers import unwrap
from workers.speed.report import SpeedReport
from workers.speed.step_cache import install


def apply(pipe: Any, preset: Preset, device: str, report: SpeedReport) -> None:
    install(unwrap(pipe.transformer))
