"""GPU memory of the fast preset's load path, stage by stage, on a random full-size FLUX.1-dev pipeline.

Builds the four components in bf16 straight on the GPU (as from_pretrained(device_map="cuda") leaves them),
then runs what the fast preset's levers (workers/speed/levers/) do: fuse QKV (diffusers' fuse_projections, then
the unfused projections dropped), the transformer's linears to fp8 row-wise,
T5's linears to weight-only fp8. Prints allocated and peak after each stage, then the working memory of one
T5 encode (512 tokens), one transformer forward (1024x1024) and one VAE decode (1024x1024).

Run from the repository root on a GPU with ~45 GiB free: ``python benchmarks/load_peak_probe.py``; the last line
(``RESULT {...}``) is what ``benchmarks/results/2026-12-02-H200-fast-load-peak.json`` holds. The planner's
load-time peak (``fluxfleet.estimate.load_peak``) is checked against it in ``tests/test_planner.py``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

sys.path.insert(0, ".")
from workers.speed.fp8_linear import Fp8WeightOnlyLinear, any_linear, swap_to_fp8

GIB = 1024**3
out: dict[str, Any] = {}


def mark(name: str) -> None:
    torch.cuda.synchronize()
    out[name] = {
        "alloc_gib": round(torch.cuda.memory_allocated() / GIB, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
    }
    print(name, out[name], flush=True)
    torch.cuda.reset_peak_memory_stats()


def fuse_qkv(model: torch.nn.Module) -> None:
    # workers/speed/levers/fuse_qkv.py's, copied: it imports pydantic (through fluxfleet.presets), which the
    # GPU image lacks.
    model.fuse_qkv_projections()
    for module in model.modules():
        if getattr(module, "fused_projections", False):
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if name in module._modules and (
                    (name.startswith("to_") and "to_qkv" in module._modules)
                    or (name.startswith("add_") and "to_added_qkv" in module._modules)
                ):
                    del module._modules[name]


def counts(model: torch.nn.Module) -> dict[str, int]:
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return {"linear_weights": lin, "total": total}


t0 = time.time()
from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    transformer = FluxTransformer2DModel(guidance_embeds=True).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
        )
    ).eval()
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            vocab_size=49408,
            projection_dim=768,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=1024,
    ).eval()
torch.set_default_dtype(torch.float32)
out["counts"] = {n: counts(m) for n, m in [("transformer", transformer), ("t5", t5), ("clip", clip), ("vae", vae)]}
print(out["counts"], f"built in {time.time() - t0:.1f}s", flush=True)
mark("bf16_loaded")
with torch.no_grad():
    fuse_qkv(transformer)
    mark("after_fuse_qkv")
    swap_to_fp8(transformer)
    mark("after_transformer_fp8")
    swap_to_fp8(t5, any_linear, Fp8WeightOnlyLinear)
    mark("after_t5_fp8")
    torch.cuda.empty_cache()
    mark("served_after_load")
    ids = torch.randint(0, 32000, (1, 512), device="cuda")
    emb = t5(ids).last_hidden_state
    mark("t5_encode_512")
    lat = torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16)
    img_ids = torch.zeros(4096, 3, device="cuda", dtype=torch.bfloat16)
    txt_ids = torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([1.0], device="cuda", dtype=torch.bfloat16)
    y = transformer(
        hidden_states=lat,
        encoder_hidden_states=emb,
        pooled_projections=pooled,
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=t * 3.5,
        return_dict=False,
    )[0]
    mark("transformer_forward_1mp")
    del y
    img = vae.decode(torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)).sample
    mark("vae_decode_1mp")
print("RESULT " + json.dumps(out))
