"""Plan steps through a real worker (``python -m workers.main``) behind Redis, jobs via ``producer.client``."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import PROMPT, RES, ROOT, log


@contextlib.contextmanager
def started_worker(preset_name: str, model_dir: Path, records: Path, env: dict[str, str]) -> Iterator[dict[str, float]]:
    """Redis and one ready worker of ``preset_name``; yields {"t0": process start, "ready_s": seconds to ready}."""
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
        yield {"t0": t0, "ready_s": ready_s}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run([str(redis_bin.parent / "redis-cli"), "-p", "6390", "shutdown", "nosave"], env=env, check=False)


def job_record(preset_name: str, n: int, steps: int, start: dict[str, float], cache: str = "none") -> dict[str, Any]:
    """Submit ``n`` images to the ready worker, wait, and describe the job as one benchmark record."""
    from producer.client import Client

    client = Client()
    prompts = [f"{PROMPT} number {i}" for i in range(n)]
    t = time.time()
    job = client.submit(prompts, preset=preset_name, steps=steps, width=RES, height=RES, cache=cache)
    status = job.wait(timeout=600, poll_s=0.05)
    wall = time.time() - t
    recs = job.results()
    gen = [r.timings.generate_s for r in recs]
    last = max(r.finished_at for r in recs)
    return dict(
        label=f"worker:{preset_name}" + ("" if cache == "none" else f" cache={cache}"),
        preset=preset_name,
        cache=cache,
        anchor=False,
        through_worker=True,
        resolution=f"{RES}x{RES}",
        steps=steps,
        batch=1,
        images=n,
        state=status.state,
        done=status.done,
        steps_computed=[r.steps_computed for r in recs],
        worker_ready_s=round(start["ready_s"], 1),
        # process start -> the first image stored (the job was submitted as soon as the worker was ready)
        first_image_after_start_s=round(min(r.finished_at for r in recs) - start["t0"], 1),
        job_wall_s=round(wall, 2),
        s_per_image=round(wall / n, 3),
        s_per_image_submit_to_last_record=round((last - t) / n, 3),
        pipeline_s_per_image=round(sum(gen) / len(gen), 3),
        # the median leaves out a first image that paid for a new graph capture (a cache policy's first use)
        pipeline_s_per_image_median=round(statistics.median(gen), 3),
    )


def through_worker(preset_name: str, model_dir: Path, records: Path, env: dict[str, str], n: int, steps: int) -> None:
    with started_worker(preset_name, model_dir, records, env) as start:
        rec = job_record(preset_name, n, steps, start)
        with open(records, "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(json.dumps(rec))
