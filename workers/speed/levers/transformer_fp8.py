"""``transformer_fp8``: float8 for the transformer's linear layers: torchao row-wise dynamic activations (fp8
GEMMs) or weight-only (half the memory, bf16 GEMMs); or ``dynamic_row_plain``, the row-wise dynamic scheme
with plain tensors (``workers.speed.fp8_linear``), whose GELU-fed linears can also take the GELU into their
input quantization (``fp8_gelu_fusion``, ``workers.speed.fp8_fusion``)."""

from __future__ import annotations

from typing import Any

from fluxfleet.levers import TORCHAO_FP8
from fluxfleet.presets import Preset
from workers.speed.levers import unwrap
from workers.speed.report import SpeedReport


def quantize_with_torchao(module: Any, scheme: str) -> None:
    from torchao.quantization import quantize_

    from workers.speed.fp8_linear import fp8_friendly
    from workers.speed.torchao_float8 import float8_config

    quantize_(unwrap(module), float8_config(scheme), filter_fn=lambda m, _fqn: fp8_friendly(m))


def free_cached(device: str) -> None:
    """Hand the converted-away bf16 weights' memory back before anything else allocates."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def apply(pipe: Any, preset: Preset, device: str, report: SpeedReport) -> None:
    spec = preset.speed
    transformer = unwrap(pipe.transformer)
    if spec.transformer_fp8 in TORCHAO_FP8:
        quantize_with_torchao(transformer, spec.transformer_fp8)
    else:  # dynamic_row_plain
        from workers.speed.fp8_linear import swap_to_fp8

        swap_to_fp8(transformer)
        if spec.fp8_gelu_fusion:
            from workers.speed.fp8_fusion import fuse_gelu_into_fp8

            report.applied.append(f"fp8_gelu_fusion x{fuse_gelu_into_fp8(transformer)}")
    report.applied.append(f"transformer_fp8={spec.transformer_fp8}")
    free_cached(device)
