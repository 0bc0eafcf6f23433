"""Faults 4-8: killed workers, killed pool children, a poison item, SIGTERM with and without grace."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.faultkit import (
    VISIBILITY_S,
    check_end_state,
    pool_child,
    prompts,
    queue_is_idle,
    running_fleet,
    wait_for,
)

pytestmark = pytest.mark.faults


def test_kill_whole_worker_then_pool_child(tmp_path: Path, tiny_model_dir: Path) -> None:
    with running_fleet(tmp_path, tiny_model_dir, FLUXFLEET_TEST_FAULTS="step_delay=0.25,slow_on=slow") as fleet:
        stack, victim, client = fleet.stack, fleet.worker, fleet.client

        # 4. Given a task running on the only worker, when the whole worker is SIGKILLed mid-task,
        job = client.submit(prompts(4, "slow"), preset="tiny", job_id="killed-worker")
        wait_for(lambda: client.jobs.item_starts(job.id), 60, "the task to start")
        victim.signal(signal.SIGKILL)
        # then another worker re-runs it once the visibility timeout has passed, and it completes once.
        survivor = stack.start_worker("tiny", gpu="1")
        survivor.wait_ready(timeout=180)
        status = job.wait(timeout=VISIBILITY_S + 60)
        assert status.state == "done"
        found = check_end_state(client, job.id, done=4, started_once=False)
        assert set(found["starts"].values()) == {2}, "started on the killed worker, then once more"
        assert {r.worker.split("@")[0] for r in found["records"]} == {"tiny-gpu1"}

        # 5. When the pool child is SIGKILLed mid-task (as the OOM killer does), the task is re-queued
        # at once, re-run once by the replacement child, and completes once.
        job = client.submit(prompts(4, "slow again"), preset="tiny", job_id="killed-child")
        wait_for(lambda: client.jobs.item_starts(job.id), 60, "the task to start")
        subprocess.run(["kill", "-9", str(pool_child(survivor))], check=True)
        assert job.wait(timeout=90).state == "done"
        found = check_end_state(client, job.id, done=4, started_once=False)
        assert set(found["starts"].values()) == {2}
        assert survivor.stop() == 0


def test_poison_item_fails_alone_with_a_reason(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 6. Given an item that kills the process every time (max_attempts 2),
    with running_fleet(tmp_path, tiny_model_dir, FLUXFLEET_TEST_FAULTS="crash_on=POISON") as fleet:
        worker, client = fleet.worker, fleet.client
        items = prompts(4)
        items[1] = "a POISON apple"
        job = client.submit(items, preset="tiny", job_id="poison")

        # then it fails after bounded attempts with the reason, and the other three finish.
        status = job.wait(timeout=150)
        assert status.state == "done"
        found = check_end_state(client, job.id, done=3, failed=1, started_once=False, failure_reason="died 2 times")
        assert found["failures"][0].index == 1
        # The poison item started twice (max_attempts); the item after it started at most twice too.
        assert max(found["starts"].values()) <= 2
        assert worker.stop() == 0


def test_sigterm_mid_task_finishes_it_and_exits_zero(tmp_path: Path, tiny_model_dir: Path) -> None:
    with running_fleet(tmp_path, tiny_model_dir, FLUXFLEET_TEST_FAULTS="step_delay=0.25") as fleet:
        stack, worker, client = fleet.stack, fleet.worker, fleet.client

        # 7. Given two tasks queued, SIGTERM while the first runs:
        job = client.submit(prompts(8), preset="tiny", job_id="sigterm")
        wait_for(lambda: client.jobs.item_starts(job.id), 60, "the task to start")
        worker.signal(signal.SIGTERM, whole_group=False)
        assert worker.process is not None
        # the running task completes, the worker exits 0, and nothing is left unacknowledged;
        assert worker.process.wait(60) == 0
        assert job.status().done == 4
        from fluxfleet.jobs import redis_client

        r = redis_client(client.settings.broker)
        assert r.hlen("unacked") == 0 and r.llen("fluxfleet.tiny") == 1

        # 8. then SIGTERM followed by SIGKILL after a short grace: the item is re-run once elsewhere.
        second = stack.start_worker("tiny", gpu="1")
        second.wait_ready(timeout=180)
        wait_for(lambda: len(client.jobs.item_starts(job.id)) == 8, 60, "the second task to start")
        assert second.stop(grace=0.5) is not None  # SIGTERM, then SIGKILL after 0.5 s
        third = stack.start_worker("tiny", gpu="2")
        third.wait_ready(timeout=180)
        assert job.wait(timeout=VISIBILITY_S + 60).state == "done"
        found = check_end_state(client, job.id, done=8, started_once=False)
        assert sorted(found["starts"].values()) == [1] * 4 + [2] * 4
        wait_for(lambda: queue_is_idle(client.settings), 30, "the queue to drain")
        assert third.stop() == 0
