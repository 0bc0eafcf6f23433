"""Faults 11 and 13: Redis killed and restarted with AOF; Redis restarted without persistence."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.stack import RedisServer
from tests.faultkit import VISIBILITY_S, check_end_state, prompts, running_fleet, wait_for

pytestmark = pytest.mark.faults


def restart(redis: RedisServer, *, lose_data: bool = False) -> None:
    redis.kill()
    if lose_data:
        for path in redis.directory.rglob("*.aof*"):
            if path.is_file():
                path.unlink()
    time.sleep(1)
    redis.start()  # same port, same directory


def fluxfleet(env: dict[str, str], *args: str) -> str:
    """What ``fluxfleet ARGS`` prints, run with exactly ``env``; it must exit 0."""
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout


def test_redis_kill_with_aof_then_without_persistence(tmp_path: Path, tiny_model_dir: Path) -> None:
    # (running_fleet starts Redis with its append-only file, which test 11 relies on)
    with running_fleet(tmp_path, tiny_model_dir, FLUXFLEET_TEST_FAULTS="step_delay=0.3") as fleet:
        stack, redis, worker, client = fleet.stack, fleet.redis, fleet.worker, fleet.client

        # 11. Given a task in flight and one queued, Redis is SIGKILLed and restarted from its AOF:
        job = client.submit(prompts(8), preset="tiny", job_id="aof")
        wait_for(lambda: client.jobs.item_starts(job.id), 60, "the first task to start")
        time.sleep(1.2)  # appendfsync everysec
        restart(redis)
        # the queued task survives, the in-flight one completes, the worker reconnects on its own.
        assert job.wait(timeout=VISIBILITY_S + 90).state == "done"
        check_end_state(client, job.id, done=8, started_once=False)

        # 13. Redis restarted with its data gone, while a job was in progress:
        job = client.submit(prompts(16, "lost"), preset="tiny", job_id="lost")
        wait_for(lambda: job.status().done >= 4, 60, "the first task to be stored")
        restart(redis, lose_data=True)
        time.sleep(3)  # whatever was running finishes into a Redis that no longer knows the job
        # `fluxfleet status` reports the job lost, with the items not in storage as missing;
        env = {**stack.env, "PATH": str(Path(sys.executable).parent)}
        status = json.loads(fluxfleet(env, "status", "lost", "--json"))
        assert status["state"] == "lost" and status["total"] == 16
        assert status["done"] + status["missing"] == 16 and status["missing"] >= 4
        missing = status["missing"]
        # `fluxfleet submit --resume lost` re-enqueues exactly the missing items;
        assert f"re-enqueued {missing} missing item(s)" in fluxfleet(env, "submit", "--resume", "lost")
        # and the job completes with every item stored once.
        assert client.job("lost").wait(timeout=90).state == "done"
        check_end_state(client, "lost", done=16, started_once=False)
        assert worker.stop() == 0
