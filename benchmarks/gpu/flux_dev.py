"""The FLUX.1-dev architecture with random weights: what the GPU benchmark measures (speed and memory do not
depend on the weights)."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.gpu.common import TRANSFORMER_CFG, log


def build(directory: Path) -> None:
    """The FLUX.1-dev architecture with random bf16 weights, built on the GPU, saved in diffusers format."""
    import torch

    from workers.tools.tiny_model import FluxArchitecture, build_flux_pipeline

    flux_dev = FluxArchitecture(
        transformer=TRANSFORMER_CFG,
        clip=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        t5=dict(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            act_fn="silu",
            latent_channels=16,
            norm_num_groups=32,
            sample_size=1024,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        ),
        scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    )
    started = time.time()
    build_flux_pipeline(directory, flux_dev, device="cuda", dtype=torch.bfloat16, init_std=0.02)
    log(f"built and saved the random FLUX.1-dev pipeline to {directory} in {time.time() - started:.0f}s")
