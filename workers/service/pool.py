"""The worker's Celery pool: prefork, but a pool child lost before Celery first reaches Redis is replaced.

Celery's prefork pool checks once, when the consumer first reaches the broker, that no pool process has
exited since the pool started, and otherwise stops the worker with exit code 1 ("Could not start worker
processes"). The worker forks its pool child before that first connection; if Redis is down or restarting
then, Celery retries the connection for seconds, and a pool child lost meanwhile (the OOM killer, a crash
while the pipeline loads) stopped the whole worker, although a child lost at any later time is replaced.
This pool replaces it in both cases. A child that fails to load the pipeline still stops the worker
(``workers.service.app``: the failure file and exit code 3); only a child that died is replaced.
"""

from __future__ import annotations

import logging

from celery.concurrency.prefork import TaskPool

logger = logging.getLogger(__name__)


class FleetTaskPool(TaskPool):  # type: ignore[misc]
    def did_start_ok(self) -> bool:
        if super().did_start_ok():  # also reaps the children that exited
            return True
        logger.warning("the pool child exited before the worker first reached Redis; starting another")
        self.maintain_pool()
        return True
