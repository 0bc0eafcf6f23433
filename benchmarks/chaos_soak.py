"""Chaos soak: tiny CPU workers serve several jobs while faults are injected at random (seeded) times.

Faults: SIGKILL of whole workers and of pool children, a Redis SIGKILL and restart from its append-only
file, an S3 outage (moto stopped) and 503 SlowDown bursts (a loopback proxy in front of moto), junk
messages on the queues, and a full disk under file storage (a small tmpfs, filled, then freed; needs
root). S3 jobs run on ``--workers`` workers of the ``tiny`` preset, one job on file storage runs on
``--file-workers`` workers of a copy named ``tiny-disk`` (its own queue), and a small S3 job is cancelled.

At the end every item must have an outcome, every stored object must be written once and have a record,
each job's manifest lines must match its records, every job must be terminal, no worker may have exited
unless killed, and the run must end within ``--max-duration``. Prints a table; exits 1 if any fails.

    python benchmarks/chaos_soak.py --items 3000 --workers 3 --seed 1 --write-results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_names import result_path
from benchmarks.soak.chaos import Chaos, Plan
from benchmarks.soak.check import SubmittedJob, file_objects, invariants, job_state, objects_check
from benchmarks.soak.config import FULL_PLAN, SUBJECTS, SoakConfig, client_for, job_sizes, s3_settings, worker_env
from benchmarks.soak.fleet import Fleet
from benchmarks.soak.report import headline, machine, note, print_report
from benchmarks.soak.services import ChaosProxy, S3Server, Tmpfs
from fluxfleet.keys import queue_name
from fluxfleet.settings import DEFAULT_PRESETS_DIR
from producer.stack import RedisServer, free_port

logger = logging.getLogger("chaos_soak")


def wait_for_jobs(jobs: list[SubmittedJob], planned: int, chaos: Chaos, deadline: float, t0: float) -> float:
    """Poll until the fault plan (submissions included) has run and every submitted job is terminal;
    returns when the last job ended."""
    last_print, ended_at = 0.0, None
    while time.monotonic() < deadline:
        if not jobs:
            time.sleep(0.5)
            continue
        client = jobs[0].client
        try:
            statuses = client.jobs.statuses([j.job_id for j in list(jobs)])
        except Exception as e:  # Redis is restarting: keep polling
            logger.info("status unavailable: %s", type(e).__name__)
            time.sleep(1)
            continue
        finished = sum(s.finished for s in statuses if s)
        total = sum(s.total for s in statuses if s)
        terminal = all(s and s.state in ("done", "failed", "cancelled") and s.finished == s.total for s in statuses)
        if terminal and ended_at is None:
            ended_at = time.monotonic()
        if not terminal:
            ended_at = None
        if time.monotonic() - last_print >= 10:
            last_print = time.monotonic()
            logger.info(
                "t=%.0f s: %d/%d jobs, %d/%d items finished", last_print - t0, len(jobs), planned, finished, total
            )
        if ended_at is not None and not chaos.running:
            return ended_at
        time.sleep(0.5)
    return time.monotonic()


def run_soak(config: SoakConfig, workdir: Path) -> dict[str, Any]:
    """Run one soak in ``workdir``; returns the results (``invariants`` rows say whether it held)."""
    rng = random.Random(config.seed)
    if not (config.model_dir / "model_index.json").is_file():
        from workers.tools.tiny_model import build_tiny_pipeline

        build_tiny_pipeline(config.model_dir)
    presets = workdir / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    for name in ("tiny", "tiny-disk"):
        shutil.copy(DEFAULT_PRESETS_DIR / "tiny.toml", presets / f"{name}.toml")
    fleets: list[Fleet] = []
    chaos: Chaos | None = None
    with contextlib.ExitStack() as cleanup:
        redis_server = RedisServer(directory=workdir / "redis").start()
        cleanup.callback(redis_server.stop)
        s3 = S3Server(free_port()).start()
        bucket = f"soak-{uuid.uuid4().hex[:8]}"  # moto's buckets are global to this process
        cleanup.callback(s3.stop)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=s3.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        proxy = ChaosProxy(s3.port, seed=config.seed)
        cleanup.callback(proxy.close)
        disk = Tmpfs(workdir / "disk", config.disk_mib * 2**20)
        cleanup.callback(disk.unmount)
        disk.mount()
        base = worker_env(config, redis_server.url, presets)
        fleets.append(Fleet("tiny", config.workers, {**base, **s3_settings(proxy.url, bucket)}, workdir / "logs"))
        file_storage = {"FLUXFLEET_STORAGE__URL": f"file://{disk.path / 'store'}"}
        if config.file_workers:
            fleets.append(Fleet("tiny-disk", config.file_workers, {**base, **file_storage}, workdir / "logs"))
        for fleet in fleets:
            cleanup.callback(fleet.close)
        started = time.monotonic()
        for fleet in fleets:
            fleet.launch()
        for fleet in fleets:
            fleet.wait_ready()
        ready_s = time.monotonic() - started
        s3_client = client_for(redis_server.url, s3_settings(s3.url, bucket), config, presets)
        file_client = client_for(redis_server.url, file_storage, config, presets)

        sizes = job_sizes(config)
        submitted: list[SubmittedJob] = []

        def on_job(action: str, job_id: str) -> str:
            on_file = job_id.startswith("disk")
            client = file_client if on_file else s3_client
            if action == "cancel":
                return f"{job_id}: {client.job(job_id).cancel().state}"
            prompts = [f"{SUBJECTS[i % len(SUBJECTS)]} {job_id} number {i}" for i in range(sizes[job_id])]
            seed = list(sizes).index(job_id)
            try:
                client.submit(prompts, preset="tiny-disk" if on_file else "tiny", job_id=job_id, seed=seed)
            except Exception as e:
                return f"not submitted: {type(e).__name__}: {e}"
            submitted.append(SubmittedJob(job_id, "file" if on_file else "s3", client))
            return f"{job_id}: {sizes[job_id]} items"

        chaos = Chaos(
            fleets,
            redis_server,
            s3,
            proxy,
            disk,
            [queue_name(f.preset) for f in fleets],
            rng,
            burst_share=config.plan.burst_share,
            on_job=on_job,
        )
        cleanup.callback(chaos.stop)
        t0 = time.monotonic()
        chaos.run(config.plan.events(rng, list(sizes)), t0)
        ended = wait_for_jobs(submitted, len(sizes), chaos, t0 + config.max_duration_s, t0)
        wall_s = round(ended - t0, 1)
        chaos.stop()
        drained = time.monotonic() + 30  # junk pushed late may still be on a queue: let the workers take it
        while time.monotonic() < drained and any(s3_client.jobs.r.llen(queue_name(f.preset)) for f in fleets):
            time.sleep(0.5)
        states = [job_state(job) for job in submitted]
        s3_objects = [k for k in s3_client.storage.list("images/") if k.endswith(".png")]
        s3_check = objects_check(
            s3_objects, {k for s in states if s["storage"] == "s3" for k in s["image_keys"]}, proxy.image_puts
        )
        found = file_objects(disk.path / "store")
        file_check = objects_check(
            found["objects"], {k for s in states if s["storage"] == "file" for k in s["image_keys"]}
        )
        rejected = s3_client.jobs.rejected()
        dead_letters = s3_client.jobs.r.llen("fluxfleet:deadletter")
        queues_left = {q: s3_client.jobs.r.llen(q) for q in chaos.queues}
        unacked_left = s3_client.jobs.r.hlen("unacked")
        pool_starts = {f.preset: f.pool_starts() for f in fleets}
        unexpected = [e for f in fleets for e in f.unexpected_exits]
        refusals = [e for f in fleets for e in f.start_refusals]
        disk_free = disk.free_bytes()

    summary = {
        "planned": sum(sizes.values()),
        "submitted": sum(s["items"] for s in states),
        "with_outcome": sum(s["done"] + s["failed"] + s["cancelled"] for s in states),
        "without_outcome": sum(s["without_outcome"] for s in states),
        "done": sum(s["done"] for s in states),
        "skipped": sum(s["skipped"] for s in states),
        "failed": sum(s["failed"] for s in states),
        "cancelled": sum(s["cancelled"] for s in states),
        "duplicates": s3_check["duplicates"] + file_check["duplicates"],
        "objects_without_record": s3_check["without_record"] + file_check["without_record"],
        "records_without_object": s3_check["records_without_object"] + file_check["records_without_object"],
        "manifest_mismatches": sum(
            not (s["manifest_lines"] == s["records"] and s["manifest_matches_records"]) for s in states
        ),
        "jobs_not_terminal": sum(not s["terminal"] for s in states),
        "manifests_missing_at_end": sum(s["manifest_missing_at_end"] for s in states),
        "temporaries": len(found["temporaries"]),
        "unexpected_worker_exits": len(unexpected),
        "junk_pushed": chaos.junk_pushed,
        "junk_refused": sum(rejected.values()),
        "wall_s": wall_s,
        "failure_reasons": dict(sum((Counter(s["failure_reasons"]) for s in states), Counter())),
    }
    rows = invariants(summary, config.max_duration_s)
    return {
        "benchmark": "chaos_soak",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "config": {**asdict(config), "model_dir": str(config.model_dir)},
        "ok": all(r["ok"] for r in rows),
        "invariants": rows,
        "summary": summary,
        "timings_s": {"workers_ready": round(ready_s, 1), "to_last_job_end": wall_s},
        "items_per_s": round(summary["with_outcome"] / wall_s, 2) if wall_s else None,
        "injected": chaos.injected() if chaos else {},
        "faults": chaos.log if chaos else [],
        "observed": {
            "worker_kills": sum(f.worker_kills for f in fleets),
            "pool_child_kills": sum(f.child_kills for f in fleets),
            "pool_children_loaded": pool_starts,
            "s3_answered_503": proxy.answered_503,
            "s3_requests_dropped": proxy.dropped,
            "junk_messages_pushed": chaos.junk_pushed if chaos else 0,
            "rejected_by_reason": rejected,
            "dead_letter_entries": dead_letters,
            "queue_lengths_at_end": queues_left,
            "unacked_at_end": unacked_left,
            "disk_free_bytes_at_end": disk_free,
            "s3_objects": s3_check,
            "file_objects": file_check,
            "temporaries": found["temporaries"][:20],
            "unexpected_worker_exits": unexpected,
            "worker_start_refusals": refusals,
        },
        "jobs": [{k: v for k, v in s.items() if k not in ("image_keys", "failure_reasons")} for s in states],
    }


def parse_args(argv: list[str] | None) -> tuple[SoakConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d, p = SoakConfig(), FULL_PLAN
    add = parser.add_argument
    add("--items", type=int, default=d.items, help="items over all jobs")
    add("--workers", type=int, default=d.workers, help="tiny workers on S3 storage")
    add("--file-workers", type=int, default=d.file_workers, help="tiny-disk workers on file storage (tmpfs)")
    add("--jobs", type=int, default=d.jobs, help="S3 jobs (plus one file job and one cancelled job)")
    add("--cancel-items", type=int, default=d.cancel_items)
    add("--seed", type=int, default=d.seed)
    add("--fault-window", type=float, default=p.window_s, help="seconds after submission in which faults happen")
    add("--max-duration", type=float, default=d.max_duration_s, help="bound on the wall time to the last job's end")
    add("--visibility", type=int, default=d.visibility_s, help="broker visibility timeout, seconds")
    add("--disk-mib", type=int, default=d.disk_mib, help="size of the tmpfs under file storage")
    add("--step-delay", type=float, default=d.step_delay_s, help="seconds of sleep per denoising step (slow GPU)")
    counts = ("worker_kills", "child_kills", "redis_restarts", "s3_outages", "bursts_503", "junk_bursts", "disk_full")
    for name in counts:
        add(f"--{name.replace('_', '-')}", type=int, default=getattr(p, name))
    spans = ("outage_s", "burst_s", "disk_full_s")
    for name in spans:
        add(f"--{name.replace('_', '-')}", type=float, default=getattr(p, name))
    add("--workdir", type=Path, help="keep logs and data here (default: a temporary directory, removed)")
    add("--write-results", action="store_true", help="write benchmarks/results/<date>-cpu-chaos-soak.json and .md")
    args = parser.parse_args(argv)
    plan = Plan(window_s=args.fault_window, **{k: getattr(args, k) for k in counts + spans})
    config = SoakConfig(
        items=args.items,
        workers=args.workers,
        file_workers=args.file_workers,
        jobs=args.jobs,
        cancel_items=args.cancel_items,
        max_duration_s=args.max_duration,
        seed=args.seed,
        visibility_s=args.visibility,
        disk_mib=args.disk_mib,
        step_delay_s=args.step_delay,
        plan=plan,
    )
    return config, args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log
    config, args = parse_args(argv)
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so every process stops and the tmpfs is unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fluxfleet-soak-"))
    try:
        result = run_soak(config, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["argv"] = " ".join(sys.argv[1:] if argv is None else argv)
    result["records"] = [headline(result)]
    print_report(result)
    if args.workdir is not None:
        (args.workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.write_results:
        path = result_path("chaos-soak", "cpu")  # <date>-cpu-chaos-soak.json, never over an earlier run
        path.write_text(json.dumps(result, indent=2) + "\n")
        path.with_suffix(".md").write_text(note(result, path.name))
        print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
