"""A task's retry that cannot be published goes back to the queue instead of being dropped.

``Task.retry`` publishes the retry, a new message with a countdown. When Redis cannot take it (killed,
restarting, loading its data), Celery raises ``Reject(requeue=False)``, and the worker acknowledges the
original message as soon as it reaches Redis again: the task is gone, and its items have no outcome, for
good. Rejecting with requeue instead puts the original message back at the end of the queue, and the task
runs again (its stored items skipped) without using up one of its retries; if Redis is still down when
the worker rejects it, the message stays unacknowledged and Redis delivers it again after the visibility
timeout.
"""

from __future__ import annotations

import logging
from typing import NoReturn

from celery import Task
from celery.exceptions import Reject

logger = logging.getLogger(__name__)


def retry_or_requeue(task: Task, error: Exception, countdown: float, max_retries: int) -> NoReturn:
    """Raise ``task.retry(...)``; if its message could not be published, raise a requeueing ``Reject``."""
    try:
        raise task.retry(exc=error, countdown=countdown, max_retries=max_retries)
    except Reject as unpublished:
        logger.warning(
            "task %s: its retry could not be published (%s); the task goes back to the queue",
            task.request.id,
            unpublished.reason,
        )
        raise Reject(unpublished.reason, requeue=True) from None
