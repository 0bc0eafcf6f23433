"""A job id whose first submit aborted half-way may be submitted again; task messages of the aborted
attempt that are still queued carry the same task ids, and must never record items under the new job."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faultkit import check_end_state, client_for, fault_stack, prompts

pytestmark = pytest.mark.faults


def test_stale_tasks_of_an_aborted_submit_record_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    with fault_stack(tmp_path, tiny_model_dir) as stack:
        stack.start_redis()
        client = client_for(stack)
        # Given a first submit of job 'again' whose tasks were published, then the job aborted
        # (what a submit that fails half-way leaves), with no worker running yet,
        client.submit(prompts(3, "first"), preset="tiny", job_id="again")
        client.jobs.set_state("again", "aborted")
        # when the same id is submitted again with other prompts (the same task ids, other items)
        job = client.submit(prompts(2, "second"), preset="tiny", job_id="again")
        assert not job.already_submitted
        # and a worker then finds both attempts' messages on the queue,
        stack.start_worker("tiny").wait_ready(timeout=180)
        status = job.wait(timeout=120)
        # only the second attempt's items are recorded, once each, and the stale task is counted.
        assert status.state == "done" and status.total == 2
        found = check_end_state(client, "again", done=2)
        assert sorted(r.prompt for r in found["records"]) == sorted(prompts(2, "second"))
        assert client.jobs.rejected().get("stale_task", 0) >= 1
