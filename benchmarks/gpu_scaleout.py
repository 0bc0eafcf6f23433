"""Images per hour on 1, 2 … N GPUs of one host, through the real queue (Redis here, one worker per GPU).

Each measured count starts a fresh fleet with the same code as ``fluxfleet up``, waits for every worker's
warm-up, runs one warm-up task per worker (not measured: first-call effects), then submits
``--images-per-gpu × n`` new images (a fresh seed, so nothing is skipped as already stored) and times
submit → last image. Target: images/hour on N GPUs ≥ 0.95 × N × the one-GPU figure.

GPU host::

    python benchmarks/gpu_scaleout.py --preset bf16 --gpus all --counts 1,2,all --images-per-gpu 24

CPU smoke run (the tiny model)::

    python benchmarks/gpu_scaleout.py --preset tiny --device cpu --workers 2 --model-dir .cache/tiny-flux \\
        --images-per-gpu 8 --out /tmp/scaleout.json

Results: ``{"device", "date", "versions", "records": [...]}``, one record per GPU count with ``gpus``,
``images_per_hour``, ``scaling_efficiency``, a ``per_worker`` breakdown and ``first_image_after_start_s``
(process start to each worker's first stored image, from the warm-up task).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_names import result_path
from fluxfleet.presets import effective_defaults, load_preset
from fluxfleet.schema import ItemRecord
from fluxfleet.settings import Settings
from producer.client import Client
from producer.stack import RedisServer
from producer.up import BROKER_ENV, Fleet, group_gpus, plan_workers, select_gpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--gpus", default="all", help="'all' or indices: 0,1,2,3")
    p.add_argument("--gpus-per-worker", type=int, default=1)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--workers", type=int, default=2, help="CPU workers (with --device cpu)")
    p.add_argument("--counts", default="1,2,all", help="worker counts to measure; 'all' is every worker")
    p.add_argument("--images-per-gpu", type=int, default=24, help="measured images per worker (keep all busy)")
    p.add_argument("--model-dir", type=Path, default=None, help="FLUXFLEET_MODEL_DIR (e.g. the tiny model)")
    p.add_argument("--ready-timeout", type=float, default=1800)
    p.add_argument("--job-timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/<date>-<GPU>-…)")
    return p.parse_args(argv)


def parse_counts(spec: str, available: int) -> list[int]:
    counts = sorted({available if t.strip() == "all" else int(t) for t in spec.split(",")})
    return [c for c in counts if 1 <= c <= available]


def device_name(device: str) -> str:
    if device == "cpu":
        return f"cpu-{os.cpu_count()}core-{platform.machine()}"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return f"{len(names)}x {names[0]}" if names else "unknown-gpu"


def versions(redis: RedisServer) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("fluxfleet", "torch", "diffusers", "transformers", "celery", "kombu", "redis"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    import redis as redis_py

    found["redis-server"] = str(redis_py.Redis.from_url(redis.url).info("server")["redis_version"])
    return found


def per_worker(records: list[ItemRecord], started: float, elapsed: float) -> list[dict[str, Any]]:
    """Images, busy fraction and own rate of each worker: an idle or slow GPU shows here."""
    by_worker: dict[str, list[ItemRecord]] = defaultdict(list)
    for r in records:
        by_worker[r.worker].append(r)
    rows = []
    for worker, recs in sorted(by_worker.items()):
        busy = sum(r.timings.generate_s for r in recs)
        rows.append(
            {
                "worker": worker,
                "gpu": recs[0].gpu,
                "images": len(recs),
                "images_per_hour": round(len(recs) / elapsed * 3600, 1),
                "generate_s": round(busy, 3),
                "busy_fraction": round(busy / elapsed, 3),
                "first_image_s": round(min(r.finished_at for r in recs) - started, 3),
                "last_image_s": round(max(r.finished_at for r in recs) - started, 3),
            }
        )
    return rows


def first_image_after(started: float, records: list[ItemRecord]) -> dict[str, float]:
    """Seconds from ``started`` to each worker's first stored image."""
    first: dict[str, float] = {}
    for r in records:
        first[r.worker] = min(first.get(r.worker, r.finished_at), r.finished_at)
    return {worker: round(t - started, 2) for worker, t in sorted(first.items())}


def measure(
    args: argparse.Namespace, groups: list[str] | None, n: int, available: int, env: dict[str, str], root: Path
) -> dict[str, Any]:
    """One fleet of ``n`` workers: start, warm up, time a batch, stop."""
    # Every run gives each worker the same CPU share (that of the largest run), so only the count changes.
    cores = max(1, (os.cpu_count() or 1) // available) * n
    specs = plan_workers(
        gpu_groups=groups[:n] if groups is not None else None, cpu_workers=n, metrics_base_port=0, cpu_count=cores
    )
    settings = Settings().with_overrides(
        broker__url=env[BROKER_ENV],
        storage__url=env["FLUXFLEET_STORAGE__URL"],
        model_dir=env.get("FLUXFLEET_MODEL_DIR"),
    )
    preset = load_preset(args.preset, settings.presets_dir)
    defaults = effective_defaults(preset, settings)
    fleet = Fleet(args.preset, specs, state_dir=root / f"fleet-{n}", env=env)
    try:
        fleet_started = time.time()
        t0 = time.perf_counter()
        fleet.start_workers()
        fleet.wait_ready(args.ready_timeout)
        ready_s = time.perf_counter() - t0
        client = Client(settings)
        tag = f"{time.time_ns()}"
        # One task per worker, unmeasured, so first-call effects stay out of the figure.
        warm = client.submit(
            [f"warm-up {tag} {i}" for i in range(n * preset.max_items_per_task)], preset=args.preset, seed=1
        )
        warm.wait(timeout=args.job_timeout)
        # Process start -> each worker's first stored image: the warm-up job is submitted as soon as the
        # whole fleet is ready, so this is the cold start a user sees, compile cache included.
        first_image = first_image_after(fleet_started, warm.results())
        images = args.images_per_gpu * n
        started = time.time()
        job = client.submit([f"scale-out {tag} image {i}" for i in range(images)], preset=args.preset, seed=2)
        status = job.wait(timeout=args.job_timeout)
        records = job.results()
        elapsed = (status.finished_at or time.time()) - started
    finally:
        codes = fleet.stop(grace=120)
    generated = [r for r in records if not r.skipped]
    if status.state != "done" or len(generated) != images or len({r.index for r in records}) != images:
        raise RuntimeError(f"{n} worker(s): job {job.id} {status.state}, {len(generated)}/{images} generated")
    return {
        "preset": args.preset,
        "anchor": False,
        "through_worker": True,
        "gpus": n,
        "workers": len(specs),
        "device": args.device,
        "resolution": f"{defaults.width}x{defaults.height}",
        "steps": defaults.steps,
        "batch": preset.batch_size,
        "images": images,
        "elapsed_s": round(elapsed, 3),
        "images_per_hour": round(images / elapsed * 3600, 1),
        "s_per_image": round(sum(r.timings.generate_s for r in generated) / len(generated), 4),
        "fleet_ready_s": round(ready_s, 2),
        "first_image_after_start_s": first_image,
        "worker_exit_codes": codes,
        "per_worker": per_worker(generated, started, elapsed),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        groups, available = None, args.workers
    else:
        groups = group_gpus(select_gpus(args.gpus), args.gpus_per_worker)
        available = len(groups)
    counts = parse_counts(args.counts, available)
    root = Path(tempfile.mkdtemp(prefix="fluxfleet-scaleout-"))
    redis = RedisServer(appendonly=True, directory=root / "redis").start()
    env = {
        BROKER_ENV: redis.url,
        "FLUXFLEET_STORAGE__URL": os.environ.get("FLUXFLEET_STORAGE__URL", f"file://{root}/store"),
    }
    if args.model_dir:
        env["FLUXFLEET_MODEL_DIR"] = str(args.model_dir.resolve())
    try:
        records = []
        for n in counts:
            print(f"measuring {n} worker(s) …", flush=True)
            records.append(measure(args, groups, n, available, env, root))
        result: dict[str, Any] = {
            "device": device_name(args.device),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "versions": versions(redis),
            "records": records,
        }
    finally:
        redis.stop()
    base = next((r["images_per_hour"] for r in records if r["gpus"] == 1), None)
    for r in records:
        r["scaling_efficiency"] = round(r["images_per_hour"] / (r["gpus"] * base), 3) if base else None
    out = args.out or result_path(f"{args.preset}-scaleout", result["device"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{'gpus':>4} {'images':>6} {'elapsed s':>9} {'images/h':>9} {'efficiency':>10} {'ready s':>7} "
        f"{'1st image s':>11}  per worker (images)"
    )
    for r in records:
        split = ", ".join(f"{w['gpu']}:{w['images']}" for w in r["per_worker"])
        print(
            f"{r['gpus']:>4} {r['images']:>6} {r['elapsed_s']:>9.1f} {r['images_per_hour']:>9.0f} "
            f"{r['scaling_efficiency'] or 0:>10.3f} {r['fleet_ready_s']:>7.1f} "
            f"{max(r['first_image_after_start_s'].values()):>11.1f}  {split}"
        )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
