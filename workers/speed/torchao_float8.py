"""torchao's float8 configs, for the ``torchao`` backend and the ``[speed]`` fp8 levers alike.

Every config is built with ``set_inductor_config=False`` (a field of each torchao config; diffusers'
TorchAoConfig passes the object through to ``quantize_``). With the default True, torchao turns on inductor's
coordinate-descent tuning with all directions when it quantizes, and the regional compile of
torchao-fp8-dynamic-row took 260 s to warm up on an H100 (benchmarks/results/SUMMARY.md). The compile settings stay
the preset's ``[compile]``.
"""

from __future__ import annotations

from typing import Any

SCHEMES = ("dynamic_row", "weight_only")
"""The fp8 schemes torchao runs: row-wise dynamic activations with fp8 GEMMs, or fp8 weights only."""


def float8_config(scheme: str) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    if scheme == "dynamic_row":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if scheme == "weight_only":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"unknown fp8 scheme '{scheme}'; known: {SCHEMES}")
