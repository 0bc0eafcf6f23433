"""The Celery side of a worker: the app, its one task, and loading the pipeline in the pool child.

The task is a thin adapter: decode the message, hand it to the engine, map errors to queue actions
(job errors fail the items, transient errors retry with backoff, worker errors stop the worker).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown
from celery.worker.consumer import Consumer

from fluxfleet import retry
from fluxfleet.celery_config import make_celery
from fluxfleet.errors import BrokerUnavailable, FluxfleetError, PermanentStorageError, StorageError, TransientError
from fluxfleet.jobs import JobStore
from fluxfleet.keys import TASK_GENERATE
from fluxfleet.presets import Preset, effective_defaults
from fluxfleet.schema import TaskPayload
from fluxfleet.settings import Settings
from fluxfleet.storage import open_storage
from workers.metrics import retry_reason
from workers.timeouts import request_class

logger = logging.getLogger(__name__)


class Runtime:
    """What the pool child holds for its whole life: the engine around the loaded pipeline."""

    engine: Any = None
    failure_file: Path | None = None
    settings: Settings | None = None


runtime = Runtime()


def count_rejected(reason: str) -> None:
    """Count a refused message in Redis (``fluxfleet:rejected``); never raises."""
    if runtime.settings is None:
        return
    try:
        JobStore.from_settings(runtime.settings.broker).count_rejected(reason)
    except Exception as e:
        logger.warning("could not count a rejected message: %s", e)


class FleetConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, counting the messages it refuses (pickle and other content types, malformed)."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        from kombu.exceptions import ContentDisallowed

        reason = "content_type" if isinstance(exc, ContentDisallowed) else "undecodable"
        count_rejected(reason)
        # Celery logs it and acknowledges it: the body is never deserialized, so never executed.
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        from kombu.exceptions import ContentDisallowed

        count_rejected("content_type" if isinstance(exc, ContentDisallowed) else "invalid_message")
        super().on_invalid_task(body, message, exc)


def watch_gpu_memory(limit_bytes: int, rss_limit_kib: int) -> None:
    """Make the pool's between-tasks memory check also recycle the child over ``limit_bytes`` of GPU
    memory reserved by torch (billiard compares ``mem_rss()`` with ``worker_max_memory_per_child``)."""
    import billiard.pool
    import torch

    host_rss = billiard.pool.mem_rss

    def rss_or_gpu() -> int:
        if torch.cuda.is_available():
            reserved = sum(torch.cuda.memory_reserved(d) for d in range(torch.cuda.device_count()))
            if reserved > limit_bytes:
                logger.warning("GPU reserved memory %d bytes is over the limit of %d; recycling", reserved, limit_bytes)
                return 2**62
        return int(host_rss()) if rss_limit_kib else 0

    billiard.pool.mem_rss = rss_or_gpu


def worker_name(preset: Preset, gpu: str) -> str:
    return f"{preset.name}-gpu{gpu.replace(',', '_')}@{socket.gethostname()}"


def start_engine(settings: Settings, preset: Preset) -> Any:
    """Load, warm up and wrap the pipeline; runs in the process that owns the GPU."""
    from fluxfleet.errors import ModelLoadError
    from workers.engine import Engine
    from workers.faults import Faults, with_faults
    from workers.generation import pipeline_generate
    from workers.loading import load_pipeline, warm_up
    from workers.metrics import child_observer
    from workers.unused_backends import keep_unused_backends_out

    keep_unused_backends_out(preset)  # before anything imports diffusers: seconds off the worker's start
    faults = Faults.from_env()
    observer = child_observer(settings, preset)
    if faults.load_fail:
        raise ModelLoadError(f"preset '{preset.name}': injected load failure (FLUXFLEET_TEST_FAULTS)")
    loaded = load_pipeline(preset, settings)
    if settings.worker.warmup:
        warm_up(loaded, preset, effective_defaults(preset, settings))
    observer.pipeline_ready(loaded)
    return Engine(
        generate=with_faults(pipeline_generate(loaded, observer), faults),
        observer=observer,
        preset=preset,
        model=loaded.model,
        settings=settings,
        storage=open_storage(settings.storage),
        jobs=JobStore.from_settings(settings.broker, patient=True),
        worker_name=worker_name(preset, settings.worker.gpu),
        gpu=settings.worker.gpu,
    )


def build_app(settings: Settings, preset: Preset, engine_factory: Any = start_engine) -> Celery:
    app = make_celery(settings, [preset.name], name=f"fluxfleet-{preset.name}")
    app.conf.worker_consumer = f"{FleetConsumer.__module__}:{FleetConsumer.__name__}"
    runtime.settings = settings

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
        if settings.worker.max_gpu_reserved_bytes:
            watch_gpu_memory(settings.worker.max_gpu_reserved_bytes, settings.worker.max_rss_bytes // 1024)
        logger.info("worker ready: preset %s", preset.name)
        if settings.worker.ready_file is not None:
            # Readiness only after warm-up: probes (Kubernetes, `fluxfleet up`) wait for this file.
            settings.worker.ready_file.parent.mkdir(parents=True, exist_ok=True)
            settings.worker.ready_file.write_text(f"{os.getpid()}\n")

    @worker_process_shutdown.connect(weak=False)
    def drain_uploads(**_: Any) -> None:
        if runtime.engine is not None:
            runtime.engine.uploads.shutdown(wait=True)

    @app.task(name=TASK_GENERATE, bind=True, acks_late=True, Request=request_class(settings))
    def generate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        task = decode_payload(payload, settings)
        if task is None:
            return {"rejected": True}
        try:
            outcome = runtime.engine.run(task, retries=self.request.retries)
        except SoftTimeLimitExceeded:
            # Normally the engine stops between denoising steps first; this is the backstop.
            limit = settings.worker.task_soft_time_limit_s
            failed = runtime.engine.fail_unfinished(
                task, f"the task ran into its soft time limit ({limit} s) before this item was stored", "timeout"
            )
            logger.error("task %s hit the soft time limit; %d unfinished items failed", task.task_id, failed)
            return {"generated": 0, "skipped": 0, "failed": failed}
        except (TransientError, PermanentStorageError, OSError) as e:
            # The one retry policy (fluxfleet.retry): a permanent fault or the last attempt fails every
            # unfinished item with the reason, so the job still ends; anything else comes back later.
            retries = self.request.retries
            if retry.is_permanent(e) or retries >= retry.TASK_RETRIES:
                reason = str(e) if retry.is_permanent(e) else retry.gave_up_reason(e, retries + 1)
                label = "error" if isinstance(e, BrokerUnavailable) else "storage"
                failed = runtime.engine.fail_unfinished(task, reason, label)
                logger.error("task %s: %d unfinished items failed: %s", task.task_id, failed, reason)
                return {"generated": 0, "skipped": 0, "failed": failed}
            error = e if isinstance(e, TransientError) else StorageError(str(e))
            countdown = retry.countdown(retries, settings.broker.visibility_timeout_s)
            logger.warning(
                "task %s: %s; retry %d of %d in %g s", task.task_id, error, retries + 1, retry.TASK_RETRIES, countdown
            )
            runtime.engine.observer.task_retry(retry_reason(error))
            raise self.retry(exc=error, countdown=countdown, max_retries=retry.TASK_RETRIES) from e
        return {"generated": outcome.generated, "skipped": outcome.skipped, "failed": outcome.failed}

    return app


def decode_payload(payload: Any, settings: Settings) -> TaskPayload | None:
    """The task's payload, or None (logged and counted) when it breaks a limit or the schema."""
    size = len(json.dumps(payload, separators=(",", ":")))
    limit = settings.limits.max_payload_bytes
    if size > limit:
        logger.error(
            "rejected a task of %d bytes, over the limit of %d (FLUXFLEET_LIMITS__MAX_PAYLOAD_BYTES)", size, limit
        )
        count_rejected("too_large")
        return None
    try:
        return TaskPayload.model_validate(payload)
    except (ValueError, FluxfleetError) as e:  # pydantic's ValidationError is a ValueError
        logger.error("rejected an invalid task payload: %s", e)
        count_rejected("invalid")
        return None
