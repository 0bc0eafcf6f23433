"""The generation loop, independent of Celery: check, generate, encode, store, record.

A task's items are generated in pipeline calls of ``preset.batch_size``; each finished image is
encoded and uploaded on a background thread while the next call runs. The task returns only after
its uploads are stored and recorded, so an acknowledged task never leaves an image behind.

Faults, and what the engine does about them:

- out of memory in a pipeline call: free memory, retry the batch in halves; a single item that
  still does not fit fails with the reason;
- the process died during an item's generation (counted in Redis: starts minus ends): the next
  attempt runs the task's items one at a time, and an item that killed ``max_attempts`` processes
  fails with the reason, so the other items still finish;
- the soft time limit: checked between denoising steps, so the call stops before decoding and no
  partial image is stored; the unfinished items fail with the reason;
- storage: a permanent refusal (``PermanentStorageError``) fails its item at once with the reason and
  ends the task (its ungenerated items fail with it); a transient error is raised once every upload
  has ended, for the task to retry (``fluxfleet.retry``). Outcomes are recorded by ``fluxfleet.outcomes``.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fluxfleet.errors import JobError, PermanentStorageError
from fluxfleet.jobs import JobStore
from fluxfleet.keys import image_key
from fluxfleet.outcomes import Outcomes
from fluxfleet.presets import Preset
from fluxfleet.schema import Item, ItemRecord, TaskPayload, Timings
from fluxfleet.settings import Settings
from fluxfleet.storage import Storage
from workers.pipeline.img2img import InputsRefused
from workers.tasks.admission import Admission
from workers.tasks.observer import Observer
from workers.tasks.png import encode_png
from workers.tasks.uploads import Uploads

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list[Item], Callable[[], bool]], list[Any]]
"""Makes one image per item; calls its second argument between steps and stops if it returns True."""


STEPS_INFO = "fluxfleet_steps"
"""``image.info`` key where the generate function leaves (steps computed, steps reused) of the image's run."""

CANCEL_POLL_S = 1.0
"""Seconds between reads of a running job's state (cancelled or not) during generation."""


class Interrupted(Exception):
    """Raised inside a pipeline call when the job was cancelled or the task must stop."""


def is_out_of_memory(error: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (CUDA, or raised on purpose by the fault hooks)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


def free_memory() -> None:
    """Drop what a failed pipeline call left behind: Python garbage, then the CUDA cache."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


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
        self._stopped_jobs: dict[str, tuple[float, bool]] = {}
        self.admission = Admission(preset, model, settings, jobs)
        self.uploads = Uploads(settings.storage.upload_threads)
        self.stop_requested = threading.Event()
        self.deadline: float | None = None
        self.outcomes = Outcomes(storage, jobs)
        self.refused: PermanentStorageError | None = None
        soft = settings.worker.task_soft_time_limit_s
        # Stop between steps a little before Celery's own soft limit fires anywhere in the code.
        self.soft_limit_s = soft - min(max(1.0, 0.05 * soft), soft / 2)

    def _fail_all(self, payload: TaskPayload, items: list[Item], reason: str, label: str) -> None:
        for item in items:
            logger.warning("job %s item %d failed: %s", payload.job_id, item.index, reason)
            self.observer.item_failed(label)
        self.outcomes.failed(payload.job_id, items, reason)

    def fail_unfinished(self, payload: TaskPayload, reason: str, label: str) -> int:
        """Wait for in-flight uploads, then fail every item of the task without an outcome."""
        try:
            self.uploads.drain()
        except Exception as e:  # the item stays without an outcome and is failed below
            logger.warning("upload failed while abandoning task %s: %s", payload.task_id, e)
        unfinished = self._unfinished(payload.job_id, payload.items)
        self._fail_all(payload, unfinished, reason, label)
        self._finish(payload.job_id)
        return len(unfinished)

    def _refuse(self, payload: TaskPayload, item: Item, error: PermanentStorageError) -> None:
        """Storage refused this item for good: it fails now, and the task generates nothing more."""
        self.refused = error
        self._fail_all(payload, [item], str(error), "storage")

    def _unfinished(self, job_id: str, items: list[Item]) -> list[Item]:
        """The items without an outcome yet, asked of Redis in one round trip for the whole task."""
        finished = self.jobs.are_finished(job_id, [i.key for i in items])
        return [item for item, done in zip(items, finished, strict=True) if not done]

    # -- the task -----------------------------------------------------------------------------
    def run(self, payload: TaskPayload, retries: int = 0) -> TaskOutcome:
        """Generate, store and record the task's items without an outcome.

        ``retries``: how often the retry policy sent this task back (starts that were not deaths).
        Raises a transient error for the task to retry; records every other outcome."""
        outcome = TaskOutcome()
        self.refused = None
        self.deadline = time.monotonic() + self.soft_limit_s
        received = time.time()
        queue_wait = max(0.0, received - payload.enqueued_at)
        self.observer.stage("queue_wait", queue_wait, len(payload.items))
        if not self.admission.held_by_job(payload):
            return outcome
        pending = self._unfinished(payload.job_id, payload.items)
        outcome.already_done = len(payload.items) - len(pending)
        if not pending:
            self._finish(payload.job_id)
            return outcome
        try:
            self.admission.check(payload)
        except JobError as e:
            self._fail_all(payload, pending, str(e), "invalid")
            outcome.failed = len(pending)
            self._finish(payload.job_id)
            return outcome

        attempt = self.jobs.start_attempt(payload.task_id)
        max_attempts = self.settings.worker.max_attempts
        # Per-item death counts catch a poison item; this cap is the backstop for deaths elsewhere.
        if attempt - retries > max_attempts * (len(payload.items) + 1):
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
            try:
                if self.storage.exists(image_key(item.key)):
                    self._record_existing(payload, item, queue_wait)
                    outcome.skipped += 1
                else:
                    to_generate.append(item)
            except PermanentStorageError as e:
                self._refuse(payload, item, e)
                outcome.failed += 1
                break

        deaths = self.jobs.item_deaths(payload.job_id, [i.key for i in to_generate])
        doomed = [i for i, d in zip(to_generate, deaths, strict=True) if d >= max_attempts]
        for item in doomed:
            self._fail_all(
                payload,
                [item],
                f"the worker process died {max_attempts} times while generating this item "
                "(a crash, a kill by the OOM killer, or the hard time limit); not retried",
                "attempts",
            )
        outcome.failed += len(doomed)
        to_generate = [i for i, d in zip(to_generate, deaths, strict=True) if d < max_attempts]
        # After a death, one item per call: the poison item dies alone and the others finish.
        batch_size = 1 if any(deaths) else self.preset.batch_size

        try:
            for batch in chunks(to_generate, batch_size):
                if self.refused is not None or self._should_stop(payload.job_id):
                    break
                for item, image, generate_s in self._generate(payload, batch, outcome):
                    timings = Timings(queue_wait_s=queue_wait, generate_s=generate_s)
                    self.uploads.submit(self._store, payload, item, image, timings)
                    outcome.generated += 1
                if batch_size == 1 and any(deaths):
                    # The next item may kill the process: store this one first.
                    outcome.failed += self.uploads.drain()
        except Interrupted:
            logger.info("task %s interrupted", payload.task_id)
        finally:
            # Every image handed to an upload thread is stored or failed (or its error raised) before
            # returning; if this wait is interrupted (Celery's soft limit), ``fail_unfinished`` waits.
            self.deadline = None
            outcome.failed += self.uploads.drain()

        leftover = self._unfinished(payload.job_id, pending)
        if leftover and self.refused is not None:
            self._fail_all(
                payload,
                leftover,
                f"not generated: storage refused an earlier item of this task for good: {self.refused}",
                "storage",
            )
            outcome.failed += len(leftover)
        elif leftover and self.jobs.state(payload.job_id) in ("cancelled", "aborted"):
            self.jobs.record_cancelled(payload.job_id, (i.key for i in leftover))
            outcome.cancelled = len(leftover)
        elif leftover:
            limit = self.settings.worker.task_soft_time_limit_s
            self._fail_all(
                payload,
                leftover,
                f"the task ran into its soft time limit ({limit} s) before this item was generated; raise "
                "FLUXFLEET_WORKER__TASK_SOFT_TIME_LIMIT_S (and the hard limit and visibility timeout) or "
                "lower the preset's max_items_per_task",
                "timeout",
            )
            outcome.failed += len(leftover)
        self._finish(payload.job_id)
        return outcome

    def _generate(self, payload: TaskPayload, batch: list[Item], outcome: TaskOutcome) -> list[tuple[Item, Any, float]]:
        """(item, image, seconds per image) for the batch; out of memory splits it, down to one item."""
        keys = [i.key for i in batch]
        self.jobs.start_items(payload.job_id, keys)
        started = time.perf_counter()
        try:
            images = self.generate(batch, lambda: self._should_stop(payload.job_id))
        except BaseException as e:
            self.jobs.end_items(payload.job_id, keys)  # the process survived this call
            if isinstance(e, InputsRefused):  # those items fail with the reason; the batch's others are generated
                refused = [i for i in batch if i.index in e.reasons]
                for item in refused:
                    self._fail_all(payload, [item], e.reasons[item.index], "input")
                outcome.failed += len(refused)
                rest = [i for i in batch if i.index not in e.reasons]
                return self._generate(payload, rest, outcome) if rest else []
            if isinstance(e, JobError):  # the batch's request cannot be served (an adapter file): its items fail
                self._fail_all(payload, batch, str(e), "invalid")
                outcome.failed += len(batch)
                return []
            if not is_out_of_memory(e):
                raise
            del e  # its traceback holds the failed call's tensors
            free_memory()
            if len(batch) > 1:
                half = (len(batch) + 1) // 2
                logger.warning(
                    "out of memory at batch size %d; retrying as %d + %d", len(batch), half, len(batch) - half
                )
                self.observer.task_retry("oom")
                return self._generate(payload, batch[:half], outcome) + self._generate(payload, batch[half:], outcome)
            self._fail_all(
                payload,
                batch,
                "out of GPU memory generating this item alone (batch size 1); use a preset with less memory "
                "(quantized or offloaded) or a smaller image size",
                "oom",
            )
            outcome.failed += 1
            return []
        self.jobs.end_items(payload.job_id, keys)
        generate_s = (time.perf_counter() - started) / len(batch)
        return [(item, image, generate_s) for item, image in zip(batch, images, strict=True)]

    def _should_stop(self, job_id: str) -> bool:
        now = time.monotonic()
        if self.stop_requested.is_set() or (self.deadline is not None and now > self.deadline):
            return True
        # Called between every denoising step: read the job's state from Redis at most every
        # CANCEL_POLL_S, not once per step (a cancel still lands within a second).
        cached = self._stopped_jobs.get(job_id)
        if cached is not None and now - cached[0] < CANCEL_POLL_S:
            return cached[1]
        stopped = self.jobs.state(job_id) in ("cancelled", "aborted")
        self._stopped_jobs = {job_id: (now, stopped)}
        return stopped

    def _record(
        self,
        payload: TaskPayload,
        item: Item,
        sha256: str,
        timings: Timings,
        skipped: bool,
        steps: tuple[int, int] | None = None,
    ) -> None:
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
            steps_computed=steps[0] if steps else None,
            steps_reused=steps[1] if steps else None,
            finished_at=time.time(),
        )
        # The record is written after the image, so a record always points at a stored image.
        if self.outcomes.done(record):
            self.observer.item_done(
                timings.queue_wait_s + timings.generate_s + timings.encode_s + timings.upload_s, skipped
            )

    def _record_existing(self, payload: TaskPayload, item: Item, queue_wait: float) -> None:
        # The digest recorded at write time (S3: one HEAD), not a download of the whole image.
        sha256 = self.storage.digest(image_key(item.key))
        self._record(payload, item, sha256, Timings(queue_wait_s=queue_wait), skipped=True)

    def _store(self, payload: TaskPayload, item: Item, image: Any, timings: Timings) -> bool:
        """Encode, store and record one image (on an upload thread); False when storage refused it for
        good (the item is then recorded as failed). A transient storage error is raised."""
        try:
            started = time.perf_counter()
            data, sha256 = encode_png(image, item, payload.preset, payload.model)
            timings.encode_s = time.perf_counter() - started
            self.observer.stage("png_encode", timings.encode_s)
            started = time.perf_counter()
            key = image_key(item.key)
            if not self.storage.put_if_absent(key, data, "image/png", sha256):
                # Another attempt stored this key first (a redelivery, or the same item in another job):
                # the record describes the stored object, which may differ in bytes on another GPU.
                sha256 = self.storage.digest(key)
                logger.info("%s was already stored by another attempt; keeping that object", key)
            timings.upload_s = time.perf_counter() - started
            self.observer.stage("upload", timings.upload_s)
            steps = getattr(image, "info", {}).get(STEPS_INFO)
            self._record(payload, item, sha256, timings, skipped=False, steps=steps)
        except PermanentStorageError as e:
            self._refuse(payload, item, e)
            return False
        logger.debug("stored %s (%s)", item.key, payload.job_id)
        return True

    def _finish(self, job_id: str) -> None:
        self.outcomes.finish(job_id)
