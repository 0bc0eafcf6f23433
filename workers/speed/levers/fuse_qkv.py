"""``fuse_qkv``: one GEMM for Q/K/V (and one for the text stream's added Q/K/V) per attention; the unfused
projections are dropped so their memory is freed."""

from __future__ import annotations

from typing import Any

from fluxfleet.presets import Preset
from workers.speed.levers import unwrap
from workers.speed.report import SpeedReport


def fuse_qkv(transformer: Any) -> int:
    """Fuse, then drop the unfused projections (diffusers keeps them for ``unfuse``); returns the count."""
    model = unwrap(transformer)
    model.fuse_qkv_projections()
    fused = 0
    for module in model.modules():
        if getattr(module, "fused_projections", False):
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if name in module._modules and (
                    (name.startswith("to_") and "to_qkv" in module._modules)
                    or (name.startswith("add_") and "to_added_qkv" in module._modules)
                ):
                    del module._modules[name]
            fused += 1
    return fused


def apply(pipe: Any, preset: Preset, device: str, report: SpeedReport) -> None:
    report.applied.append(f"fused_qkv x{fuse_qkv(pipe.transformer)}")
