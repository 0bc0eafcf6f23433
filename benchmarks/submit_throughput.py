"""Submitting N prompts (10,000 by default) to a private Redis: validation, recording and enqueueing.

Prints a table and writes JSON. Target: <= 5 s for 10,000 prompts on a 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cpu_results import write_results
from benchmarks.results_names import result_path
from fluxfleet.keys import queue_name
from fluxfleet.settings import Settings
from producer.client import Client
from producer.stack import RedisServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<date>-cpu-submit.json")
    args = parser.parse_args()
    redis = RedisServer(appendonly=True).start()
    rows = []
    try:
        import tempfile

        store = tempfile.mkdtemp(prefix="fluxfleet-bench-")
        settings = Settings().with_overrides(broker__url=redis.url, storage__url=f"file://{store}")
        client = Client(settings)
        prompts = [f"a photo of item number {i} in a quiet garden at dawn" for i in range(args.prompts)]
        for run in range(args.repeat):
            started = time.perf_counter()
            job = client.submit(prompts, preset="bf16", seed=run)
            elapsed = time.perf_counter() - started
            queued = client.jobs.r.llen(queue_name("bf16"))
            status = job.status()
            rows.append({"run": run, "prompts": status.total, "tasks_queued": queued, "seconds": elapsed})
            client.jobs.r.delete(queue_name("bf16"))
    finally:
        redis.stop()
    print(f"{'run':>4} {'prompts':>8} {'tasks':>6} {'seconds':>8} {'prompts/s':>10}")
    for row in rows:
        rate = row["prompts"] / row["seconds"]
        print(f"{row['run']:>4} {row['prompts']:>8} {row['tasks_queued']:>6} {row['seconds']:>8.2f} {rate:>10.0f}")
    best = min(r["seconds"] for r in rows)
    print(f"best: {best:.2f} s for {args.prompts} prompts (target <= 5 s)")
    write_results(args.out or result_path("submit", "cpu"), "submit", rows)


if __name__ == "__main__":
    main()
