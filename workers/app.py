"""The Celery side of a worker: the app, its one task, and loading the pipeline in the pool child.

The task is a thin adapter: decode the message, hand it to the engine, map errors to queue actions
(job errors fail the items, transient errors retry with backoff, worker errors stop the worker).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from fluxfleet.celery_config import make_celery
from fluxfleet.errors import StorageError, TransientError
from fluxfleet.jobs import JobStore
from fluxfleet.keys import TASK_GENERATE
from fluxfleet.presets import Preset, effective_defaults
from fluxfleet.schema import TaskPayload
from fluxfleet.settings import Settings
from fluxfleet.storage import open_storage
from workers.metrics import retry_reason

logger = logging.getLogger(__name__)

RETRY_BACKOFF_S = (2, 5, 15, 30, 60)


class Runtime:
    """What the pool child holds for its whole life: the engine around the loaded pipeline."""

    engine: Any = None
    failure_file: Path | None = None


runtime = Runtime()


def worker_name(preset: Preset, gpu: str) -> str:
    return f"{preset.name}-gpu{gpu.replace(',', '_')}@{socket.gethostname()}"


def start_engine(settings: Settings, preset: Preset) -> Any:
    """Load, warm up and wrap the pipeline; runs in the process that owns the GPU."""
    from workers.engine import Engine
    from workers.generation import pipeline_generate
    from workers.loading import load_pipeline, warm_up
    from workers.metrics import child_observer

    observer = child_observer(settings, preset)
    loaded = load_pipeline(preset, settings)
    if settings.worker.warmup:
        warm_up(loaded, preset, effective_defaults(preset, settings))
    observer.pipeline_ready(loaded)
    return Engine(
        generate=pipeline_generate(loaded, observer),
        observer=observer,
        preset=preset,
        model=loaded.model,
        settings=settings,
        storage=open_storage(settings.storage),
        jobs=JobStore.from_settings(settings.broker),
        worker_name=worker_name(preset, settings.worker.gpu),
        gpu=settings.worker.gpu,
    )


def build_app(settings: Settings, preset: Preset, engine_factory: Any = start_engine) -> Celery:
    app = make_celery(settings, [preset.name], name=f"fluxfleet-{preset.name}")

    @worker_process_init.connect(weak=False)
    def load_in_child(**_: Any) -> None:
        try:
            runtime.engine = engine_factory(settings, preset)
        except BaseException as e:
            logger.exception("worker cannot serve preset %s", preset.name)
            if runtime.failure_file:
                runtime.failure_file.write_text(f"{type(e).__name__}: {e}\n")
            # Ask the parent to stop consuming (its reserved message goes back to the queue unacked).
            os.kill(os.getppid(), signal.SIGTERM)
            os._exit(3)
        logger.info("worker ready: preset %s", preset.name)
        if settings.worker.ready_file is not None:
            # Readiness only after warm-up: probes (Kubernetes, `fluxfleet up`) wait for this file.
            settings.worker.ready_file.parent.mkdir(parents=True, exist_ok=True)
            settings.worker.ready_file.write_text(f"{os.getpid()}\n")

    @worker_process_shutdown.connect(weak=False)
    def drain_uploads(**_: Any) -> None:
        if runtime.engine is not None:
            runtime.engine.uploads.shutdown(wait=True)

    @app.task(name=TASK_GENERATE, bind=True, acks_late=True)
    def generate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        task = TaskPayload.model_validate(payload)
        try:
            outcome = runtime.engine.run(task)
        except SoftTimeLimitExceeded:
            logger.error("task %s hit the soft time limit; its unfinished items go back", task.task_id)
            raise
        except (TransientError, OSError) as e:
            retries = self.request.retries
            if retries >= len(RETRY_BACKOFF_S):
                raise
            error = e if isinstance(e, TransientError) else StorageError(str(e))
            logger.warning("task %s: %s; retry %d", task.task_id, error, retries + 1)
            runtime.engine.observer.task_retry(retry_reason(error))
            raise self.retry(exc=error, countdown=RETRY_BACKOFF_S[retries]) from e
        return {"generated": outcome.generated, "skipped": outcome.skipped, "failed": outcome.failed}

    return app
