"""``vae_tiling`` (decode in tiles: a lower peak, slight seams) and ``compile_vae_decoder``."""

from __future__ import annotations

from typing import Any

from fluxfleet.presets import Preset
from workers.speed.report import SpeedReport


def apply(pipe: Any, preset: Preset, device: str, report: SpeedReport) -> None:
    if preset.speed.vae_tiling:
        pipe.vae.enable_tiling()
        report.applied.append("vae_tiling")
    if preset.speed.compile_vae_decoder:
        import torch

        pipe.vae.decoder = torch.compile(pipe.vae.decoder, fullgraph=False)
        report.applied.append("vae_decoder_compiled")
