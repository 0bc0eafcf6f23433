"""From prompts to items to tasks: seeds, keys, validation and grouping by batch shape."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from fluxfleet.adapters import adapter_refs, check_adapters
from fluxfleet.caching import canonical_policy, check_policy
from fluxfleet.errors import ValidationError
from fluxfleet.input_images import check_input_image, item_image_fields
from fluxfleet.keys import derive_seed, item_key
from fluxfleet.presets import Preset
from fluxfleet.schema import SEED_LIMIT, GenerationParams, Item, TaskPayload
from fluxfleet.settings import GenerationDefaults, LimitSettings
from fluxfleet.validation import TokenCounter, as_int, shown, validate_params, validate_prompt
from producer.inputs import PromptSpec, coerce_overrides


def build_items(
    prompts: Sequence[PromptSpec],
    *,
    preset: Preset,
    model: str,
    defaults: GenerationDefaults,
    limits: LimitSettings,
    job_seed: int = 0,
    images_per_prompt: int = 1,
    adapters: tuple[Any, ...] = (),
    resolved_adapters: Mapping[str, tuple[str, str]] | None = None,
) -> list[Item]:
    """Every item of a job, validated; raises ``ValidationError`` naming the place and field of the
    first bad one (nothing is enqueued). ``adapters``: the job's default LoRA adapters; ``resolved_adapters``:
    each adapter source's (source as workers read it, sha256), read by ``producer.adapters`` beforehand."""
    counter = TokenCounter(model)
    base = defaults.model_dump()
    items: list[Item] = []
    for prompt_index, spec in enumerate(prompts):
        where = spec.source or f"prompt {prompt_index + 1}"
        # Overrides of a PromptSpec built in Python get the same checks as a file's.
        overrides = coerce_overrides(spec.overrides, where)
        count = overrides.pop("images_per_prompt", None)
        count = as_int(images_per_prompt if count is None else count, where=where, field="images_per_prompt")
        if not 1 <= count <= limits.max_images_per_prompt:
            raise ValidationError(
                f"images_per_prompt {count} is outside 1..{limits.max_images_per_prompt}",
                where=where,
                field="images_per_prompt",
            )
        explicit_seed = overrides.pop("seed", None)
        if explicit_seed is not None:
            _check_seed_range(explicit_seed, count, where)
        item_adapters = overrides.pop("adapters", adapters)
        values = {**base, **overrides}
        # The job's, the preset's or the environment's default policy as the item keeps it: canonical.
        values["cache"] = canonical_policy(values["cache"], where=where)
        values["adapters"] = adapter_refs(item_adapters, resolved_adapters or {}, where=where)
        check_adapters(values["adapters"], preset, where=where)
        values.update(item_image_fields(values, where))
        params = _params(values, where)
        validate_params(params, limits, where)
        check_input_image(params, limits, where)
        check_policy(params.cache, preset, where=where)
        validate_prompt(spec.prompt, params.max_sequence_length, counter, where)
        for image_index in range(count):
            if explicit_seed is not None:
                seed = explicit_seed + image_index
            else:
                seed = derive_seed(job_seed, prompt_index, image_index)
            key = item_key(model=model, preset=preset.name, prompt=spec.prompt, seed=seed, params=params)
            items.append(Item(index=len(items), prompt=spec.prompt, seed=seed, params=params, key=key, source=where))
    return items


def _check_seed_range(seed: int, count: int, where: str) -> None:
    """An explicit seed is the first of ``count`` consecutive seeds, all within 0..2^64-1."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValidationError(f"seed {shown(seed)} is outside 0..2^64-1", where=where, field="seed")
    if seed + count - 1 >= SEED_LIMIT:
        raise ValidationError(
            f"seed {seed} with images_per_prompt {count} would use seeds past 2^64-1", where=where, field="seed"
        )


def _params(values: dict[str, Any], where: str) -> GenerationParams:
    try:
        return GenerationParams(**values)
    except PydanticValidationError as e:
        first = e.errors()[0]
        name = ".".join(map(str, first["loc"]))
        raise ValidationError(f"{shown(first.get('input'))}: {first['msg']}", where=where, field=name) from None


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
