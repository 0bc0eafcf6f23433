"""No quantization: the components load in the preset's dtype (the bf16 reference)."""

from __future__ import annotations

from typing import Any

from fluxfleet.presets import Preset


def pipeline_kwargs(preset: Preset, dtype: Any, source: str) -> dict[str, Any]:
    return {}
