"""Per-image overhead outside the pipeline call, through a real worker (Redis, Celery, file storage).

Runs the tiny pipeline at 512x512 and compares the job's wall time per image with the time spent
inside the pipeline call; the rest is dequeue, message decoding, checks, PNG encoding, upload and
manifest bookkeeping. Target: <= 50 ms per image. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cpu_results import write_results
from benchmarks.results_names import result_path
from fluxfleet.settings import Settings
from producer.client import Client
from producer.stack import LocalStack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/tiny-flux"))
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/<date>-cpu-worker-overhead.json"
    )
    args = parser.parse_args()
    if not (args.model_dir / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "workers.tools.tiny_model", str(args.model_dir)], check=True)
    store = Path(tempfile.mkdtemp(prefix="fluxfleet-overhead-"))
    env = {
        "FLUXFLEET_MODEL_DIR": str(args.model_dir.resolve()),
        "FLUXFLEET_STORAGE__URL": f"file://{store}",
        "FLUXFLEET_WORKER__DEVICE": "cpu",
        "FLUXFLEET_DEFAULTS__WIDTH": str(args.size),
        "FLUXFLEET_DEFAULTS__HEIGHT": str(args.size),
    }
    with LocalStack(env=env) as stack:
        redis = stack.start_redis()
        stack.start_worker("tiny").wait_ready(timeout=300)
        client = Client(
            Settings().with_overrides(
                broker__url=redis.url, storage__url=env["FLUXFLEET_STORAGE__URL"], model_dir=env["FLUXFLEET_MODEL_DIR"]
            )
        )
        prompts = [f"a quiet garden number {i} at dawn" for i in range(args.images)]
        # One warm batch first so the measured job sees a steady worker.
        client.submit(prompts[:4], preset="tiny", seed=999, width=args.size, height=args.size, steps=args.steps).wait(
            timeout=300
        )
        started = time.time()
        job = client.submit(prompts, preset="tiny", seed=1, width=args.size, height=args.size, steps=args.steps)
        job.wait(timeout=900, poll_s=0.05)
        records = job.results()
    wall = max(r.finished_at for r in records) - started
    pipeline = sum(r.timings.generate_s for r in records)
    encode = statistics.mean(r.timings.encode_s for r in records)
    upload = statistics.mean(r.timings.upload_s for r in records)
    per_image_wall = wall / len(records)
    per_image_pipeline = pipeline / len(records)
    overhead = per_image_wall - per_image_pipeline
    rows = {
        "images": len(records),
        "size": args.size,
        "steps": args.steps,
        "wall_s_per_image": per_image_wall,
        "pipeline_s_per_image": per_image_pipeline,
        "overhead_ms_per_image": overhead * 1000,
        "png_encode_ms": encode * 1000,
        "upload_ms": upload * 1000,
    }
    header = ("images", "size", "wall/img", "pipeline/img", "overhead/img", "png enc", "upload")
    print("{:>6} {:>5} {:>9} {:>13} {:>13} {:>8} {:>7}".format(*header))
    print(
        f"{len(records):>6} {args.size:>5} {per_image_wall * 1000:>7.1f}ms {per_image_pipeline * 1000:>11.1f}ms "
        f"{overhead * 1000:>11.1f}ms {encode * 1000:>6.1f}ms {upload * 1000:>5.1f}ms"
    )
    print("(png encode and upload run on background threads, overlapping the next pipeline call)")
    write_results(args.out or result_path("worker-overhead", "cpu"), "worker_overhead", [rows])


if __name__ == "__main__":
    main()
