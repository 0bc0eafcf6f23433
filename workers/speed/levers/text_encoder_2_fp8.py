"""``text_encoder_2_fp8``: float8 for T5's linear layers: torchao row-wise dynamic or weight-only, or
``weight_only_plain``, per-row fp8 weights computed in bf16 without torchao (both weight-only schemes halve
T5's memory)."""

from __future__ import annotations

from typing import Any

from fluxfleet.levers import TORCHAO_FP8
from fluxfleet.presets import Preset
from workers.speed.levers.transformer_fp8 import free_cached, quantize_with_torchao
from workers.speed.report import SpeedReport


def apply(pipe: Any, preset: Preset, device: str, report: SpeedReport) -> None:
    encoder = getattr(pipe, "text_encoder_2", None)
    if encoder is None:
        return
    scheme = preset.speed.text_encoder_2_fp8
    if scheme in TORCHAO_FP8:
        quantize_with_torchao(encoder, scheme)
    else:  # weight_only_plain
        from workers.speed.fp8_linear import Fp8WeightOnlyLinear, any_linear, swap_to_fp8

        swap_to_fp8(encoder, any_linear, Fp8WeightOnlyLinear)
    report.applied.append(f"text_encoder_2_fp8={scheme}")
    free_cached(device)
