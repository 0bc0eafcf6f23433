"""Measuring one configuration in its own process: an anchor recipe or a preset through the worker's builder."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import (
    DEV,
    PROMPT,
    RES,
    SEQ,
    Capture,
    GiB,
    items,
    log,
    mem,
    rel_err,
    sync,
    transformer_inputs,
)

# Benchmark-only changes to a preset: nested fields merged over the preset file's, e.g. "fast@cudagraphs".
VARIANTS: dict[str, dict[str, Any]] = {
    "cudagraphs": {"compile": {"mode": "reduce-overhead"}, "speed": {"cuda_graph": False}},
    "cdtune": {"speed": {"coordinate_descent_tuning": True}},
    "multikernel": {"speed": {"multi_kernel": True, "compile_cache": False}},
    "torchao_fp8": {"speed": {"transformer_fp8": "dynamic_row", "fp8_gelu_fusion": False}},
    "no_gelu_fusion": {"speed": {"fp8_gelu_fusion": False}},
    "no_cuda_graph": {"speed": {"cuda_graph": False}},
    "autotune": {"compile": {"mode": "max-autotune-no-cudagraphs"}},
    "no_vae_tiling": {"speed": {"vae_tiling": False}},
}


def with_variant(preset: Any, variant: str) -> Any:
    if not variant:
        return preset

    def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
        return {k: merge(base[k], v) if isinstance(v, dict) and k in base else v for k, v in change.items()} | {
            k: v for k, v in base.items() if k not in change
        }

    return type(preset).model_validate(merge(preset.model_dump(), VARIANTS[variant]))


def measure(args: argparse.Namespace) -> None:
    t0 = float(os.environ.get("BENCH_T0", time.time()))
    import torch

    import_s = time.time() - t0
    from fluxfleet.presets import load_preset
    from fluxfleet.settings import Settings
    from workers.pipeline.build import build_pipeline
    from workers.pipeline.loading import LoadedPipeline
    from workers.tasks.generation import pipeline_generate

    what = args.what
    anchor = what.startswith("anchor:")
    rec: dict[str, Any] = dict(
        label=args.label, anchor=anchor, resolution=f"{RES}x{RES}", batch=1, through_worker=False
    )
    model_dir = Path(args.model_dir)
    whole_compiled = False
    mem("reset")
    t_load = time.time()
    if anchor:
        from diffusers import FluxPipeline, FluxTransformer2DModel

        recipe = what.split(":", 1)[1]
        rec["preset"] = recipe
        kw: dict[str, Any] = {}
        if recipe.startswith("fp8"):
            from diffusers import TorchAoConfig
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            kw["transformer"] = FluxTransformer2DModel.from_pretrained(
                model_dir,
                subfolder="transformer",
                torch_dtype=torch.bfloat16,
                quantization_config=TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())),
            )
        pipe = FluxPipeline.from_pretrained(model_dir, torch_dtype=torch.bfloat16, **kw).to(DEV())
        pipe.set_progress_bar_config(disable=True)
        if recipe.endswith("compile"):
            pipe.transformer = torch.compile(pipe.transformer)
            whole_compiled = True
        sync()
        loaded = LoadedPipeline(pipe=pipe, device=DEV(), model=str(model_dir), load_s=time.time() - t_load)
        preset = None
    else:
        settings = Settings(model_dir=model_dir)
        name, _, variant = what.partition("@")
        preset = with_variant(load_preset(name, settings.presets_dir), variant)
        rec["preset"] = name
        rec["variant"] = variant or None
        loaded = build_pipeline(preset, settings, warm=True)
        rec["load_stages_s"] = {k: round(v, 1) for k, v in loaded.stages.items()}
        if loaded.speed is not None:
            rec["speed_report"] = dataclasses.asdict(loaded.speed)
        pipe = loaded.pipe
        whole_compiled = preset.compile.enabled and not preset.compile.regional
        rec["speed"] = preset.speed.model_dump(exclude_defaults=True)
    sync()
    # A preset's pipeline comes back warmed up (once, as in a worker): its load figures are the builder's record.
    rec["load_s"] = round(time.time() - t_load - loaded.warmup_s, 1)
    rec["load_peak_gib"] = round((loaded.memory.load_peak_bytes if preset else mem("peak")) / GiB, 2)
    rec["mem_after_load_gib"] = round((loaded.memory.after_load_bytes if preset else mem("alloc")) / GiB, 2)
    if preset is not None:
        rec["warmup_peak_gib"] = round(loaded.memory.peak_bytes / GiB, 2)
    rec["mem_reserved_after_load_gib"] = round(mem("reserved") / GiB, 2)
    mem("reset")

    cap = Capture()
    generate = pipeline_generate(loaded, cap)  # the worker's staged generation (encode once, denoise, decode)
    t = time.time()
    if preset is None:
        generate(items(2), lambda: False)
    sync()
    rec["warmup_s"] = round(loaded.warmup_s if preset is not None else time.time() - t, 1)
    # process start -> first full-speed image (28 steps, the presets' default)
    generate(items(28), lambda: False)
    sync()
    rec["cold_start_s"] = round(time.time() - t0, 1)
    rec["import_s"] = round(import_s, 1)
    # Where compile time went (dynamo tracing vs. inductor/AOT, cache hits included), summed per phase.
    phases = torch._dynamo.utils.compilation_time_metrics
    rec["compile_phases_s"] = {k: round(sum(v), 2) for k, v in phases.items() if sum(v) >= 0.05}
    # cache hits, misses and bypasses of AOTAutograd's and inductor's caches
    counters = torch._dynamo.utils.counters
    rec["compile_counters"] = {k: dict(counters[k]) for k in ("aot_autograd", "inductor") if k in counters}
    log(f"[{args.label}] first image {time.time() - t0:.1f}s after process start (load {rec['load_s']}s)")

    out = []
    for steps in [int(n) for n in args.steps.split(",")]:
        for rep in range(args.reps):
            t = time.perf_counter()
            generate(items(steps), lambda: False)
            sync()
            wall = time.perf_counter() - t
            if rep == args.reps - 1:
                r = dict(rec, steps=steps)
                r["s_per_image"] = round(wall, 3)
                r["ms_per_step"] = round(cap.stages["denoising"] / steps * 1000, 1)
                r["text_encoding_s"] = round(cap.stages.get("text_encoding", 0), 3)
                r["vae_decode_s"] = round(cap.stages.get("vae_decode", 0), 3)
                out.append(r)
                log(f"[{args.label}] {steps} steps: {r['ms_per_step']} ms/step, {r['s_per_image']} s/image")
    peak = round(mem("peak") / GiB, 2)
    extra: dict[str, Any] = {"peak_gib": peak, "peak_reserved_gib": round(mem("peak_reserved") / GiB, 2)}
    # where the last generation left things (lean: the text encoders are off the GPU between tasks)
    extra["mem_after_generate_gib"] = round(mem("alloc") / GiB, 2)
    with contextlib.suppress(StopIteration, AttributeError):
        extra["text_encoder_2_device"] = str(next(pipe.text_encoder_2.parameters()).device)

    # transformer-only timing and error against the bf16 reference (not for whole-model compiles: another
    # call signature could recompile for minutes)
    try:
        if not whole_compiled:
            transformer_probe(pipe, preset, args, extra)
    except Exception as e:  # the pipeline figures above stand without the probe
        log(f"[{args.label}] transformer probe failed: {e!r}")
        extra["transformer_probe_error"] = repr(e)[:500]
    for r in out:
        r.update(extra)

    if args.new_shapes:
        # shapes outside the warmed set: the first call pays the (bounded) recompile, the second is served
        shapes = []
        for w, h in ((1344, 768),):
            times = []
            for _ in range(2):
                t = time.perf_counter()
                generate(items(28, width=w, height=h), lambda: False)
                sync()
                times.append(round(time.perf_counter() - t, 2))
            shapes.append({"shape": f"{w}x{h}", "first_s": times[0], "second_s": times[1]})
            log(f"[{args.label}] new shape {w}x{h}: first {times[0]}s, second {times[1]}s")
        for r in out:
            r["new_shape_28_steps"] = shapes
    with open(args.records, "a") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
            log(json.dumps(r))


def transformer_probe(pipe: Any, preset: Any, args: argparse.Namespace, extra: dict[str, Any]) -> None:
    """Transformer-only ms/step, relative errors against the bf16 reference, and the optional profile.

    Under no_grad, the grad mode the pipeline ran in: under inference_mode dynamo would recompile each block.
    """
    import torch

    ref_path = Path(args.ref)
    tr = pipe.transformer
    x = transformer_inputs(tr, pipe.text_encoder.dtype if preset is None else getattr(torch, preset.dtype))
    with torch.no_grad():
        for _ in range(2):
            y = tr(**x)[0]
        sync()
        t = time.perf_counter()
        for _ in range(5):
            y = tr(**x)[0]
        sync()
        extra["transformer_ms_per_step"] = round((time.perf_counter() - t) / 5 * 1000, 1)
        t5 = pipe.encode_prompt(prompt=[PROMPT], prompt_2=None, device=DEV(), max_sequence_length=SEQ)[0]
    if args.save_ref:
        torch.save({"transformer": y.cpu(), "t5": t5.cpu()}, ref_path)
    elif ref_path.is_file():
        ref = torch.load(ref_path)
        extra["rel_err_transformer_vs_bf16"] = round(rel_err(y, ref["transformer"]), 5)
        extra["rel_err_t5_vs_bf16"] = round(rel_err(t5, ref["t5"]), 5)
    if args.profile:
        profile(tr, x)


def profile(tr: Any, x: dict[str, Any]) -> None:
    """Where one denoising step's GPU time goes: kernels grouped into GEMM / attention / other."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with torch.no_grad(), tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            tr(**x)
        sync()
    groups: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if not us or e.key.startswith("ProfilerStep"):
            continue
        name = e.key.lower()
        if name.startswith("triton"):
            g = "triton (fused elementwise/quant)"
        elif any(s in name for s in ("attention", "fmha", "flash", "cudnn", "sdpa")):
            g = "attention"
        elif any(s in name for s in ("nvjet", "gemm", "scaled_mm", "matmul", "sm90_xmma", "cutlass", "addmm", "gemv")):
            g = "gemm"
        elif "triton" in name:
            g = "triton (fused elementwise/quant)"
        else:
            g = "other"
        groups[g] = groups.get(g, 0) + us / 2 / 1000
        rows.append((us / 2 / 1000, e.count // 2, e.key[:90]))
    log("profile, ms per step by group: " + json.dumps({k: round(v, 1) for k, v in sorted(groups.items())}))
    for ms, n, key in sorted(rows, reverse=True)[:15]:
        log(f"  {ms:8.2f} ms  x{n:<4d} {key}")
