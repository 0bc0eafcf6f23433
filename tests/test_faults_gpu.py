"""Faults 9, 10, 16, 17 and the memory-growth drain: out of memory, time limits, cancel, a model that
cannot load, a pool child over its memory limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fluxfleet.jobs import redis_client
from fluxfleet.keys import image_key
from fluxfleet.storage import open_storage
from tests.faultkit import check_end_state, client_for, fault_stack, prompts, running_fleet, wait_for

pytestmark = pytest.mark.faults

FAULTS = "oom_over=2,oom_on=HUGE,step_delay=0.3,slow_on=SLOW"


def test_out_of_memory_time_limit_and_cancel(tmp_path: Path, tiny_model_dir: Path) -> None:
    with running_fleet(tmp_path, tiny_model_dir, FLUXFLEET_TEST_FAULTS=FAULTS) as fleet:
        worker, client = fleet.worker, fleet.client
        storage = open_storage(client.settings.storage)

        # 16. A batch of 4 runs out of memory (over 2 items): retried as 2 + 2, all stored, none twice
        # in the store; an item that does not fit even alone fails with a clear reason, not forever.
        items = prompts(4)
        items[3] = "a HUGE mountain"
        job = client.submit(items, preset="tiny", job_id="oom")
        assert job.wait(timeout=90).state == "done"
        found = check_end_state(
            client, job.id, done=3, failed=1, started_once=False, failure_reason="out of GPU memory"
        )
        assert found["failures"][0].index == 3
        assert "batch size 1" in found["failures"][0].reason
        assert "out of memory at batch size 4; retrying as 2 + 2" in worker.log()

        # 9. A task past its soft time limit stops between denoising steps: the item fails with the
        # reason, no partial object is written, and the worker serves the next item.
        slow = client.submit(["a SLOW glacier"], preset="tiny", job_id="soft-limit", steps=40)
        assert slow.wait(timeout=60).state == "failed"
        found = check_end_state(client, slow.id, done=0, failed=1, failure_reason="soft time limit")
        assert not storage.exists(image_key(found["failures"][0].key))
        after = client.submit(prompts(2, "after"), preset="tiny", job_id="after-limit")
        assert after.wait(timeout=60).state == "done"
        check_end_state(client, after.id, done=2)

        # 10. Cancel while the second of two tasks runs: it stops between steps, its items are not
        # generated; the first task's images stay; status says cancelled; the manifest lists them.
        job = client.submit(prompts(8, "SLOW"), preset="tiny", job_id="cancel", steps=6)
        wait_for(lambda: len(client.jobs.item_starts(job.id)) == 8, 60, "the second task to start")
        job.cancel()
        status = wait_for(
            lambda: (s := job.status()).finished == s.total and s,
            60,
            "the running task to stop",
        )
        assert status.state == "cancelled"
        # (each item starts twice here: the injected OOM splits every batch of 4 into 2 + 2)
        check_end_state(client, job.id, done=4, cancelled=4, started_once=False)
        assert worker.stop() == 0


def broken_model(tiny_model_dir: Path, where: Path) -> Path:
    """The tiny model with its transformer weights replaced by garbage: present, but cannot load."""
    for path in tiny_model_dir.rglob("*"):
        target = where / path.relative_to(tiny_model_dir)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name == "diffusion_pytorch_model.safetensors" and path.parent.name == "transformer":
            target.write_bytes(b"not a safetensors file" * 100)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, target)
    return where


def test_unloadable_model_and_memory_drain(tmp_path: Path, tiny_model_dir: Path) -> None:
    with fault_stack(tmp_path, tiny_model_dir) as stack:
        stack.start_redis()
        client = client_for(stack)
        job = client.submit(prompts(8), preset="tiny", job_id="drain")
        r = redis_client(client.settings.broker)
        assert r.llen("fluxfleet.tiny") == 2

        # 17. A worker whose model cannot load refuses work, exits non-zero with a clear message,
        # and consumes nothing: both messages are still queued, none unacked.
        broken = stack.start_worker(
            "tiny", extra_env={"FLUXFLEET_MODEL_DIR": str(broken_model(tiny_model_dir, tmp_path / "broken"))}
        )
        assert broken.process is not None
        assert broken.process.wait(120) != 0
        assert "cannot load model" in broken.log()
        assert r.llen("fluxfleet.tiny") == 2 and r.hlen("unacked") == 0
        assert client.jobs.item_starts(job.id) == {}

        # Memory growth: a pool child over its RSS limit (1 KiB here, so every task) drains and is
        # replaced between tasks; every item is still stored once.
        worker = stack.start_worker("tiny", extra_env={"FLUXFLEET_WORKER__MAX_RSS_BYTES": "1024"})
        assert job.wait(timeout=120).state == "done"
        check_end_state(client, job.id, done=8)
        # Each task leaves its child over the limit: a replacement loads after it (ready twice or more).
        wait_for(lambda: worker.log().count("worker ready") >= 2, 60, "a replacement pool child")
        assert worker.stop() == 0
