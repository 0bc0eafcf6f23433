"""The generation loop, independent of Celery: check, generate, encode, store, record.

A task's items are generated in pipeline calls of ``preset.batch_size``; each finished image is
encoded and uploaded on a background thread while the next call runs. The task returns only after
its uploads are stored and recorded, so an acknowledged task never leaves an image behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fluxfleet.errors import JobError, ValidationError
from fluxfleet.jobs import JobStore
from fluxfleet.keys import image_key, item_key, record_key
from fluxfleet.manifest import write_manifest
from fluxfleet.presets import Preset
from fluxfleet.schema import Item, ItemFailure, ItemRecord, TaskPayload, Timings
from fluxfleet.settings import Settings
from fluxfleet.storage import Storage
from fluxfleet.validation import TokenCounter, validate_params, validate_prompt
from workers.observer import Observer
from workers.png import encode_png

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list[Item], Callable[[], bool]], list[Any]]
"""Makes one image per item; calls its second argument between steps and stops if it returns True."""


class Interrupted(Exception):
    """Raised inside a pipeline call when the job was cancelled or the task must stop."""


@dataclass
class TaskOutcome:
    generated: int = 0
    skipped: int = 0
    failed: int = 0
    cancelled: int = 0
    already_done: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Engine:
    def __init__(
        self,
        *,
        generate: GenerateFn,
        preset: Preset,
        model: str,
        settings: Settings,
        storage: Storage,
        jobs: JobStore,
        worker_name: str,
        gpu: str,
        observer: Observer | None = None,
    ) -> None:
        self.generate = generate
        self.preset = preset
        self.model = model
        self.settings = settings
        self.storage = storage
        self.jobs = jobs
        self.worker_name = worker_name
        self.gpu = gpu
        self.observer = observer or Observer()
        self.counter = TokenCounter(model)
        self.uploads = ThreadPoolExecutor(settings.storage.upload_threads, thread_name_prefix="upload")
        self.stop_requested = threading.Event()

    # -- checks (never trust the queue) -------------------------------------------------------
    def _check(self, payload: TaskPayload) -> None:
        if payload.preset != self.preset.name:
            raise ValidationError(f"task for preset '{payload.preset}' reached a '{self.preset.name}' worker")
        for item in payload.items:
            where = item.source or f"item {item.index}"
            validate_params(item.params, self.settings.limits, where)
            validate_prompt(item.prompt, item.params.max_sequence_length, self.counter, where)
            expected = item_key(
                model=payload.model, preset=payload.preset, prompt=item.prompt, seed=item.seed, params=item.params
            )
            if expected != item.key:
                raise ValidationError("item key does not match its request", where=where, field="key")

    def _fail_all(self, payload: TaskPayload, items: list[Item], reason: str, label: str) -> None:
        now = time.time()
        for item in items:
            self.observer.item_failed(label)
            self.jobs.record_failed(
                ItemFailure(job_id=payload.job_id, index=item.index, key=item.key, reason=reason, finished_at=now)
            )

    # -- the task -----------------------------------------------------------------------------
    def run(self, payload: TaskPayload) -> TaskOutcome:
        outcome = TaskOutcome()
        received = time.time()
        queue_wait = max(0.0, received - payload.enqueued_at)
        self.observer.stage("queue_wait", queue_wait, len(payload.items))
        pending = [i for i in payload.items if not self.jobs.is_finished(payload.job_id, i.key)]
        outcome.already_done = len(payload.items) - len(pending)
        if not pending:
            self._finish(payload.job_id)
            return outcome
        try:
            self._check(payload)
        except JobError as e:
            self._fail_all(payload, pending, str(e), "invalid")
            outcome.failed = len(pending)
            self._finish(payload.job_id)
            return outcome

        attempt = self.jobs.start_attempt(payload.task_id)
        if attempt > self.settings.worker.max_attempts:
            self._fail_all(
                payload,
                pending,
                f"gave up after {attempt - 1} attempts: the worker died or timed out each time",
                "attempts",
            )
            outcome.failed = len(pending)
            self._finish(payload.job_id)
            return outcome

        to_generate: list[Item] = []
        for item in pending:
            if self.storage.exists(image_key(item.key)):
                self._record_existing(payload, item, queue_wait)
                outcome.skipped += 1
            else:
                to_generate.append(item)

        futures: list[Future[None]] = []
        try:
            for batch in chunks(to_generate, self.preset.batch_size):
                if self._should_stop(payload.job_id):
                    break
                started = time.perf_counter()
                images = self.generate(batch, lambda: self._should_stop(payload.job_id))
                generate_s = (time.perf_counter() - started) / len(batch)
                for item, image in zip(batch, images, strict=True):
                    timings = Timings(queue_wait_s=queue_wait, generate_s=generate_s)
                    futures.append(self.uploads.submit(self._store, payload, item, image, timings))
                outcome.generated += len(batch)
        except Interrupted:
            logger.info("task %s interrupted", payload.task_id)
        finally:
            # Every image handed to an upload thread is stored (or its error raised) before returning.
            for future in futures:
                future.result()

        leftover = [i for i in to_generate if not self.jobs.is_finished(payload.job_id, i.key)]
        if leftover and self.jobs.state(payload.job_id) in ("cancelled", "aborted"):
            self.jobs.record_cancelled(payload.job_id, (i.key for i in leftover))
            outcome.cancelled = len(leftover)
        self._finish(payload.job_id)
        return outcome

    def _should_stop(self, job_id: str) -> bool:
        return self.stop_requested.is_set() or self.jobs.state(job_id) in ("cancelled", "aborted")

    def _record(self, payload: TaskPayload, item: Item, sha256: str, timings: Timings, skipped: bool) -> None:
        record = ItemRecord(
            job_id=payload.job_id,
            index=item.index,
            key=item.key,
            image_key=image_key(item.key),
            location=self.storage.location(image_key(item.key)),
            prompt=item.prompt,
            seed=item.seed,
            params=item.params,
            preset=payload.preset,
            model=payload.model,
            worker=self.worker_name,
            gpu=self.gpu,
            timings=timings,
            sha256=sha256,
            skipped=skipped,
            finished_at=time.time(),
        )
        # The record is written after the image, so a record always points at a stored image.
        self.storage.put_if_absent(
            record_key(payload.job_id, item.key), record.model_dump_json().encode(), "application/json"
        )
        if self.jobs.record_done(record):
            self.observer.item_done(
                timings.queue_wait_s + timings.generate_s + timings.encode_s + timings.upload_s, skipped
            )

    def _record_existing(self, payload: TaskPayload, item: Item, queue_wait: float) -> None:
        import hashlib

        sha256 = hashlib.sha256(self.storage.get(image_key(item.key))).hexdigest()
        self._record(payload, item, sha256, Timings(queue_wait_s=queue_wait), skipped=True)

    def _store(self, payload: TaskPayload, item: Item, image: Any, timings: Timings) -> None:
        started = time.perf_counter()
        data, sha256 = encode_png(image, item, payload.preset, payload.model)
        timings.encode_s = time.perf_counter() - started
        self.observer.stage("png_encode", timings.encode_s)
        started = time.perf_counter()
        self.storage.put_if_absent(image_key(item.key), data, "image/png")
        timings.upload_s = time.perf_counter() - started
        self.observer.stage("upload", timings.upload_s)
        self._record(payload, item, sha256, timings, skipped=False)
        logger.debug("stored %s (%s)", item.key, payload.job_id)

    def _finish(self, job_id: str) -> None:
        if self.jobs.finish_if_complete(job_id):
            location = write_manifest(self.storage, self.jobs, job_id)
            logger.info("job %s complete; manifest at %s", job_id, location)
