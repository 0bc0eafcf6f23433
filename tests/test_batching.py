"""Items, seeds, keys and task grouping: pure functions, no services."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxfleet.keys import derive_seed, item_key
from fluxfleet.presets import effective_defaults, load_preset
from fluxfleet.schema import GenerationParams
from fluxfleet.settings import GenerationDefaults, LimitSettings, Settings
from producer.batching import build_items, split_tasks
from producer.inputs import PromptSpec

PARAMS = GenerationParams(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=64)


def items_for(prompts: list[PromptSpec], **kwargs: object) -> list:  # type: ignore[type-arg]
    preset = load_preset("tiny", Settings().presets_dir)
    defaults = GenerationDefaults(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=64)
    return build_items(prompts, preset=preset, model="m", defaults=defaults, limits=LimitSettings(), **kwargs)  # type: ignore[arg-type]


def test_keys_depend_on_every_request_field() -> None:
    base = item_key(model="m", preset="p", prompt="a cat", seed=1, params=PARAMS)
    assert base == item_key(model="m", preset="p", prompt="a cat", seed=1, params=PARAMS)
    variants = [
        item_key(model="m2", preset="p", prompt="a cat", seed=1, params=PARAMS),
        item_key(model="m", preset="p2", prompt="a cat", seed=1, params=PARAMS),
        item_key(model="m", preset="p", prompt="a dog", seed=1, params=PARAMS),
        item_key(model="m", preset="p", prompt="a cat", seed=2, params=PARAMS),
        item_key(model="m", preset="p", prompt="a cat", seed=1, params=PARAMS.model_copy(update={"steps": 5})),
        item_key(model="m", preset="p", prompt="a cat", seed=1, params=PARAMS.model_copy(update={"guidance": 4.0})),
        item_key(
            model="m", preset="p", prompt="a cat", seed=1, params=PARAMS.model_copy(update={"max_sequence_length": 32})
        ),
    ]
    assert len({base, *variants}) == 8


def test_seeds_are_explicit_or_derived_deterministically() -> None:
    prompts = [PromptSpec("a cat", {"seed": 5}), PromptSpec("a dog"), PromptSpec("a bird", {"images_per_prompt": 2})]
    first = items_for(prompts, job_seed=9)
    again = items_for(prompts, job_seed=9)
    other = items_for(prompts, job_seed=10)
    assert [i.key for i in first] == [i.key for i in again]
    assert first[0].seed == 5 and other[0].seed == 5
    assert first[1].seed == derive_seed(9, 1, 0) != other[1].seed
    assert len(first) == 4 and first[2].seed != first[3].seed


def test_tasks_group_items_by_shape_up_to_the_preset_limit() -> None:
    prompts = [PromptSpec(f"prompt {i}") for i in range(10)] + [PromptSpec("wide", {"width": 128})]
    items = items_for(prompts)
    preset = load_preset("tiny", Settings().presets_dir)
    tasks = split_tasks(items, job_id="j", preset=preset, model="m")
    assert sorted(len(t.items) for t in tasks) == [1, 2, 4, 4]
    for task in tasks:
        assert len({i.params.batch_shape() for i in task.items}) == 1
    assert sorted(i.index for t in tasks for i in t.items) == list(range(11))
    assert len({t.task_id for t in tasks}) == len(tasks)


def test_settings_precedence_defaults_preset_environment_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    preset = load_preset("tiny", Settings().presets_dir)
    assert effective_defaults(preset, Settings()).steps == 4  # the preset beats the built-in 28
    monkeypatch.setenv("FLUXFLEET_DEFAULTS__STEPS", "6")
    settings = Settings()
    assert effective_defaults(preset, settings).steps == 6  # the environment beats the preset
    assert effective_defaults(preset, settings).width == 64  # untouched fields keep the preset's
    flagged = settings.with_overrides(defaults__steps=8, broker__url="redis://h:1/0")
    assert effective_defaults(preset, flagged).steps == 8  # flags beat the environment
    assert flagged.broker.url == "redis://h:1/0" and flagged.defaults.width == 1024


def test_broker_password_is_spliced_into_the_url() -> None:
    settings = Settings().with_overrides(broker__url="rediss://cache.example:6380/2", broker__password="p@ss/w")
    assert settings.broker.url_with_password() == "rediss://:p%40ss%2Fw@cache.example:6380/2"
