"""The fast preset's GELU fusion (``workers/speed/fp8_fusion.py``): same arithmetic as the unfused fp8 layers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import load_preset

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_transformer(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    from workers.tools.tiny_model import TINY

    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY.transformer).to(dtype).eval()


def transformer_inputs(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    config = model.config
    g = torch.Generator().manual_seed(1)
    image_tokens, text_tokens = 64, 8
    return {
        "hidden_states": torch.randn(1, image_tokens, config.in_channels, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(1, text_tokens, config.joint_attention_dim, generator=g).to(dtype),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g).to(dtype),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "guidance": torch.tensor([3.5], dtype=dtype),
        "img_ids": torch.stack([torch.zeros(64), torch.arange(64.0) // 8, torch.arange(64.0) % 8], dim=1),
        "txt_ids": torch.zeros(text_tokens, 3),
    }


def test_fused_transformer_computes_what_the_unfused_fp8_transformer_computes() -> None:
    from workers.speed.fp8_fusion import GeluInputFp8Linear, fuse_gelu_into_fp8
    from workers.speed.fp8_linear import swap_to_fp8

    # Given the tiny FLUX transformer (1 double block, 2 single blocks) with its linears in fp8,
    unfused = tiny_transformer()
    swap_to_fp8(unfused)
    fused = copy.deepcopy(unfused)
    # when its GELUs are folded into the fp8 input quantization,
    assert fuse_gelu_into_fp8(fused) == 2 + 2  # the double block's two feed-forwards, each single block
    # then the double block's feed-forwards end in a GELU-taking fp8 linear and the single blocks are rewritten,
    assert isinstance(fused.transformer_blocks[0].ff.net[2], GeluInputFp8Linear)
    assert "forward" in vars(fused.single_transformer_blocks[0])
    # and the transformer's output is the same (float32: the GELU is float32 in both, the fp8 bytes match).
    inputs = transformer_inputs(unfused, torch.float32)
    with torch.no_grad():
        expected = unfused(**inputs).sample
        actual = fused(**inputs).sample
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_fusion_refuses_a_transformer_whose_linears_are_not_fp8() -> None:
    from workers.speed.fp8_fusion import fuse_gelu_into_fp8

    # Given the tiny transformer in bf16 without the fp8 swap, the fusion names the first block it cannot fuse.
    with pytest.raises(ValueError, match=r"transformer_blocks\.0: feed-forward is not GELU\(tanh\) -> fp8 linear"):
        fuse_gelu_into_fp8(tiny_transformer())


def test_gelu_fusion_without_plain_fp8_is_refused_naming_the_file(tmp_path: Path) -> None:
    # Given a preset asking for the fusion on torchao's fp8 layers,
    (tmp_path / "f.toml").write_text('model = "m"\n[speed]\ntransformer_fp8 = "dynamic_row"\nfp8_gelu_fusion = true\n')
    # then loading it fails before any worker starts, naming the file, the setting and the one it needs.
    with pytest.raises(
        ConfigurationError, match=r"f\.toml.*fp8_gelu_fusion needs transformer_fp8 = 'dynamic_row_plain'"
    ):
        load_preset("f", tmp_path)


@NEEDS_CUDA
def test_triton_kernel_matches_the_reference_quantization_eager_and_compiled() -> None:
    from workers.speed.fp8_kernels import gelu_cat_rowwise_fp8
    from workers.speed.fp8_linear import Fp8RowwiseLinear, gelu_cat_rowwise_quantize

    # Given bf16 halves as the single blocks' proj_out sees them (fewer rows),
    torch.manual_seed(0)
    plain = torch.randn(256, 3072, device="cuda", dtype=torch.bfloat16)
    pre_gelu = torch.randn(256, 12288, device="cuda", dtype=torch.bfloat16) * 2
    # the kernel's scales equal the reference's and its fp8 bytes differ only where float32 rounding ties,
    for left in (plain, plain[:, :0]):
        q, scale = gelu_cat_rowwise_fp8(left.contiguous(), pre_gelu)
        ref_q, ref_scale = gelu_cat_rowwise_quantize(left, pre_gelu)
        torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
        assert (q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean() < 1e-4
    # and an fp8 linear fed by it gives the same output compiled (full graph) as eager.
    linear = Fp8RowwiseLinear(torch.nn.Linear(15360, 3072, device="cuda", dtype=torch.bfloat16))
    eager = linear.forward_gelu_cat(plain, pre_gelu)
    compiled = torch.compile(linear.forward_gelu_cat, fullgraph=True)(plain, pre_gelu)
    torch.testing.assert_close(compiled, eager)
