"""GPU benchmark of whole FLUX.1-dev pipelines: anchors, presets, cold start, through-worker overhead.

One command on the GPU host runs a *plan* (a list of steps), each step in its own process so every
measurement starts from an empty GPU and a fresh Python (that is what a worker does)::

    python3 benchmarks/gpu_bench.py run --plan anchor:bf16,fast:cold,fast:warm,worker:fast,anchor:bf16_compile

Steps:
  anchor:bf16          the seed's recipe: FluxPipeline.from_pretrained(bf16).to("cuda"), eager; also
                       saves the reference transformer/T5 outputs for the relative errors
  anchor:bf16_compile  bf16 + torch.compile(transformer) (whole model, default mode)
  anchor:fp8_compile   torchao Float8DynamicActivationFloat8Weight(PerRow) + torch.compile (whole model)
  NAME[@VARIANT][:cold|:warm]
                       a preset, loaded through ``workers.loading.load_pipeline`` (the worker's code);
                       ``@VARIANT`` changes settings of the preset as ``VARIANTS`` below says (one lever
                       at a time, for predict-change-measure);
                       ``cold`` empties every compile cache first, ``warm`` keeps the shared fluxfleet
                       cache but gives inductor/triton fresh local dirs (another host of the fleet)
  worker:NAME          a real worker (``python -m workers.main``) behind Redis, jobs via ``producer.client``

The model is the FLUX.1-dev architecture (transformer, T5-XXL, CLIP-L, VAE) with random weights, built
on the GPU and saved once per command in diffusers format. Speed and memory do not depend on the weights.
Each step appends JSON records; the driver prints a table last and writes
``$OUT/<date>-<GPU>-<what>.json`` ({"device","date","versions","records"}; the name as
``benchmarks/results_names.py`` makes it, ``--tag`` or the plan saying what was measured).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.results_names import local_device, plan_what, result_name  # noqa: E402

TRANSFORMER_CFG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
RES = int(os.environ.get("BENCH_RES", "1024"))
SEQ = int(os.environ.get("BENCH_SEQ", "512"))
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
PROMPT = "a photo of a red cat on a wooden bridge over a river at night"
GiB = 2**30


def log(*a: Any) -> None:
    print(*a, flush=True)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def DEV() -> str:
    return "cuda" if cuda() else "cpu"


# ----------------------------------------------------------------------------------------------------------
# model
def build(directory: Path) -> None:
    """The FLUX.1-dev architecture with random bf16 weights, built on the GPU, saved in diffusers format."""
    import torch

    from workers.tiny_model import FluxArchitecture, build_flux_pipeline

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


# ----------------------------------------------------------------------------------------------------------
# measuring one configuration (child process)
class Capture:
    """An Observer that keeps the stage times of the last pipeline call."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def stage(self, stage: str, seconds: float, images: int = 1) -> None:
        self.stages[stage] = seconds

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def items(steps: int, n: int = 1, width: int = RES, height: int = RES) -> list[Any]:
    from fluxfleet.schema import GenerationParams, Item

    params = GenerationParams(width=width, height=height, steps=steps, guidance=3.5, max_sequence_length=SEQ)
    import hashlib

    return [
        Item(index=i, prompt=PROMPT, seed=i, params=params, key=hashlib.sha1(f"bench{i}".encode()).hexdigest())
        for i in range(n)
    ]


def transformer_inputs(tr: Any, dtype: Any) -> dict[str, Any]:
    """The exact argument set FluxPipeline passes at RES x RES (so compiled graphs are reused)."""
    import torch

    device = DEV()
    cfg = tr.config
    g = torch.Generator("cpu").manual_seed(1234)
    n = (RES // 16) ** 2
    ids = torch.zeros(RES // 16, RES // 16, 3)
    ids[..., 1] = torch.arange(RES // 16)[:, None]
    ids[..., 2] = torch.arange(RES // 16)[None, :]
    bf = dtype
    return dict(
        hidden_states=torch.randn(1, n, cfg.in_channels, generator=g).to(device, bf),
        timestep=torch.full((1,), 0.5).to(device, bf),
        guidance=torch.full((1,), 3.5, dtype=torch.float32, device=device),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, bf),
        encoder_hidden_states=torch.randn(1, SEQ, cfg.joint_attention_dim, generator=g).to(device, bf),
        txt_ids=torch.zeros(SEQ, 3).to(device, bf),
        img_ids=ids.reshape(-1, 3).to(device, bf),
        joint_attention_kwargs=None,
        return_dict=False,
    )


def with_variant(preset: Any, variant: str) -> Any:
    if not variant:
        return preset

    def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
        return {k: merge(base[k], v) if isinstance(v, dict) and k in base else v for k, v in change.items()} | {
            k: v for k, v in base.items() if k not in change
        }

    return type(preset).model_validate(merge(preset.model_dump(), VARIANTS[variant]))


def rel_err(a: Any, b: Any) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


def mem(what: str) -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    if what == "reset":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return {
        "alloc": torch.cuda.memory_allocated,
        "reserved": torch.cuda.memory_reserved,
        "peak": torch.cuda.max_memory_allocated,
        "peak_reserved": torch.cuda.max_memory_reserved,
    }[what]()


def measure(args: argparse.Namespace) -> None:
    t0 = float(os.environ.get("BENCH_T0", time.time()))
    import torch

    import_s = time.time() - t0
    from fluxfleet.presets import effective_defaults, load_preset
    from fluxfleet.settings import Settings
    from workers.generation import pipeline_generate
    from workers.loading import LoadedPipeline, load_pipeline, warm_up

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
        loaded = load_pipeline(preset, settings)
        rec["load_stages_s"] = {k: round(v, 1) for k, v in loaded.stages.items()}
        if loaded.speed is not None:
            rec["speed_report"] = dataclasses.asdict(loaded.speed)
        pipe = loaded.pipe
        whole_compiled = preset.compile.enabled and not preset.compile.regional
        rec["speed"] = preset.speed.model_dump(exclude_defaults=True)
    sync()
    rec["load_s"] = round(time.time() - t_load, 1)
    rec["load_peak_gib"] = round(mem("peak") / GiB, 2)
    rec["mem_after_load_gib"] = round(mem("alloc") / GiB, 2)
    rec["mem_reserved_after_load_gib"] = round(mem("reserved") / GiB, 2)
    mem("reset")

    cap = Capture()
    generate = pipeline_generate(loaded, cap)  # the worker's staged generation (encode once, denoise, decode)
    t = time.time()
    if preset is not None:
        warm_up(loaded, preset, effective_defaults(preset, Settings(model_dir=model_dir)))
    else:
        generate(items(2), lambda: False)
    sync()
    rec["warmup_s"] = round(time.time() - t, 1)
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


# ----------------------------------------------------------------------------------------------------------
# through a real worker (driver side)
def through_worker(preset_name: str, model_dir: Path, records: Path, env: dict[str, str], n: int, steps: int) -> None:
    from producer.client import Client

    redis_bin = ROOT / ".device-bin/root/usr/bin/redis-server"
    env = dict(env)
    env["LD_LIBRARY_PATH"] = str(ROOT / ".device-bin/root/usr/lib/x86_64-linux-gnu")
    subprocess.run([str(redis_bin), "--port", "6390", "--daemonize", "yes", "--save", ""], env=env, check=True)
    out_dir = Path(tempfile.mkdtemp(prefix="fluxfleet-out-"))
    wenv = dict(
        env,
        FLUXFLEET_BROKER__URL="redis://127.0.0.1:6390/0",
        FLUXFLEET_MODEL_DIR=str(model_dir),
        FLUXFLEET_STORAGE__URL=f"file://{out_dir}",
    )
    for k in ("FLUXFLEET_BROKER__URL", "FLUXFLEET_MODEL_DIR", "FLUXFLEET_STORAGE__URL"):
        os.environ[k] = wenv[k]
    t0 = time.time()
    # One log per start: a plan may start the same preset's worker more than once (warm-start samples).
    starts = len(list(records.parent.glob(f"worker-{preset_name}*.log")))
    suffix = f"-{starts + 1}" if starts else ""
    logf = open(records.parent / f"worker-{preset_name}{suffix}.log", "w")  # noqa: SIM115 (the worker writes it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.main", "--preset", preset_name, "--gpu", "0"],
        cwd=ROOT,
        env=wenv,
        stdout=logf,
        stderr=subprocess.STDOUT,
    )
    try:
        logpath = Path(logf.name)
        while "worker ready" not in logpath.read_text():
            if proc.poll() is not None:
                raise RuntimeError("worker exited:\n" + logpath.read_text()[-3000:])
            time.sleep(0.2)
        ready_s = time.time() - t0
        log(f"[worker:{preset_name}] ready {ready_s:.1f}s after process start")
        client = Client()
        prompts = [f"{PROMPT} number {i}" for i in range(n)]
        t = time.time()
        job = client.submit(prompts, preset=preset_name, steps=steps, width=RES, height=RES)
        status = job.wait(timeout=600, poll_s=0.05)
        wall = time.time() - t
        recs = job.results()
        gen = [r.timings.generate_s for r in recs]
        last = max(r.finished_at for r in recs)
        rec = dict(
            label=f"worker:{preset_name}",
            preset=preset_name,
            anchor=False,
            through_worker=True,
            resolution=f"{RES}x{RES}",
            steps=steps,
            batch=1,
            images=n,
            state=status.state,
            done=status.done,
            worker_ready_s=round(ready_s, 1),
            # process start -> the first image stored (the job was submitted as soon as the worker was ready)
            first_image_after_start_s=round(min(r.finished_at for r in recs) - t0, 1),
            job_wall_s=round(wall, 2),
            s_per_image=round(wall / n, 3),
            s_per_image_submit_to_last_record=round((last - t) / n, 3),
            pipeline_s_per_image=round(sum(gen) / len(gen), 3),
        )
        with open(records, "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(json.dumps(rec))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run([str(redis_bin.parent / "redis-cli"), "-p", "6390", "shutdown", "nosave"], env=env, check=False)


# ----------------------------------------------------------------------------------------------------------
# driver
def versions() -> dict[str, str]:
    from workers.speed import versions as v

    out = v()
    with contextlib.suppress(OSError):
        out["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    return out


def table(records: list[dict[str, Any]]) -> str:
    cols = [
        ("label", "config"),
        ("steps", "steps"),
        ("ms_per_step", "ms/step"),
        ("transformer_ms_per_step", "transf ms"),
        ("s_per_image", "s/image"),
        ("mem_after_load_gib", "GiB load"),
        ("peak_gib", "GiB peak"),
        ("warmup_s", "warm-up s"),
        ("cold_start_s", "start->1st img s"),
        ("rel_err_transformer_vs_bf16", "rel err"),
        ("pipeline_s_per_image", "pipe s/img"),
        ("worker_ready_s", "worker ready s"),
        ("first_image_after_start_s", "start->1st stored s"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    started = time.time()
    deadline = started + args.budget_s
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    records = out / "records.jsonl"
    model_dir = Path(args.model_dir)
    ref = Path(tempfile.gettempdir()) / "fluxfleet-bench-ref.pt"
    shared_cache = Path(tempfile.gettempdir()) / "fluxfleet-compile-cache"
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLUXFLEET_COMPILE_CACHE_DIR=str(shared_cache))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    if not (model_dir / "model_index.json").is_file():
        subprocess.run([sys.executable, __file__, "build", str(model_dir)], env=env, check=True)
    steps_done = []
    needs = {"anchor:fp8_compile": 480, "anchor:bf16_compile": 200}
    needs.update({k: float(v) for k, _, v in (p.partition("=") for p in args.need.split(",") if p)})
    short = set(args.short.split(","))
    for step in args.plan.split(","):
        left = deadline - time.time()
        need = needs.get(step, 90)
        if left < need:
            log(f"--- skip {step}: {left:.0f}s left, needs ~{need}s")
            continue
        log(f"--- {step} ({left:.0f}s left)")
        t = time.time()
        try:
            if step.startswith("worker:"):
                through_worker(step.split(":", 1)[1], model_dir, records, env, args.worker_images, args.worker_steps)
            else:
                what, _, mode = step.partition(":")
                if what == "anchor":
                    what, mode = step, ""
                cenv = dict(env, BENCH_T0=str(time.time()))
                if not step.startswith("anchor"):
                    cenv.setdefault("TORCH_LOGS", "recompiles")
                if mode in ("cold", "warm"):
                    # fresh local inductor/triton caches each time; 'cold' also empties the shared one
                    local = Path(tempfile.mkdtemp(prefix=f"inductor-{mode}-"))
                    cenv["TORCHINDUCTOR_CACHE_DIR"] = str(local / "inductor")
                    cenv["TRITON_CACHE_DIR"] = str(local / "triton")
                    if mode == "cold":
                        shutil.rmtree(shared_cache, ignore_errors=True)
                cmd = [sys.executable, __file__, "measure", what, "--label", step, "--model-dir", str(model_dir)]
                cmd += ["--records", str(records), "--ref", str(ref), "--reps", str(args.reps)]
                if step == "anchor:bf16":
                    cmd.append("--save-ref")
                if step in args.profile.split(","):
                    cmd.append("--profile")
                if step in args.new_shapes.split(","):
                    cmd.append("--new-shapes")
                if step in short:
                    cmd += ["--steps", "28"]
                cenv["BENCH_T0"] = str(time.time())
                rc = subprocess.run(cmd, env=cenv, timeout=max(30, deadline - time.time())).returncode
                if rc:
                    log(f"--- {step} exited {rc}")
        except Exception as e:  # one failed step must not lose the others
            log(f"--- {step} failed: {e!r}")
        steps_done.append((step, round(time.time() - t)))
        log(f"--- {step} took {time.time() - t:.0f}s")
    recs = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    vers = versions()
    date = time.strftime("%Y-%m-%d")
    result = {"device": vers.get("gpu", ""), "date": date, "versions": vers, "plan": args.plan, "records": recs}
    name = result_name(args.tag or plan_what(args.plan), vers.get("gpu") or local_device())
    (out / name).write_text(json.dumps(result, indent=1))
    log(f"steps: {steps_done}; total {time.time() - started:.0f}s")
    log(table(recs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("directory", type=Path)
    m = sub.add_parser("measure")
    m.add_argument("what")
    m.add_argument("--label", required=True)
    m.add_argument("--model-dir", required=True)
    m.add_argument("--records", required=True)
    m.add_argument("--ref", required=True)
    m.add_argument("--reps", type=int, default=1)
    m.add_argument("--save-ref", action="store_true")
    m.add_argument("--profile", action="store_true")
    m.add_argument("--new-shapes", action="store_true")
    m.add_argument("--steps", default="28,50", help="step counts measured after the first image")
    r = sub.add_parser("run")
    r.add_argument("--plan", required=True)
    r.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "fluxdev-random"))
    r.add_argument("--budget-s", type=float, default=560)
    r.add_argument("--reps", type=int, default=1)
    r.add_argument("--worker-images", type=int, default=6)
    r.add_argument("--worker-steps", type=int, default=50)
    r.add_argument("--profile", default="")
    r.add_argument("--new-shapes", default="")
    r.add_argument("--short", default="", help="plan steps measured at 28 steps only (no 50-step image)")
    r.add_argument(
        "--need",
        default="",
        help="seconds a plan step needs, e.g. 'torchao-int8wo=150,quanto-int8=120' (skipped when less is left)",
    )
    r.add_argument("--tag", default="", help="what was measured, for the file name (default: from the plan)")
    args = parser.parse_args()
    if args.cmd == "build":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        build(args.directory)
    elif args.cmd == "measure":
        measure(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
