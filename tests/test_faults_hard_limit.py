"""Fault 9, the hard half: a task stuck past its hard time limit (ignoring the soft limit) is killed;
its unfinished items fail with the reason, nothing partial is stored, and the worker serves on."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxfleet.keys import image_key
from fluxfleet.storage import open_storage
from tests.faultkit import check_end_state, prompts, running_fleet

pytestmark = pytest.mark.faults


def test_hard_time_limit_fails_the_items_and_the_worker_serves_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    with running_fleet(tmp_path, tiny_model_dir, FLUXFLEET_TEST_FAULTS="hang_on=STUCK") as fleet:
        worker, client = fleet.worker, fleet.client

        # Given a task whose generation never returns and ignores the soft limit,
        stuck = client.submit(["a STUCK clock", "a STUCK door"], preset="tiny", job_id="hard-limit")
        # when the hard limit kills the pool child, then both items fail with the reason,
        status = stuck.wait(timeout=90)
        assert status.state == "failed"
        found = check_end_state(client, stuck.id, done=0, failed=2, failure_reason="hard time limit")
        storage = open_storage(client.settings.storage)
        assert not any(storage.exists(image_key(f.key)) for f in found["failures"])
        assert "passed its hard time limit; 2 unfinished items failed" in worker.log()

        # and the replacement pool child serves the next job.
        after = client.submit(prompts(2, "after"), preset="tiny", job_id="after-hard-limit")
        assert after.wait(timeout=120).state == "done"
        check_end_state(client, after.id, done=2)
        assert worker.stop() == 0
