"""The Python API: submit prompts, watch progress, read results.

Usage::

    client = Client.from_env()
    job = client.submit(["a red fox in snow", "a lighthouse at dusk"], preset="tiny", steps=4, width=64, height=64)
    job.wait(progress=True)
    for record in job.results():
        print(record.key, record.seed, record.location)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import redis

from fluxfleet.broker import broker_error
from fluxfleet.celery_config import make_celery
from fluxfleet.errors import (
    BrokerUnavailable,
    FluxfleetError,
    PermanentStorageError,
    StorageError,
    UnknownJobError,
    ValidationError,
)
from fluxfleet.jobs import JobStore
from fluxfleet.keys import TASK_GENERATE, check_job_id, job_spec_key, manifest_key, queue_name
from fluxfleet.manifest import write_manifest
from fluxfleet.presets import Preset, effective_defaults, load_preset
from fluxfleet.schema import Item, ItemFailure, ItemRecord, JobStatus, TaskPayload
from fluxfleet.settings import Settings
from fluxfleet.storage import Storage, open_storage
from fluxfleet.webhooks import check_webhook
from producer.adapters import resolve_adapters
from producer.batching import build_items, new_job_id, split_tasks
from producer.input_images import read_input_images
from producer.inputs import PromptSpec, prompt_specs, submit_arguments
from producer.stored import status_from_storage, stored_outcomes

logger = logging.getLogger(__name__)

PUBLISH_BATCH = 1000
"""Redis commands buffered before one pipelined flush while publishing."""

PromptsLike = Path | str | Sequence[str | PromptSpec | dict[str, Any]]


def _prompt_specs(prompts: PromptsLike) -> list[PromptSpec]:
    """Checked prompts (see ``producer.inputs.prompt_specs``): a file, one prompt, or a list."""
    return prompt_specs(prompts)


class Client:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.jobs = JobStore.from_settings(self.settings.broker)
        self._storage: Storage | None = None

    @classmethod
    def from_env(cls) -> Client:
        """Settings from ``FLUXFLEET_*`` environment variables."""
        return cls(Settings())

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.settings.storage)
        return self._storage

    def preset(self, name: str) -> Preset:
        return load_preset(name, self.settings.presets_dir)

    def submit(
        self,
        prompts: PromptsLike,
        *,
        preset: str,
        job_id: str | None = None,
        seed: int = 0,
        images_per_prompt: int = 1,
        webhook: str | None = None,
        **params: Any,
    ) -> Job:
        """Validate every item, record the job and enqueue its tasks; all or nothing.

        ``params`` are job defaults: width, height, steps, guidance, max_sequence_length (also as
        diffusers' ``num_inference_steps`` and ``guidance_scale``); ``None`` keeps the preset's. An unknown
        keyword, a value that is not exactly a number of its kind, or no prompts raise ``ValidationError``.
        ``adapters``: the items' default LoRA adapters (``fluxfleet.adapters``), e.g. ``"ink.safetensors@0.8"``.
        ``webhook``: an http(s) URL that gets one signed POST when the job ends (``fluxfleet.webhooks``).
        """
        if webhook is not None:
            webhook = check_webhook(webhook, self.settings.webhook)
        seed, images_per_prompt, job_params = submit_arguments(
            preset=preset, job_id=job_id, seed=seed, images_per_prompt=images_per_prompt, params=params
        )
        specs, job_params = read_input_images(
            _prompt_specs(prompts), job_params, storage=lambda: self.storage, limits=self.settings.limits
        )
        chosen = self.preset(preset)
        model = chosen.model_source(self.settings)
        job_adapters, adapters = resolve_adapters(specs, job_params, chosen, self.settings, lambda: self.storage)
        defaults = effective_defaults(chosen, self.settings).model_copy(update=job_params)
        items = build_items(
            specs,
            preset=chosen,
            model=model,
            defaults=defaults,
            limits=self.settings.limits,
            job_seed=seed,
            images_per_prompt=images_per_prompt,
            adapters=job_adapters,
            resolved_adapters=adapters,
        )
        self._check_limits(items)
        job_id = job_id or new_job_id()
        self.jobs.ping()
        # An 'aborted' job is a submit that failed half-way: its id may be submitted again.
        aborted = self.jobs.exists(job_id) and self.jobs.state(job_id) == "aborted"
        if self.jobs.exists(job_id) and not aborted:
            return self._already_submitted(job_id)
        tasks = split_tasks(items, job_id=job_id, preset=chosen, model=model)
        encoded = self._check_payload_sizes(tasks)
        # Storage before Redis: a job is recorded only once its results have somewhere to go, so an
        # unusable store leaves no record that would block the same command once the store is fixed.
        self._check_storage(job_id)
        if aborted and not self.jobs.clear_aborted(job_id):
            return self._already_submitted(job_id)  # another submit of this id got there first
        try:
            self.jobs.create(
                job_id=job_id, preset=chosen.name, model=model, tasks=tasks, encoded=encoded, webhook=webhook
            )
        except Exception as e:
            raise BrokerUnavailable(f"could not record job {job_id}: {e}") from e
        try:
            # The job as submitted, outside Redis: `status` and `submit --resume` read it if Redis loses it.
            spec: dict[str, Any] = {"job_id": job_id, "preset": chosen.name, "model": model, "webhook": webhook}
            spec["items"] = [i.model_dump() for i in items]
            self.storage.put(job_spec_key(job_id), json.dumps(spec).encode(), "application/json")
            self._publish(tasks, chosen.name)
        except Exception as e:
            # Already-published tasks see the 'aborted' state and generate nothing; the id stays free.
            self._safely_abort(job_id)
            if isinstance(e, StorageError | PermanentStorageError):
                raise type(e)(f"job {job_id} not submitted: {e}") from e
            raise BrokerUnavailable(f"job {job_id} not submitted: {e}") from e
        self.jobs.set_state(job_id, "running")
        return Job(self, job_id)

    def _already_submitted(self, job_id: str) -> Job:
        logger.info("job %s was already submitted; nothing enqueued", job_id)
        job = Job(self, job_id)
        job.already_submitted = True
        return job

    def _check_storage(self, job_id: str) -> None:
        """Raise the storage's error, naming the job, unless the store can be written."""
        try:
            self.storage.check()
        except (StorageError, PermanentStorageError) as e:
            raise type(e)(f"job {job_id} not submitted, nothing recorded: storage is not usable: {e}") from e

    def _check_limits(self, items: list[Item]) -> None:
        limits = self.settings.limits
        if len(items) > limits.max_images_per_job:
            raise ValidationError(
                f"{len(items)} images in one job, over the limit of {limits.max_images_per_job} "
                "(FLUXFLEET_LIMITS__MAX_IMAGES_PER_JOB); split the prompts file",
                field="images",
            )
        for item in items:
            if len(item.prompt) > limits.max_prompt_chars:
                raise ValidationError(
                    f"prompt is {len(item.prompt)} characters, over the limit of {limits.max_prompt_chars}",
                    where=item.source,
                    field="prompt",
                )

    def _check_payload_sizes(self, tasks: list[TaskPayload]) -> dict[str, str]:
        """Each task's JSON, checked against the payload limit; returned so the job store reuses it."""
        limit = self.settings.limits.max_payload_bytes
        encoded = {}
        for task in tasks:
            encoded[task.task_id] = payload = task.model_dump_json()
            size = len(payload)
            if size > limit:
                raise ValidationError(
                    f"task {task.task_id} would be {size} bytes, over the limit of {limit} "
                    "(FLUXFLEET_LIMITS__MAX_PAYLOAD_BYTES); shorten the prompts",
                    field="payload",
                )
        return encoded

    def _safely_abort(self, job_id: str) -> None:
        try:
            self.jobs.set_state(job_id, "aborted")
        except Exception:  # Redis is gone too; workers will find no running job state.
            logger.warning("could not mark job %s aborted", job_id)

    def _publish(self, tasks: Iterable[TaskPayload], preset: str) -> None:
        """Publish every task; kombu's Redis publish batch pipelines the LPUSHes (one round trip
        per thousand messages instead of one per message)."""
        app = make_celery(self.settings, [preset])
        queue = queue_name(preset)
        with app.producer_or_acquire() as producer, producer.batch(PUBLISH_BATCH):
            for task in tasks:
                app.send_task(
                    TASK_GENERATE,
                    args=[task.model_dump(mode="json")],
                    task_id=task.task_id,
                    queue=queue,
                    routing_key=queue,
                    producer=producer,
                    # A short repr: Celery's default walks the whole payload for every message.
                    argsrepr=f"<job {task.job_id}: {len(task.items)} items>",
                    kwargsrepr="{}",
                )

    def resume(self, job_id: str) -> int:
        """Re-enqueue every task with an item that has no outcome yet; returns how many tasks.

        A job Redis no longer knows (restarted without persistence) is rebuilt from its ``job.json``
        and the records in storage, and only the items without a stored outcome are enqueued.
        """
        return self.resume_items(job_id)[0]

    def resume_items(self, job_id: str) -> tuple[int, int]:
        """Like ``resume``; returns (tasks, items) enqueued."""
        check_job_id(job_id)
        self.jobs.ping()
        status = self.jobs.status(job_id)
        if status is None:
            return self._resume_from_storage(job_id)
        tasks = self.jobs.task_payloads(job_id)
        keys = [i.key for t in tasks for i in t.items]
        finished = dict(zip(keys, self.jobs.are_finished(job_id, keys), strict=True))  # one round trip
        missing = [t for t in tasks if not all(finished[i.key] for i in t.items)]
        if missing:
            self.jobs.reopen(job_id)
            self._publish(missing, status.preset)
        return len(missing), sum(len(t.items) for t in missing)

    def stored_outcomes(self, job_id: str) -> tuple[dict[str, Any], list[ItemRecord], list[ItemFailure]]:
        """(job spec, stored records, stored failures) from storage alone."""
        return stored_outcomes(self.storage, job_id)

    def _resume_from_storage(self, job_id: str) -> tuple[int, int]:
        spec, records, failures = self.stored_outcomes(job_id)
        items = [Item.model_validate(i) for i in spec["items"]]
        preset = self.preset(spec["preset"])
        done = {r.key for r in records}
        failed = {f.key for f in failures} - done
        tasks = split_tasks(items, job_id=job_id, preset=preset, model=spec["model"])
        self.jobs.create(
            job_id=job_id, preset=preset.name, model=spec["model"], tasks=tasks, webhook=spec.get("webhook")
        )
        self.jobs.restore(records, (f for f in failures if f.key in failed))  # one round trip
        missing_items = [i for i in items if i.key not in done and i.key not in failed]
        to_publish = split_tasks(missing_items, job_id=job_id, preset=preset, model=spec["model"])
        to_generate = len({i.key for i in missing_items})  # repeated requests share a key
        logger.info("job %s rebuilt from storage: %d stored, %d to generate", job_id, len(done), to_generate)
        if to_publish:
            self._publish(to_publish, preset.name)
        self.jobs.set_state(job_id, "running")
        # A job whose every item was stored completes (and gets its manifest) now.
        if self.jobs.finish_if_complete(job_id):
            write_manifest(self.storage, self.jobs, job_id)
        return len(to_publish), len(missing_items)

    def status_from_storage(self, job_id: str) -> JobStatus:
        """Status of a job Redis has lost: stored items are done, the rest are 'lost'."""
        return status_from_storage(self.storage, job_id)

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)


class Job:
    """A submitted job, read from fluxfleet's records."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id
        self.already_submitted = False

    def status(self) -> JobStatus:
        """From Redis; from storage (state 'lost', with ``missing`` items) when Redis lost the job."""
        status = self.client.jobs.status(self.id)
        if status is None:
            return self.client.status_from_storage(self.id)
        return status

    def cancel(self) -> JobStatus:
        """Cancel the job: queued items are not generated, finished ones stay. A finished job (or one Redis
        lost) is left as it is; the status says which. ``UnknownJobError`` for an id with no job."""
        try:
            self.client.jobs.cancel(self.id)
        except UnknownJobError as unknown:
            # Redis may have lost a job that storage still knows: then it is 'lost', with nothing queued.
            try:
                return self.client.status_from_storage(self.id)
            except FluxfleetError:
                raise unknown from None
        return self.status()

    def wait(
        self, *, progress: bool = False, timeout: float | None = None, poll_s: float = 0.5, patience_s: float = 60.0
    ) -> JobStatus:
        """Block until every item has an outcome (or the job is cancelled); optional progress bar.

        A Redis outage after the first read (a restart) is retried for ``patience_s`` seconds; then, or at once
        for refused credentials, ``BrokerUnavailable`` names the broker and the setting to check."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.status()  # an unknown job or an unreachable Redis fails here, at once
        bar = None
        if progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            bar = Progress(
                TextColumn(f"job {self.id}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            bar.start()
            bar_task = bar.add_task("images", total=status.total, rate="")
        started = time.monotonic()
        settled_by: float | None = None
        unreachable_since: float | None = None
        try:
            while True:
                try:
                    status = self.status()
                    unreachable_since = None
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    problem = broker_error(e, self.client.settings.broker)
                    if unreachable_since is None:
                        unreachable_since = time.monotonic()
                        logger.warning("job %s: %s; retrying for up to %.0f s", self.id, problem, patience_s)
                    if isinstance(e, redis.AuthenticationError) or time.monotonic() - unreachable_since > patience_s:
                        raise problem from e
                    if bar is not None:
                        bar.update(bar_task, rate="Redis unreachable, retrying")
                    time.sleep(poll_s)
                    continue
                if bar is not None:
                    elapsed = max(time.monotonic() - started, 1e-6)
                    bar.update(bar_task, completed=status.finished, rate=f"{status.done / elapsed:.2f} img/s")
                if status.is_terminal:
                    return status
                if status.finished >= status.total:
                    # The last worker marks the job and writes the manifest just after the last record.
                    settled_by = settled_by or time.monotonic() + 5.0
                    if time.monotonic() > settled_by:
                        return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id}: {status.finished}/{status.total} finished after {timeout} s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.stop()

    def results(self) -> list[ItemRecord]:
        """One record per stored image, sorted by item index (the manifest's lines); from storage for a job
        Redis lost. ``UnknownJobError`` for an id with no job."""
        records = self.client.jobs.records(self.id)
        if records or self.client.jobs.exists(self.id):
            return records
        try:
            _spec, stored, _failures = self.client.stored_outcomes(self.id)
        except FluxfleetError as e:
            raise UnknownJobError(self.id, "not in Redis, and no job.json in storage") from e
        return sorted(stored, key=lambda r: r.index)

    def failures(self) -> list[ItemFailure]:
        return self.client.jobs.failures(self.id)

    def manifest_location(self) -> str:
        """Where the manifest is; rewritten from the records if it is not there yet."""
        storage = self.client.storage
        if not storage.exists(manifest_key(self.id)):
            return write_manifest(storage, self.client.jobs, self.id)
        return storage.location(manifest_key(self.id))
