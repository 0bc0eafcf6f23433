"""The Celery side of a worker: the app, its one task, and loading the pipeline in the pool child.

The task is a thin adapter: decode the message, hand it to the engine, map errors to queue actions
(job errors fail the items, transient errors retry with backoff, worker errors stop the worker).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown
from celery.worker.consumer import Consumer

from fluxfleet import deadletter, retry
from fluxfleet.celery_config import make_celery
from fluxfleet.errors import BrokerUnavailable, FluxfleetError, PermanentStorageError, StorageError, TransientError
from fluxfleet.jobs import JobStore, redis_client
from fluxfleet.keys import TASK_GENERATE
from fluxfleet.presets import Preset
from fluxfleet.schema import TaskPayload
from fluxfleet.settings import Settings
from fluxfleet.storage import open_storage
from workers.service.identity import worker_name
from workers.service.metrics import retry_reason
from workers.service.requeue import retry_or_requeue
from workers.service.timeouts import request_class
from workers.service.transport import FleetTransport

logger = logging.getLogger(__name__)


class Runtime:
    """What the pool child holds for its whole life: the engine around the loaded pipeline."""

    engine: Any = None
    failure_file: Path | None = None
    settings: Settings | None = None
    rejections: redis.Redis | None = None


runtime = Runtime()


def _rejections() -> redis.Redis:
    """This process's client for counting refusals (redis-py re-makes its connections in a forked child)."""
    if runtime.rejections is None:
        assert runtime.settings is not None
        runtime.rejections = redis_client(runtime.settings.broker)
    return runtime.rejections


def refuse(reason: str, detail: str, raw: Any, queue: str = "") -> None:
    """Log a refused message, count it under ``reason`` and keep it in the dead-letter list; never raises."""
    logger.error("refused a message on queue %s: %s (%s)", queue or "?", detail, reason)
    if runtime.settings is None:
        return
    if not isinstance(raw, bytes | str):
        raw = json.dumps(raw, default=repr, ensure_ascii=False)
    try:
        deadletter.refuse(
            _rejections(), runtime.settings.broker.key_prefix, reason=reason, queue=queue, raw=raw, detail=detail
        )
    except Exception as e:
        logger.warning("could not count a refused message: %s", e)


def _queue_of(message: Any) -> str:
    info = getattr(message, "delivery_info", None)
    return str(info.get("routing_key") or "") if isinstance(info, dict) else ""


def _envelope_of(message: Any) -> Any:
    """What arrived: kombu's parsed envelope (its virtual transports keep it), else the body."""
    return getattr(message, "_raw", None) or getattr(message, "body", "")


class FleetConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, refusing (counted, dead-lettered, never run) every message that is not a
    ``fluxfleet.generate`` task it can read. ``workers.service.transport`` has already refused what kombu itself
    could not parse; these hooks catch what Celery refuses after it."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            headers = message.headers if isinstance(message.headers, dict) else {}
            name = headers.get("task")
            if name != TASK_GENERATE:
                # Celery's built-in tasks (celery.group, celery.chord, ...) are registered too: never run them.
                detail = f"no task {name!r} on a fluxfleet worker"
                refuse("unknown_task", detail, _envelope_of(message), _queue_of(message))
                return message.reject_log_error(logger, self.connection_errors)
            try:
                return handle(message)
            except self.connection_errors:
                raise
            except Exception as e:
                # Anything else Celery raises while reading one message would stop the worker ("Unrecoverable
                # error"): refuse that message instead.
                refuse("invalid_message", f"{type(e).__name__}: {e}", _envelope_of(message), _queue_of(message))
                if not message.acknowledged:
                    message.reject_log_error(logger, self.connection_errors)
                return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        from kombu.exceptions import ContentDisallowed

        reason = "content_type" if isinstance(exc, ContentDisallowed) else "undecodable"
        refuse(reason, str(exc), _envelope_of(message), _queue_of(message))
        # Celery logs it and acknowledges it: the body is never deserialized, so never executed.
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        from kombu.exceptions import ContentDisallowed

        reason = "content_type" if isinstance(exc, ContentDisallowed) else "invalid_message"
        refuse(reason, str(exc), _envelope_of(message), _queue_of(message))
        super().on_invalid_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        refuse("unknown_message", "not a task message", _envelope_of(message), _queue_of(message))
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        # Not Celery's own handler: that one stores a failure in the result backend, which fluxfleet disables.
        refuse("unknown_task", str(exc), _envelope_of(message), _queue_of(message))
        message.reject_log_error(logger, self.connection_errors)


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


def start_engine(settings: Settings, preset: Preset) -> Any:
    """Load, warm up and wrap the pipeline; runs in the process that owns the GPU."""
    from fluxfleet.errors import ModelLoadError
    from workers.pipeline.adapters import worker_adapters
    from workers.pipeline.build import build_pipeline
    from workers.pipeline.unused_packages import keep_unused_backends_out
    from workers.service.faults import Faults, with_faults
    from workers.service.metrics import child_observer
    from workers.tasks.engine import Engine
    from workers.tasks.generation import pipeline_generate

    keep_unused_backends_out(preset)  # before anything imports diffusers: seconds off the worker's start
    faults = Faults.from_env()
    observer = child_observer(settings, preset)
    if faults.load_fail:
        raise ModelLoadError(f"preset '{preset.name}': injected load failure (FLUXFLEET_TEST_FAULTS)")
    loaded = build_pipeline(preset, settings, warm=settings.worker.warmup)  # one warm-up per start
    observer.pipeline_ready(loaded)
    storage = open_storage(settings.storage)
    adapters = worker_adapters(loaded.pipe, settings, preset, storage)
    return Engine(
        generate=with_faults(
            pipeline_generate(loaded, observer, adapters, storage=lambda: storage, limits=settings.limits), faults
        ),
        observer=observer,
        preset=preset,
        model=loaded.model,
        settings=settings,
        storage=storage,
        jobs=JobStore.from_settings(settings.broker, patient=True),
        worker_name=worker_name(preset, settings.worker.gpu),
        gpu=settings.worker.gpu,
    )


def build_app(settings: Settings, preset: Preset, engine_factory: Any = start_engine) -> Celery:
    app = make_celery(settings, [preset.name], name=f"fluxfleet-{preset.name}")
    app.conf.worker_consumer = f"{FleetConsumer.__module__}:{FleetConsumer.__name__}"
    # kombu's Redis transport, checking each message before kombu parses it (workers/service/transport.py).
    app.conf.broker_transport = f"{FleetTransport.__module__}:{FleetTransport.__name__}"
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "fluxfleet_key_prefix": settings.broker.key_prefix,
        # A memory guard only: decode_payload applies the exact limit to the decoded payload.
        "fluxfleet_max_message_bytes": 4 * settings.limits.max_payload_bytes + 2**20,
    }
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
    def generate(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # Any arguments are accepted here and checked below, so a wrong call is refused and counted
        # instead of failing inside Celery as a TypeError.
        queue = _queue_of(self.request)
        if len(args) != 1 or kwargs:
            detail = f"the task takes one payload argument, not {len(args)} and keyword arguments {sorted(kwargs)}"
            refuse("wrong_arguments", detail, {"args": args, "kwargs": kwargs}, queue)
            return {"rejected": True}
        decoded = decode_payload(args[0], settings, preset, runtime.engine.model)
        if isinstance(decoded, Refusal):
            refuse(decoded.reason, decoded.detail, args[0], queue)
            fail_submitted(decoded)
            return {"rejected": True}
        task = decoded
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
            retry_or_requeue(self, error, countdown, retry.TASK_RETRIES)  # never returns
        except Exception as e:
            # A fault nobody planned for (a library bug, a CUDA error): the items still get an outcome,
            # or the job would wait for them forever.
            logger.exception("task %s failed", task.task_id)
            reason = f"the worker failed on this task: {type(e).__name__}: {e}"
            failed = runtime.engine.fail_unfinished(task, reason, "error")
            return {"generated": 0, "skipped": 0, "failed": failed}
        return {"generated": outcome.generated, "skipped": outcome.skipped, "failed": outcome.failed}

    return app


@dataclass(frozen=True)
class Refusal:
    """Why a task is not run: ``reason`` is its label in ``<prefix>:rejected``, ``detail`` one sentence,
    ``task`` the payload when it parsed."""

    reason: str
    detail: str
    task: TaskPayload | None = None


def decode_payload(payload: Any, settings: Settings, preset: Preset, model: str | None = None) -> TaskPayload | Refusal:
    """The task's payload, or why it is refused: over a limit (``FLUXFLEET_LIMITS__*``, the preset's
    ``max_items_per_task``), against the schema, or for another preset or model than this worker's
    (``model``: what it loaded)."""
    if not isinstance(payload, dict):
        return Refusal("invalid", f"the task payload is a {type(payload).__name__}, not an object")
    try:
        size = len(json.dumps(payload, separators=(",", ":")))
    except (TypeError, ValueError) as e:  # kombu's JSON hooks can decode tagged values into objects
        return Refusal("invalid", f"the task payload holds a value that is not plain JSON ({e})")
    limit = settings.limits.max_payload_bytes
    if size > limit:
        return Refusal(
            "too_large", f"a task of {size} bytes, over the limit of {limit} (FLUXFLEET_LIMITS__MAX_PAYLOAD_BYTES)"
        )
    try:
        task = TaskPayload.model_validate(payload)
    except (ValueError, FluxfleetError) as e:  # pydantic's ValidationError is a ValueError
        return Refusal("invalid", f"invalid task payload: {e}")
    if task.preset != preset.name:
        return Refusal("wrong_preset", f"a task for preset {task.preset!r} reached a {preset.name!r} worker", task)
    if model is not None and task.model != model:
        return Refusal(
            "wrong_model",
            f"a task for model {task.model!r} reached a worker that loaded {model!r} (preset {preset.name!r}); "
            "the producer and the worker must agree on the preset's model and FLUXFLEET_MODEL_DIR",
            task,
        )
    if len(task.items) > preset.max_items_per_task:
        return Refusal(
            "too_many_items",
            f"a task of {len(task.items)} items, over preset {preset.name!r}'s max_items_per_task of "
            f"{preset.max_items_per_task}",
            task,
        )
    return task


def fail_submitted(refusal: Refusal) -> None:
    """Fail the items of a refused task that its job really holds (the producer submitted exactly it), with
    the reason, so that job still finishes; a task no job holds changes nothing."""
    task, engine = refusal.task, runtime.engine
    if task is None or engine is None:
        return
    try:
        if engine.jobs.task_payload(task.job_id, task.task_id) != task:
            return
        failed = engine.fail_unfinished(task, refusal.detail, "invalid")
        logger.error("task %s of job %s refused; %d items failed", task.task_id, task.job_id, failed)
    except Exception:  # counted and dead-lettered already; its items stay without an outcome
        logger.exception("could not fail the items of refused task %s", task.task_id)
