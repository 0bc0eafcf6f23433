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
                       a preset, loaded through ``workers.pipeline.build.build_pipeline`` (the worker's code);
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu.common import ROOT, log, records_table
from benchmarks.gpu.flux_dev import build
from benchmarks.gpu.measure import measure
from benchmarks.gpu.worker import through_worker
from benchmarks.results_names import local_device, plan_what, result_name


def versions() -> dict[str, str]:
    from workers.speed.compile_cache import versions as v

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
    return records_table(records, cols)


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
