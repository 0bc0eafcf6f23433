"""Fold each GELU that feeds an fp8 linear of the FLUX transformer into that linear's input quantization.

Two places, both after ``swap_to_fp8`` (the ``dynamic_row_plain`` scheme):

- each double block's feed-forward, ``net = [GELU(proj), Dropout, Linear]``: ``net[0]`` becomes its bare
  projection and ``net[2]`` applies the GELU while quantizing its input;
- each single block's ``proj_out``, whose input is ``cat([attention output, gelu(proj_mlp output)])``: the
  block's forward hands both halves to ``proj_out.forward_gelu_cat``, so the 15360-wide concatenation is
  never written in bf16.

On CUDA the quantization is one Triton kernel per linear (``workers.speed.fp8_kernels``); inductor's own code
for the same work took 2.9x as long on an H100 (benchmarks/results/SUMMARY.md). Elsewhere the same arithmetic
runs in torch.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from workers.speed.fp8_linear import Fp8RowwiseLinear


class GeluInputFp8Linear(nn.Module):
    """``linear(gelu_tanh(x))`` for an fp8 linear, with the GELU done inside the input quantization."""

    def __init__(self, linear: Fp8RowwiseLinear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear.forward_gelu_cat(None, x)


def _is_tanh_gelu(module: Any) -> bool:
    """torch's ``nn.GELU`` or diffusers' ``GELU`` module (projection + activation), tanh-approximated."""
    from diffusers.models.activations import GELU

    return isinstance(module, nn.GELU | GELU) and module.approximate == "tanh"


def _single_block_forward(
    self: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # diffusers' FluxSingleTransformerBlock.forward (0.42), with act_mlp + cat + proj_out as one call.
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    pre_gelu = self.proj_mlp(norm_hidden_states)
    attn_output = self.attn(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
    )
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out.forward_gelu_cat(attn_output, pre_gelu)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def fuse_gelu_into_fp8(transformer: nn.Module) -> int:
    """Rewrite every double block's feed-forwards and every single block in place; returns how many.

    Raises ``ValueError`` when a block does not have the expected layout (a GELU-tanh feeding an fp8 linear),
    so a preset cannot silently run unfused.
    """
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    fused = 0
    for name, block in list(transformer.named_modules()):  # the loop replaces modules of the tree
        if isinstance(block, FluxTransformerBlock):
            for ff in (block.ff, block.ff_context):
                gelu, out = ff.net[0], ff.net[2]
                if not (_is_tanh_gelu(gelu) and isinstance(gelu.proj, nn.Module) and isinstance(out, Fp8RowwiseLinear)):
                    raise ValueError(f"{name}: feed-forward is not GELU(tanh) -> fp8 linear; cannot fuse")
                ff.net[0], ff.net[2] = gelu.proj, GeluInputFp8Linear(out)
                fused += 1
        elif isinstance(block, FluxSingleTransformerBlock):
            if not (_is_tanh_gelu(block.act_mlp) and isinstance(block.proj_out, Fp8RowwiseLinear)):
                raise ValueError(f"{name}: act_mlp is not GELU(tanh) or proj_out is not an fp8 linear; cannot fuse")
            block.forward = types.MethodType(_single_block_forward, block)
            fused += 1
    return fused
