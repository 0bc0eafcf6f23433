"""What a worker admits from the queue: never trust a message.

A task is served only for this worker's preset and loaded model, within the preset's limits, with every
item's key recomputed from its request, and only while its job holds exactly that task.
"""

from __future__ import annotations

import logging

from fluxfleet.adapters import check_adapters
from fluxfleet.caching import check_policy
from fluxfleet.errors import ValidationError
from fluxfleet.input_images import check_input_image
from fluxfleet.jobs import JobStore
from fluxfleet.keys import item_key
from fluxfleet.presets import Preset
from fluxfleet.schema import TaskPayload
from fluxfleet.settings import Settings
from fluxfleet.validation import TokenCounter, validate_params, validate_prompt

logger = logging.getLogger(__name__)


class Admission:
    def __init__(self, preset: Preset, model: str, settings: Settings, jobs: JobStore) -> None:
        self.preset = preset
        self.model = model
        self.settings = settings
        self.jobs = jobs
        self.counter = TokenCounter(model)

    def check(self, payload: TaskPayload) -> None:
        """Raise a ValidationError (the task's items fail with it) for what this worker must not serve."""
        # Never generate or record under what a message claims: the preset and model are this worker's,
        # and each key must hash them (a key of another model would later be served as "already stored").
        if payload.preset != self.preset.name:
            raise ValidationError(f"task for preset '{payload.preset}' reached a '{self.preset.name}' worker")
        if payload.model != self.model:
            raise ValidationError(
                f"task for model '{payload.model}' reached a worker that loaded '{self.model}' (preset "
                f"'{self.preset.name}'); the producer and the worker must agree on the model and FLUXFLEET_MODEL_DIR",
                field="model",
            )
        limits = self.settings.limits
        if len(payload.items) > self.preset.max_items_per_task:
            raise ValidationError(
                f"{len(payload.items)} items in one task, over preset '{self.preset.name}''s max_items_per_task "
                f"of {self.preset.max_items_per_task}",
                field="items",
            )
        for item in payload.items:
            where = item.source or f"item {item.index}"
            if len(item.prompt) > limits.max_prompt_chars:
                raise ValidationError(
                    f"prompt is {len(item.prompt)} characters, over the limit of {limits.max_prompt_chars}",
                    where=where,
                    field="prompt",
                )
            validate_params(item.params, self.settings.limits, where)
            check_policy(item.params.cache, self.preset, where=where)
            check_input_image(item.params, limits, where)
            check_adapters(item.params.adapters, self.preset, where=where)
            validate_prompt(item.prompt, item.params.max_sequence_length, self.counter, where)
            expected = item_key(
                model=self.model, preset=self.preset.name, prompt=item.prompt, seed=item.seed, params=item.params
            )
            if expected != item.key:
                raise ValidationError("item key does not match its request", where=where, field="key")

    def held_by_job(self, payload: TaskPayload) -> bool:
        """Whether the job was submitted with these items under this task id. Task ids repeat when an aborted
        submit's job id is submitted again, and the aborted attempt's messages may still be queued: those
        are counted and dropped, never recorded under the new job. A job Redis does not know is served."""
        held = self.jobs.task_payload(payload.job_id, payload.task_id)
        if held is None and not self.jobs.exists(payload.job_id):
            return True
        if held is not None and {(i.index, i.key) for i in payload.items} <= {(i.index, i.key) for i in held.items}:
            return True
        logger.error("task %s is not a task of job %s as submitted; dropped", payload.task_id, payload.job_id)
        self.jobs.count_rejected(
            "stale_task", queue=payload.preset, detail=f"task {payload.task_id} is not held by its job"
        )
        return False
