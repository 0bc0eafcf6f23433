"""From prompts to items to tasks: seeds, keys, validation and grouping by batch shape."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from fluxfleet.errors import ValidationError
from fluxfleet.keys import derive_seed, item_key
from fluxfleet.presets import Preset
from fluxfleet.schema import GenerationParams, Item, TaskPayload
from fluxfleet.settings import GenerationDefaults, LimitSettings
from fluxfleet.validation import TokenCounter, validate_params, validate_prompt
from producer.inputs import PromptSpec


def build_items(
    prompts: Sequence[PromptSpec],
    *,
    preset: Preset,
    model: str,
    defaults: GenerationDefaults,
    limits: LimitSettings,
    job_seed: int = 0,
    images_per_prompt: int = 1,
) -> list[Item]:
    """Every item of a job, validated; raises on the first bad one (nothing is enqueued)."""
    counter = TokenCounter(model)
    items: list[Item] = []
    for prompt_index, spec in enumerate(prompts):
        where = spec.source or f"prompt {prompt_index + 1}"
        overrides = dict(spec.overrides)
        count = int(overrides.pop("images_per_prompt", images_per_prompt))
        if not 1 <= count <= limits.max_images_per_prompt:
            raise ValidationError(
                f"images_per_prompt {count} is outside 1..{limits.max_images_per_prompt}",
                where=where,
                field="images_per_prompt",
            )
        explicit_seed = overrides.pop("seed", None)
        params = GenerationParams(**{**defaults.model_dump(), **overrides})
        validate_params(params, limits, where)
        validate_prompt(spec.prompt, params.max_sequence_length, counter, where)
        for image_index in range(count):
            if explicit_seed is not None:
                if not 0 <= explicit_seed < 2**63:
                    raise ValidationError(f"seed {explicit_seed} is outside 0..2^63-1", where=where, field="seed")
                seed = explicit_seed + image_index
            else:
                seed = derive_seed(job_seed, prompt_index, image_index)
            key = item_key(model=model, preset=preset.name, prompt=spec.prompt, seed=seed, params=params)
            items.append(Item(index=len(items), prompt=spec.prompt, seed=seed, params=params, key=key, source=where))
    return items


def split_tasks(items: Sequence[Item], *, job_id: str, preset: Preset, model: str) -> list[TaskPayload]:
    """Tasks of up to ``preset.max_items_per_task`` items that share a batch shape."""
    groups: dict[Any, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.params.batch_shape()].append(item)
    now = time.time()
    tasks: list[TaskPayload] = []
    size = preset.max_items_per_task
    for group in groups.values():
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            tasks.append(
                TaskPayload(
                    job_id=job_id,
                    task_id=f"{job_id}-{chunk[0].index:07d}",
                    preset=preset.name,
                    model=model,
                    items=chunk,
                    enqueued_at=now,
                )
            )
    return tasks


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
