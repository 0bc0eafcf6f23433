"""Inductor's settings for what ``[compile]`` compiles: ``coordinate_descent_tuning``, ``multi_kernel`` and the
bounded ``recompile_limit``. Process-wide: a worker serves one preset."""

from __future__ import annotations

from typing import Any

from fluxfleet.presets import Preset
from workers.speed.report import SpeedReport


def apply(pipe: Any, preset: Preset, device: str, report: SpeedReport) -> None:
    import torch
    import torch._inductor.config

    spec = preset.speed
    if spec.coordinate_descent_tuning:
        # Tunes block sizes of inductor's own triton kernels (activation quantization, norms, RoPE), one
        # direction at a time: torchao's all-directions variant made the first compile ~280 s.
        torch._inductor.config.coordinate_descent_tuning = True
        report.applied.append("coordinate_descent_tuning")
    if spec.multi_kernel:
        # Inductor reduces rows wider than 1024 in a loop: the amax pass and the scale-and-cast pass of a row-wise
        # fp8 quantization each read the activation (H100 profile: ~0.27 ms per single block for proj_out's
        # 4608x15360 input). Multi-kernel also emits the one-pass variant for rows up to 16K and keeps the faster.
        torch._inductor.config.triton.multi_kernel = 1
        report.applied.append("multi_kernel")
    # Bounded recompiles: a new shape recompiles (dynamically, once dynamo sees sizes change) until the limit,
    # then that block runs eagerly instead of compiling forever.
    torch._dynamo.config.cache_size_limit = spec.recompile_limit
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = spec.recompile_limit
