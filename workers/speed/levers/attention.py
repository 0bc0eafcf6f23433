"""``attention_backend``: the diffusers attention dispatcher backend, e.g. ``_native_cudnn`` (cuDNN SDPA,
about half the attention time of the default FlashAttention-2 path on an H100 at 1024x1024)."""

from __future__ import annotations

from typing import Any

from fluxfleet.presets import Preset
from workers.speed.levers import unwrap
from workers.speed.report import SpeedReport


def apply(pipe: Any, preset: Preset, device: str, report: SpeedReport) -> None:
    unwrap(pipe.transformer).set_attention_backend(preset.speed.attention_backend)
    report.applied.append(f"attention={preset.speed.attention_backend}")
