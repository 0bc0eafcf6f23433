"""The hard time limit, handled in the worker's parent process.

When a task passes its hard limit, Celery kills the pool child and acknowledges the message, so the
task's unfinished items would be left with no outcome. Before that acknowledgement, this request
class records them as failed with the reason, through the same recorder as every other path
(``fluxfleet.outcomes``: Redis and the stored failure records, so a ``submit --resume`` after Redis
lost the job does not run the item again), and completes the job's manifest if that was the last
outcome. It runs in the parent, which never imports torch.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.request import Request

from fluxfleet.jobs import JobStore
from fluxfleet.outcomes import Outcomes
from fluxfleet.schema import TaskPayload
from fluxfleet.settings import Settings
from fluxfleet.storage import open_storage

logger = logging.getLogger(__name__)


def fail_after_hard_limit(settings: Settings, payload: Any, timeout: float) -> int:
    """Record every unfinished item of the task as failed; returns how many."""
    task = TaskPayload.model_validate(payload)
    jobs = JobStore.from_settings(settings.broker)
    outcomes = Outcomes(open_storage(settings.storage), jobs)
    reason = f"the task ran past its hard time limit ({timeout:g} s; FLUXFLEET_WORKER__TASK_TIME_LIMIT_S)"
    finished = jobs.are_finished(task.job_id, [i.key for i in task.items])
    unfinished = [i for i, done in zip(task.items, finished, strict=True) if not done]
    outcomes.failed(task.job_id, unfinished, reason)
    outcomes.finish(task.job_id)
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
