"""Speed levers applied once a preset's pipeline is placed (and, lazily, compiled) by ``post_load``.

Everything is driven by the preset's ``[speed]`` section; an empty section is a no-op. In order:

1. ``attention_backend``: the diffusers attention dispatcher backend, e.g. ``_native_cudnn`` (cuDNN SDPA,
   about half the attention time of the default FlashAttention-2 path on an H100 at 1024x1024).
2. ``fuse_qkv``: one GEMM for Q/K/V (and one for the text stream's added Q/K/V) per attention; the
   unfused projections are dropped so their memory is freed.
3. ``transformer_fp8`` / ``text_encoder_2_fp8``: torchao float8 of the linear layers, row-wise dynamic
   activations (fp8 GEMMs) or weight-only (half the memory, bf16 GEMMs); or, for the transformer,
   ``dynamic_row_plain``: the row-wise dynamic scheme with plain tensors (``workers.fp8_linear``), whose
   GELU-fed linears can also take the GELU into their input quantization (``fp8_gelu_fusion``).
4. VAE tiling / a compiled VAE decoder; ``cuda_graph``: the transformer's forward replayed as a CUDA graph
   (``workers.cuda_graphs``), captured during the warm-up.
5. The compile cache: artifacts of ``torch.compile`` (inductor, triton, autotune) saved with
   ``torch.compiler.save_cache_artifacts`` in a shared directory after the warm-up and loaded before it
   by the next worker with the same key (GPU model, torch/diffusers/torchao/triton versions, preset,
   shapes). A hit skips inductor's codegen and autotuning; dynamo still traces the two block types.
6. The warm-up itself, at the preset's warm-up shapes, so the saved cache holds them.

Compilation stays where ``post_load`` put it (``compile_repeated_blocks`` or ``torch.compile``, both lazy):
the levers change the modules before their first call, which is when they are traced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxfleet.presets import Preset

logger = logging.getLogger(__name__)

CACHE_ENV = "FLUXFLEET_COMPILE_CACHE_DIR"
# The [speed] fp8 schemes run through torchao; the "_plain" ones are workers.fp8_linear's and need no torchao.
TORCHAO_FP8 = ("dynamic_row", "weight_only")
# What ``with sdpa_kernel(...)`` leaves in a dynamo graph (torch 2.11-2.13).
SDPA_KERNEL_HELPERS = ("torch.nn.attention._sdpa_kernel", "torch.nn.attention._backend_from_string")


@dataclass
class SpeedReport:
    applied: list[str] = field(default_factory=list)
    cache_key: str | None = None
    cache_path: str | None = None
    cache_hit: bool = False
    cache_load_s: float = 0.0
    cache_save_s: float = 0.0
    cache_bytes: int = 0
    quantize_s: float = 0.0
    warmup_s: float = 0.0


def _unwrap(module: Any) -> Any:
    return getattr(module, "_orig_mod", module)


def _fp8_config(kind: str) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    # set_inductor_config=False: torchao would turn on inductor's coordinate-descent tuning with all
    # directions, which made the regional compile of this preset take ~280 s on an H100 (first GPU run).
    if kind == "dynamic_row":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if kind == "weight_only":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"unknown fp8 scheme '{kind}'")


def quantize_fp8(module: Any, kind: str) -> None:
    from torchao.quantization import quantize_

    from workers.fp8_linear import fp8_friendly

    quantize_(_unwrap(module), _fp8_config(kind), filter_fn=lambda m, _fqn: fp8_friendly(m))


def fuse_qkv(transformer: Any) -> int:
    """Fuse, then drop the unfused projections (diffusers keeps them for ``unfuse``); returns the count."""
    model = _unwrap(transformer)
    model.fuse_qkv_projections()
    fused = 0
    for module in model.modules():
        if getattr(module, "fused_projections", False):
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if name in module._modules and (
                    (name.startswith("to_") and "to_qkv" in module._modules)
                    or (name.startswith("add_") and "to_added_qkv" in module._modules)
                ):
                    del module._modules[name]
            fused += 1
    return fused


def versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "torchao", "triton", "bitsandbytes"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def warmup_shapes(preset: Preset) -> list[tuple[int, int]]:
    if preset.warmup.shapes:
        return [tuple(s) for s in preset.warmup.shapes]  # type: ignore[misc]
    return [(int(preset.defaults.get("width", 1024)), int(preset.defaults.get("height", 1024)))]


def cache_key(preset: Preset, device: str) -> str:
    """GPU model + versions + the preset's loading/speed/compile settings + warm-up shapes."""
    import torch

    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    material = {
        "gpu": gpu,
        "versions": versions(),
        "preset": preset.name,
        "settings": preset.model_dump(include={"dtype", "batch_size", "quantization", "compile", "speed"}),
        "shapes": warmup_shapes(preset),
        "max_sequence_length": int(preset.defaults.get("max_sequence_length", 512)),
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
    safe_gpu = "".join(c if c.isalnum() else "-" for c in gpu)
    return f"{preset.name}-{safe_gpu}-torch{material['versions'].get('torch', '?')}-{digest}"


def cache_dir(preset: Preset) -> Path:
    chosen = os.environ.get(CACHE_ENV) or preset.speed.compile_cache_dir or "~/.cache/fluxfleet/compile-cache"
    return Path(chosen).expanduser()


def _warm_up(pipe: Any, preset: Preset) -> None:
    """Denoise and decode at each warm-up shape from random embeddings (no text encoders needed)."""
    import torch

    steps = max(2, preset.warmup.steps)
    seq = int(preset.defaults.get("max_sequence_length", 512))
    transformer = _unwrap(pipe.transformer)
    device = pipe._execution_device
    dtype = getattr(torch, preset.dtype)
    joint = transformer.config.joint_attention_dim
    pooled = transformer.config.pooled_projection_dim
    batch = preset.batch_size
    g = torch.Generator("cpu").manual_seed(0)
    # Exactly as workers.generation calls it: embeddings made under inference_mode, the pipeline itself
    # under its own no_grad. A different grad mode is a different dynamo guard, i.e. a second compile.
    with torch.inference_mode():
        embeds = torch.randn(batch, seq, joint, generator=g).to(device, dtype)
        pooled_embeds = torch.randn(batch, pooled, generator=g).to(device, dtype)
    for width, height in warmup_shapes(preset):
        pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled_embeds,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=float(preset.defaults.get("guidance", 3.5)),
            max_sequence_length=seq,
            generator=[torch.Generator("cpu").manual_seed(0) for _ in range(batch)],
            output_type="pil",
        )
    if device.type == "cuda":
        torch.cuda.synchronize()


def apply_speed(pipe: Any, preset: Preset, device: str) -> SpeedReport:
    """Apply the preset's ``[speed]`` levers to a placed pipeline; a no-op for presets without any."""
    report = SpeedReport()
    spec = preset.speed
    if not spec.enabled:
        return report
    import torch

    transformer = pipe.transformer
    started = time.perf_counter()
    if spec.attention_backend:
        _unwrap(transformer).set_attention_backend(spec.attention_backend)
        report.applied.append(f"attention={spec.attention_backend}")
    if spec.fuse_qkv:
        report.applied.append(f"fused_qkv x{fuse_qkv(transformer)}")
    if spec.transformer_fp8 in TORCHAO_FP8:
        quantize_fp8(transformer, spec.transformer_fp8)
    elif spec.transformer_fp8 == "dynamic_row_plain":
        from workers.fp8_linear import swap_to_fp8

        swap_to_fp8(_unwrap(transformer))
        if spec.fp8_gelu_fusion:
            from workers.fp8_fusion import fuse_gelu_into_fp8

            report.applied.append(f"fp8_gelu_fusion x{fuse_gelu_into_fp8(_unwrap(transformer))}")
    if spec.transformer_fp8 != "none":
        report.applied.append(f"transformer_fp8={spec.transformer_fp8}")
    if spec.text_encoder_2_fp8 != "none" and getattr(pipe, "text_encoder_2", None) is not None:
        if spec.text_encoder_2_fp8 in TORCHAO_FP8:
            quantize_fp8(pipe.text_encoder_2, spec.text_encoder_2_fp8)
        else:  # weight_only_plain
            from workers.fp8_linear import Fp8WeightOnlyLinear, any_linear, swap_to_fp8

            swap_to_fp8(pipe.text_encoder_2, any_linear, Fp8WeightOnlyLinear)
        report.applied.append(f"text_encoder_2_fp8={spec.text_encoder_2_fp8}")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    report.quantize_s = time.perf_counter() - started
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
        report.applied.append("vae_tiling")
    if spec.compile_vae_decoder:
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, fullgraph=False)
        report.applied.append("vae_decoder_compiled")
    if preset.compile.enabled and spec.coordinate_descent_tuning:
        # Tunes block sizes of inductor's own triton kernels (activation quantization, norms, RoPE), one
        # direction at a time: torchao's all-directions variant made the first compile ~280 s.
        torch._inductor.config.coordinate_descent_tuning = True
        report.applied.append("coordinate_descent_tuning")
    if preset.compile.enabled and spec.multi_kernel:
        # Inductor reduces rows wider than 1024 in a loop: the amax pass and the scale-and-cast pass of a row-wise
        # fp8 quantization each read the activation (H100 profile: ~0.27 ms per single block for proj_out's
        # 4608x15360 input). Multi-kernel also emits the one-pass variant for rows up to 16K and keeps the faster.
        torch._inductor.config.triton.multi_kernel = 1
        report.applied.append("multi_kernel")
    if preset.compile.enabled:
        # Bounded recompiles: a new shape recompiles (dynamically, once dynamo sees sizes change) until
        # the limit, then that block runs eagerly instead of compiling forever.
        torch._dynamo.config.cache_size_limit = spec.recompile_limit
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = spec.recompile_limit

    path: Path | None = None
    if spec.compile_cache and preset.compile.enabled:
        # diffusers' _native_* attention backends pick the SDPA kernel with torch.nn.attention.sdpa_kernel,
        # which dynamo records as calls to two private helpers of torch.nn.attention. AOTAutograd's cache
        # refuses private torch functions it does not know, so every warm start re-ran AOT tracing although
        # inductor's graphs came from the cache (dynamo+AOT 7.4-8.7 s before, 4.7 s after on an H100 host).
        # Their arguments are constants of the graph, so marking them cacheable keys the cache on them.
        import torch._inductor.config

        for helper in SDPA_KERNEL_HELPERS:
            torch._inductor.config.unsafe_marked_cacheable_functions[helper] = torch.__version__
        report.cache_key = cache_key(preset, device)
        path = cache_dir(preset) / f"{report.cache_key}.bin"
        report.cache_path = str(path)
        if path.is_file():
            t = time.perf_counter()
            try:
                torch.compiler.load_cache_artifacts(path.read_bytes())
                report.cache_hit = True
            except Exception as e:  # a corrupt or foreign artifact only costs a compile
                logger.warning("compile cache %s unusable (%s); compiling", path, e)
            report.cache_load_s = time.perf_counter() - t

    if spec.cuda_graph:
        if device.startswith("cuda"):
            from workers.cuda_graphs import graph_the_transformer

            graph_the_transformer(_unwrap(transformer), spec.cuda_graph_limit)
            report.applied.append("cuda_graph")
        else:
            logger.info("preset %s: cuda_graph needs CUDA; running without on %s", preset.name, device)

    if spec.warm_up:
        t = time.perf_counter()
        _warm_up(pipe, preset)
        report.warmup_s = time.perf_counter() - t

    if path is not None and not report.cache_hit and spec.warm_up:
        t = time.perf_counter()
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            data, _info = saved
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: concurrent workers never read half a file
            report.cache_bytes = len(data)
        report.cache_save_s = time.perf_counter() - t
    logger.info(
        "speed levers for preset %s: %s; cache %s (%s) load %.1fs save %.1fs; warm-up %.1fs",
        preset.name,
        ", ".join(report.applied) or "none",
        "hit" if report.cache_hit else "miss",
        report.cache_key,
        report.cache_load_s,
        report.cache_save_s,
        report.warmup_s,
    )
    return report
