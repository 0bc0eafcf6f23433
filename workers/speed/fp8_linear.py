"""fp8 row-wise dynamic linear layers on ``torch._scaled_mm``, with plain tensors.

The same arithmetic as torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())``: weights in
float8 e4m3 with one scale per output row, each input row scaled by its own absolute maximum at run time,
one fp8 GEMM with the bias fused. What differs is the representation: the weight and its scale are plain
buffers, not a tensor subclass. A compiled block traces as ordinary aten ops (nothing to trace through at
each worker start), and the layer also runs on a CPU, emulated, so the tests check its numerics. Measured
on an H100: as fast as torchao's in the same run (benchmarks/results/SUMMARY.md). Tests: ``tests/test_backends.py``.

``Fp8WeightOnlyLinear`` is the weight-only counterpart for T5: the same per-row fp8 weights, computed in
bf16, so a preset needs no torchao (whose import costs seconds of every worker start).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from workers.speed.fp8_format import FP8, FP8_MAX, MIN_SCALE

__all__ = ["FP8", "FP8_MAX", "MIN_SCALE", "Fp8RowwiseLinear", "Fp8WeightOnlyLinear", "swap_to_fp8"]


def rowwise_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 rows of a 2-D tensor and their float32 scales (shape [rows, 1]): x ~ fp8 * scale."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def gelu_cat_rowwise_quantize(plain: torch.Tensor, pre_gelu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rowwise_quantize(cat([plain, gelu_tanh(pre_gelu)], -1))`` with the GELU kept in float32, as the CUDA
    kernel of ``workers.speed.fp8_kernels`` computes it: the reference for every other device."""
    gelu = torch.nn.functional.gelu(pre_gelu.float(), approximate="tanh")
    return rowwise_quantize(torch.cat([plain.float(), gelu], dim=-1))


def emulated_scaled_mm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The fp8 GEMM's arithmetic in float32 (products of two e4m3 values are exact there), for devices
    whose ``_scaled_mm`` lacks row-wise scales (the CPU in torch 2.11) and as the tests' reference."""
    out = (x_fp8.float() @ weight.float().t()) * x_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Fp8RowwiseLinear(nn.Module):
    """A drop-in replacement of an ``nn.Linear`` whose GEMM runs in fp8 (H100/H200, or the CPU for tests)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight, scale = rowwise_quantize(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in), row-major: its transpose is what _scaled_mm wants
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = rowwise_quantize(x.reshape(-1, self.in_features))
        return self._gemm(x_fp8, x_scale, x.shape[:-1])

    def forward_gelu_cat(self, plain: torch.Tensor | None, pre_gelu: torch.Tensor) -> torch.Tensor:
        """``self(cat([plain, gelu_tanh(pre_gelu)], -1))`` with the GELU, the concatenation and the input's
        quantization in one pass over memory on CUDA (``workers.speed.fp8_kernels``)."""
        lead = pre_gelu.shape[:-1]
        pre_gelu = pre_gelu.reshape(-1, pre_gelu.shape[-1])
        plain = pre_gelu.new_empty(pre_gelu.shape[0], 0) if plain is None else plain.reshape(pre_gelu.shape[0], -1)
        if pre_gelu.device.type == "cuda":
            from workers.speed.fp8_kernels import gelu_cat_rowwise_fp8

            x_fp8, x_scale = gelu_cat_rowwise_fp8(plain.contiguous(), pre_gelu.contiguous())
        else:
            x_fp8, x_scale = gelu_cat_rowwise_quantize(plain, pre_gelu)
        return self._gemm(x_fp8, x_scale, lead)

    def _gemm(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        if x_fp8.device.type == "cuda":
            out = torch._scaled_mm(
                x_fp8,
                self.weight.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale,
                bias=self.bias,
                out_dtype=self.out_dtype,
                use_fast_accum=True,  # as torchao's default for this scheme
            )
        else:
            out = emulated_scaled_mm(x_fp8, x_scale, self.weight, self.weight_scale, self.bias, self.out_dtype)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 row-wise"


class Fp8WeightOnlyLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored in float8 e4m3 with one float32 scale per output row, and
    computed with in its original dtype: half the memory of bf16, for layers that run once per prompt (T5)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight, scale = rowwise_quantize(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale)  # (out, 1)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.compute_dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        # A property, not a buffer: transformers' T5 reads ``wo.weight.dtype`` to choose its activations' dtype,
        # and must see the dtype the layer computes in, not float8.
        return (self.weight_fp8.float() * self.weight_scale).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.compute_dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 weight-only"


def fp8_friendly(module: Any) -> bool:
    """Linear layers whose shapes the fp8 GEMM accepts (both dimensions multiples of 16)."""
    return (
        isinstance(module, nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
        and module.weight.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def any_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear)


def swap_to_fp8(
    model: nn.Module,
    accept: Callable[[Any], bool] = fp8_friendly,
    layer: Callable[[nn.Linear], nn.Module] = Fp8RowwiseLinear,
) -> int:
    """Replace every accepted ``nn.Linear`` under ``model`` in place by ``layer(linear)``; returns how many.

    Each bf16 weight is dropped as soon as its fp8 copy exists, so memory never holds both models.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if accept(child):
                setattr(parent, name, layer(child))
                swapped += 1
    return swapped
