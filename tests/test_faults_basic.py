"""Faults 1, 2, 3, 12 and 18: the happy path over two workers, resubmission, configuration checks,
Redis down at submit time, and every task body run twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fluxfleet.errors import BrokerUnavailable
from fluxfleet.keys import job_spec_key, manifest_key
from fluxfleet.storage import open_storage
from tests.faultkit import (
    check_end_state,
    client_for,
    fault_stack,
    prompts,
    queue_is_idle,
    running_fleet,
    stored_images,
    wait_for,
)

pytestmark = pytest.mark.faults


def test_two_workers_resubmission_and_tasks_run_twice(tmp_path: Path, tiny_model_dir: Path) -> None:
    with running_fleet(tmp_path, tiny_model_dir, gpus=("0", "1")) as fleet:
        workers, client = fleet.workers, fleet.client
        storage = open_storage(client.settings.storage)

        # 1. Given 8 items in 2 tasks over 2 workers: 8 objects, 8 manifest lines, no item started twice.
        job = client.submit(prompts(8), preset="tiny", seed=11, job_id="happy")
        assert job.wait(timeout=120).state == "done"
        found = check_end_state(client, "happy", done=8)
        assert {r.worker.split("@")[0] for r in found["records"]} == {"tiny-gpu0", "tiny-gpu1"}
        images = stored_images(storage)
        assert len(images) == 8
        mtimes = {k: Path(storage.location(k)).stat().st_mtime_ns for k in images}

        # 2. The same job again: recognised, nothing enqueued, nothing written.
        again = client.submit(prompts(8), preset="tiny", seed=11, job_id="happy")
        assert again.already_submitted and again.status().state == "done"
        # The same items under a new id: reported as already stored, same keys, nothing new written.
        twin = client.submit(prompts(8), preset="tiny", seed=11, job_id="happy-twin")
        status = twin.wait(timeout=120)
        assert (status.done, status.skipped) == (8, 8)
        assert [r.key for r in twin.results()] == [r.key for r in found["records"]]
        assert {k: Path(storage.location(k)).stat().st_mtime_ns for k in stored_images(storage)} == mtimes

        # 18. Every task body delivered and run a second time with the same arguments.
        manifest_before = storage.get(manifest_key("happy"))
        records_before = [r.model_dump() for r in client.jobs.records("happy")]
        client._publish(client.jobs.task_payloads("happy"), "tiny")
        wait_for(lambda: queue_is_idle(client.settings), 60, "the repeated tasks to be consumed")
        time.sleep(1.0)
        assert storage.get(manifest_key("happy")) == manifest_before
        assert [r.model_dump() for r in client.jobs.records("happy")] == records_before
        assert {k: Path(storage.location(k)).stat().st_mtime_ns for k in stored_images(storage)} == mtimes
        check_end_state(client, "happy", done=8)
        for w in workers:
            assert w.stop() == 0


def test_visibility_timeout_not_above_time_limit_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 3. A task allowed to run longer than the visibility timeout would be delivered twice: refused.
    with fault_stack(
        tmp_path,
        tiny_model_dir,
        FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S="5",
        FLUXFLEET_WORKER__TASK_TIME_LIMIT_S="10",
        FLUXFLEET_WORKER__TASK_SOFT_TIME_LIMIT_S="9",
    ) as stack:
        stack.start_redis()
        worker = stack.start_worker("tiny")
        assert worker.process is not None
        assert worker.process.wait(60) == 2
        assert "VISIBILITY_TIMEOUT_S (5) must exceed" in worker.log()


def test_redis_down_at_submit_fails_fast_and_records_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 12. Given no Redis listening, submit fails within seconds, clearly, with nothing recorded.
    with fault_stack(tmp_path, tiny_model_dir) as stack:
        redis = stack.start_redis()
        redis.stop()
        client = client_for(stack, FLUXFLEET_BROKER__CONNECT_TIMEOUT_S="1")
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="Redis is not reachable"):
            client.submit(prompts(3), preset="tiny", job_id="down")
        assert time.monotonic() - started < 10
        storage = open_storage(client.settings.storage)
        assert not storage.exists(job_spec_key("down"))

        # The command line says so and exits 1.
        cli = subprocess.run(
            [sys.executable, "-m", "producer.cli", "submit", str(_prompts_file(tmp_path)), "--preset", "tiny"],
            env={**os.environ, **stack.env, "FLUXFLEET_BROKER__CONNECT_TIMEOUT_S": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 1
        assert "cannot reach Redis" in cli.stderr

        # Once Redis is back, the job is unknown: nothing was half-submitted.
        redis.start()
        assert not client.jobs.exists("down")


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts(2)) + "\n")
    return path
