"""The hard time limit, handled in the worker's parent process.

When a task passes its hard limit, Celery kills the pool child and acknowledges the message, so the
task's unfinished items would be left with no outcome. Before that acknowledgement, this request
class records them as failed with the reason (and completes the job's manifest if that was the last
outcome). It runs in the parent, which never imports torch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker.request import Request

from fluxfleet.jobs import JobStore
from fluxfleet.manifest import write_manifest
from fluxfleet.schema import ItemFailure, TaskPayload
from fluxfleet.settings import Settings
from fluxfleet.storage import open_storage

logger = logging.getLogger(__name__)


def fail_after_hard_limit(settings: Settings, payload: Any, timeout: float) -> int:
    """Record every unfinished item of the task as failed; returns how many."""
    task = TaskPayload.model_validate(payload)
    jobs = JobStore.from_settings(settings.broker)
    reason = f"the task ran past its hard time limit ({timeout:g} s; FLUXFLEET_WORKER__TASK_TIME_LIMIT_S)"
    finished = jobs.are_finished(task.job_id, [i.key for i in task.items])
    unfinished = [i for i, done in zip(task.items, finished, strict=True) if not done]
    for item in unfinished:
        jobs.record_failed(
            ItemFailure(job_id=task.job_id, index=item.index, key=item.key, reason=reason, finished_at=time.time())
        )
    if jobs.finish_if_complete(task.job_id):
        write_manifest(open_storage(settings.storage), jobs, task.job_id)
    return len(unfinished)


def request_class(settings: Settings) -> type[Request]:
    class HardLimitRequest(Request):  # type: ignore[misc]
        def on_timeout(self, soft: bool, timeout: float) -> None:
            if not soft:
                try:
                    failed = fail_after_hard_limit(settings, self.args[0], timeout)
                    logger.error("task %s passed its hard time limit; %d unfinished items failed", self.id, failed)
                except Exception:  # recording must not keep Celery from replacing the killed child
                    logger.exception("could not record the items of task %s after its hard time limit", self.id)
            super().on_timeout(soft, timeout)

    return HardLimitRequest
