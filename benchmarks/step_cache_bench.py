"""GPU benchmark of step caching on a preset (``fast`` by default): uncached against each policy it can run.

One process loads the preset through the worker's builder (as a worker does), then, for 28 and 50 steps at
1024x1024, times the worker's own generate function per policy (median of ``--reps``), records the steps
computed and reused, the peak memory, and the relative error of the final latents against the uncached run
from the same seed and random weights (a rough signal only: random weights do not change between steps as a
trained model's do). Then, within the time left, one real worker behind Redis serves the same images
uncached and with MagCache, so the gain through the whole system sits beside the in-process one.

    python3 benchmarks/step_cache_bench.py --preset fast --policies none,magcache,magcache:threshold=0.12,max_skip=4

Prints a table last and writes ``$OUT/<date>-<GPU>-step-cache.json`` (``benchmarks/results_names.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu.common import DEV, PROMPT, RES, SEQ, Capture, GiB, items, log, mem, records_table, rel_err, sync
from benchmarks.results_names import local_device, result_name

DEFAULT_POLICIES = "none;magcache;magcache:threshold=0.12,max_skip=4;fbcache;taylorseer"


def final_latents(pipe: Any, step_cache: Any, policy: Any, steps: int) -> Any:
    import torch

    with step_cache.run(policy, steps):
        return pipe(
            prompt=PROMPT,
            width=RES,
            height=RES,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=SEQ,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="latent",
        ).images


def measure_policies(args: argparse.Namespace, out: list[dict[str, Any]]) -> None:
    from fluxfleet.caching import parse_policy, preset_refusal
    from fluxfleet.presets import load_preset
    from fluxfleet.settings import Settings
    from workers.pipeline.build import build_pipeline
    from workers.speed.step_cache import find
    from workers.tasks.engine import STEPS_INFO
    from workers.tasks.generation import pipeline_generate

    settings = Settings(model_dir=Path(args.model_dir))
    preset = load_preset(args.preset, settings.presets_dir)
    mem("reset")
    loaded = build_pipeline(preset, settings, warm=True)
    step_cache = find(loaded.pipe.transformer)
    cap = Capture()
    generate = pipeline_generate(loaded, cap)
    for steps in (28, 50):
        reference = final_latents(loaded.pipe, step_cache, parse_policy("none"), steps)
        for text in args.policies.split(";"):
            policy = parse_policy(text)
            rec: dict[str, Any] = dict(
                label=f"{args.preset} cache={policy.canonical()}",
                preset=args.preset,
                cache=policy.canonical(),
                resolution=f"{RES}x{RES}",
                batch=1,
                steps=steps,
                through_worker=False,
            )
            refusal = preset_refusal(policy, preset)
            if refusal:
                out.append(dict(rec, refused=refusal))
                log(f"[{rec['label']}] refused: {refusal}")
                continue
            batch = items(steps, cache=policy.canonical())
            generate(batch, lambda: False)  # the first run of a policy captures its graphs
            sync()
            mem("reset")
            walls, denoise = [], []
            for _ in range(args.reps):
                started = time.perf_counter()
                images = generate(batch, lambda: False)
                sync()
                walls.append(time.perf_counter() - started)
                denoise.append(cap.stages["denoising"])
            counted = images[0].info.get(STEPS_INFO)
            latents = final_latents(loaded.pipe, step_cache, policy, steps)
            s_per_image = statistics.median(walls)
            rec.update(
                s_per_image=round(s_per_image, 3),
                images_per_hour=round(3600 / s_per_image),
                denoising_s=round(statistics.median(denoise), 3),
                ms_per_step=round(statistics.median(denoise) / steps * 1000, 1),
                steps_computed=counted[0] if counted else None,
                steps_reused=counted[1] if counted else None,
                peak_gib=round(mem("peak") / GiB, 2),
                rel_err_latents_vs_uncached=round(rel_err(latents, reference), 4),
                reps=args.reps,
            )
            out.append(rec)
            log(json.dumps(rec))
    for rec in out:
        base = next((r for r in out if r["steps"] == rec["steps"] and r["cache"] == "none"), None)
        if base and rec.get("s_per_image"):
            rec["speedup_vs_uncached"] = round(base["s_per_image"] / rec["s_per_image"], 2)


def through_worker(args: argparse.Namespace, out: list[dict[str, Any]], records: Path) -> None:
    from benchmarks.gpu.worker import job_record, started_worker

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with started_worker(args.preset, Path(args.model_dir), records, env) as start:
        for cache in ("none", "magcache"):
            rec = job_record(args.preset, args.worker_images, 28, start, cache=cache)
            out.append(rec)
            log(json.dumps(rec))
    none, mag = (r for r in out if r.get("through_worker"))
    mag["speedup_vs_uncached"] = round(none["pipeline_s_per_image_median"] / mag["pipeline_s_per_image_median"], 2)


def table(records: list[dict[str, Any]]) -> str:
    cols = [
        ("label", "config"),
        ("steps", "steps"),
        ("s_per_image", "s/image"),
        ("pipeline_s_per_image_median", "worker generate s/image"),
        ("images_per_hour", "images/h"),
        ("speedup_vs_uncached", "x uncached"),
        ("steps_computed", "computed"),
        ("steps_reused", "reused"),
        ("peak_gib", "GiB peak"),
        ("rel_err_latents_vs_uncached", "latent rel err"),
        ("refused", "refused"),
    ]
    return records_table(records, cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="';'-separated cache policies")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "fluxdev-random"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker-images", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=280, help="the worker step is skipped when short of time")
    parser.add_argument("--worker-needs-s", type=float, default=80)
    args = parser.parse_args()
    started = time.time()
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(args.model_dir) / "model_index.json").is_file():
        subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "build", args.model_dir], check=True)
    records: list[dict[str, Any]] = []
    try:
        measure_policies(args, records)
    except Exception as e:  # what was measured is still written
        log(f"policy measurement failed: {e!r}")
    left = args.budget_s - (time.time() - started)
    if left >= args.worker_needs_s:
        try:
            through_worker(args, records, out_dir / "worker.jsonl")
        except Exception as e:
            log(f"worker step failed: {e!r}")
    else:
        log(f"worker step skipped: {left:.0f}s left")
    from benchmarks.gpu_bench import versions

    vers = versions()
    result = {"device": vers.get("gpu", ""), "date": time.strftime("%Y-%m-%d"), "versions": vers, "records": records}
    (out_dir / result_name("step-cache", vers.get("gpu") or local_device())).write_text(json.dumps(result, indent=1))
    log(f"total {time.time() - started:.0f}s on {DEV()}")
    log(table(records))


if __name__ == "__main__":
    main()
