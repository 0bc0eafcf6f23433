"""One-pass Triton kernel: GELU (tanh), optional concatenation and row-wise fp8 quantization. CUDA only.

Inductor quantizes a row wider than it keeps in registers in two passes, an amax pass and a scale-and-cast
pass, each reading the input and recomputing the GELU. For the single blocks' ``proj_out`` input
(``cat([attention output, gelu(proj_mlp output)])``, 4608 x 15360 at 1024x1024) that took 246 us a call
on an H100 against 84 us for this kernel, which reads each row once into registers and writes its fp8 bytes
once (``benchmarks/fp8_quant_kernel.py``; benchmarks/results/SUMMARY.md). Registered as a ``torch.library.triton_op`` so
``torch.compile`` keeps it inside a full graph and inductor schedules the kernel itself.

Imported only on CUDA hosts (triton is not part of the CPU torch build); ``workers.speed.fp8_linear`` holds the
reference arithmetic every device can run.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from workers.speed.fp8_format import FP8, FP8_MAX, MIN_SCALE


@triton.jit
def gelu_cat_rowwise_fp8_kernel(
    plain_ptr,
    gelu_ptr,
    out_ptr,
    scale_ptr,
    PLAIN: tl.constexpr,
    GELU: tl.constexpr,
    PLAIN_BLOCK: tl.constexpr,
    GELU_BLOCK: tl.constexpr,
    FP8_MAX_: tl.constexpr,
    MIN_SCALE_: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g_offsets = tl.arange(0, GELU_BLOCK)
    m = tl.load(gelu_ptr + row * GELU + g_offsets, mask=g_offsets < GELU, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (m + 0.044715 * m * m * m)
    g = m * tl.sigmoid(2.0 * inner)  # 0.5 * m * (1 + tanh(inner)), as 1 + tanh(z) = 2 sigmoid(2z)
    amax = tl.max(tl.abs(g), axis=0)
    out_row = out_ptr + row * (PLAIN + GELU)
    if PLAIN > 0:
        p_offsets = tl.arange(0, PLAIN_BLOCK)
        p = tl.load(plain_ptr + row * PLAIN + p_offsets, mask=p_offsets < PLAIN, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.maximum(amax, tl.max(tl.abs(p), axis=0)) / FP8_MAX_, MIN_SCALE_)
        tl.store(
            out_row + p_offsets, tl.clamp(p / scale, -FP8_MAX_, FP8_MAX_).to(tl.float8e4nv), mask=p_offsets < PLAIN
        )
    else:
        scale = tl.maximum(amax / FP8_MAX_, MIN_SCALE_)
    q = tl.clamp(g / scale, -FP8_MAX_, FP8_MAX_).to(tl.float8e4nv)
    tl.store(out_row + PLAIN + g_offsets, q, mask=g_offsets < GELU)
    tl.store(scale_ptr + row, scale)


def launch_gelu_cat_rowwise_fp8(
    kernel: Any, plain: torch.Tensor, pre_gelu: torch.Tensor, num_warps: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the outputs and launch ``kernel`` (the jit function, or it wrapped for ``torch.compile``)."""
    rows, plain_width = plain.shape
    gelu_width = pre_gelu.shape[1]
    out = torch.empty((rows, plain_width + gelu_width), device=pre_gelu.device, dtype=FP8)
    scale = torch.empty((rows, 1), device=pre_gelu.device, dtype=torch.float32)
    kernel[(rows,)](
        plain,
        pre_gelu,
        out,
        scale,
        plain_width,
        gelu_width,
        max(16, triton.next_power_of_2(plain_width)),
        triton.next_power_of_2(gelu_width),
        FP8_MAX,
        MIN_SCALE,
        num_warps=num_warps,
    )
    return out, scale


@triton_op("fluxfleet::gelu_cat_rowwise_fp8", mutates_args=())
def gelu_cat_rowwise_fp8(plain: torch.Tensor, pre_gelu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 rows of ``cat([plain, gelu_tanh(pre_gelu)], -1)`` (both 2-D, same rows; ``plain`` may be 0 wide)
    and their float32 scales, shape [rows, 1]. 8 warps: the fastest of 8/16/32 for 15360-wide rows on an H100."""
    return launch_gelu_cat_rowwise_fp8(wrap_triton(gelu_cat_rowwise_fp8_kernel), plain, pre_gelu)
