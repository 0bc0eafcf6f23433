"""Step caching policies at submit: parsing, canonical forms, keys, grouping and the refusals (no services)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxfleet.caching import FLUX_MAG_RATIOS, POLICIES, magcache_schedule, parse_policy, schedule
from fluxfleet.errors import ConfigurationError, InputFileError, ValidationError
from fluxfleet.keys import item_key
from fluxfleet.presets import load_preset
from fluxfleet.schema import GenerationParams
from fluxfleet.settings import GenerationDefaults, LimitSettings, Settings
from producer.batching import build_items, split_tasks
from producer.inputs import PromptSpec, read_prompts

PARAMS = GenerationParams(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=64)
PRESETS = Settings().presets_dir


def items_for(prompts: list[PromptSpec], preset: str = "tiny", **defaults: object) -> list:  # type: ignore[type-arg]
    values = dict(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=64) | defaults
    return build_items(
        prompts,
        preset=load_preset(preset, PRESETS),
        model="m",
        defaults=GenerationDefaults(**values),  # type: ignore[arg-type]
        limits=LimitSettings(),
    )


def test_the_flux_ratios_are_diffusers_own() -> None:
    import torch
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS as SHIPPED

    # As float32, the precision diffusers keeps them in (and fluxfleet.caching computes with).
    assert torch.equal(torch.tensor(FLUX_MAG_RATIOS, dtype=torch.float32), SHIPPED)


def test_magcache_schedules_at_the_published_step_counts() -> None:
    # 14 of 28 steps computed at the defaults, 12 of 28 at threshold 0.12 with K=4 (the step counts the H200
    # run recorded, benchmarks/results/2026-12-02-H200-step-cache.json); the first retained steps are always computed.
    default = magcache_schedule(28, 0.06, 3, 0.2)
    assert sum(default) == 14 and all(default[:6])
    assert sum(magcache_schedule(28, 0.12, 4, 0.2)) == 12
    assert sum(magcache_schedule(28, 0.0, 3, 0.2)) > sum(default)  # only steps whose ratio is exactly 1 reused
    assert sum(schedule(parse_policy("none"), 28) or []) == 28


def test_canonical_forms_and_aliases() -> None:
    assert parse_policy("magcache").canonical() == "magcache:threshold=0.06,max_skip=3,retention=0.2"
    assert parse_policy(" MAG : 0.12 , max_skip=4").canonical() == "magcache:threshold=0.12,max_skip=4,retention=0.2"
    assert parse_policy("firstblock:0.1").canonical() == "fbcache:threshold=0.1"
    assert parse_policy("taylorseer:4").canonical() == "taylorseer:interval=4,warmup=3,order=1"
    assert parse_policy("").canonical() == parse_policy("off").canonical() == "none"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("magic", "unknown cache policy 'magic'"),
        ("magcache:threshold=2", "outside 0.0..1.0"),
        ("magcache:threshold=nan", "outside"),
        ("magcache:max_skip=1.5", "not a whole number"),
        ("magcache:max_skip=0", "outside 1..10"),
        ("magcache:k=4", "has no option 'k'"),
        ("magcache:0.1,threshold=0.2", "given twice"),
        ("none:0.1", "takes no options"),
        (3, "not int"),
        ("m" * 300, "longer than 200"),
    ],
)
def test_bad_policies_are_refused_with_the_reason(value: object, words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_policy(value, where="jobs.csv:3")
    assert refused.value.field == "cache" and refused.value.where == "jobs.csv:3"
    assert words in str(refused.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_a_canonical_policy_or_a_clear_refusal(text: str) -> None:
    try:
        canonical = parse_policy(text).canonical()
    except ValidationError as e:
        assert e.field == "cache" and "Traceback" not in str(e)
        return
    assert parse_policy(canonical).canonical() == canonical


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(POLICIES)),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    st.integers(min_value=2, max_value=20),
)
def test_values_are_kept_exactly(name: str, threshold: float, interval: int) -> None:
    main = interval if POLICIES[name].main == "interval" else threshold
    policy = parse_policy(f"{name}:{main!r}")
    assert policy.option(POLICIES[name].main) == main
    assert parse_policy(policy.canonical()) == policy


def test_an_uncached_key_is_the_key_before_caching_existed() -> None:
    # The key hashed every field of the request; "none" leaves the new field out, so stored images stay found.
    before = {"v": "v1", "model": "m", "preset": "p", "prompt": "a cat", "seed": 1}
    before |= PARAMS.model_dump(include={"width", "height", "steps", "guidance", "max_sequence_length"})
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:40]
    assert item_key(model="m", preset="p", prompt="a cat", seed=1, params=PARAMS) == expected


def test_keys_differ_per_policy_and_agree_across_spellings() -> None:
    def key(cache: str) -> str:
        params = PARAMS.model_copy(update={"cache": parse_policy(cache).canonical()})
        return item_key(model="m", preset="p", prompt="a cat", seed=1, params=params)

    assert key("magcache") == key("mag:0.06") == key("magcache:threshold=0.06,max_skip=3,retention=0.2")
    assert len({key("none"), key("magcache"), key("magcache:0.12"), key("fbcache"), key("taylorseer")}) == 5


def test_tasks_group_items_by_policy(tmp_path: Path) -> None:
    prompts = tmp_path / "jobs.csv"
    prompts.write_text("prompt,cache\na cat,\na dog,magcache\na cow,mag:0.06\na fox,magcache:0.12\n")
    items = items_for(read_prompts(prompts))
    assert [i.params.cache.split(":")[0] for i in items] == ["none", "magcache", "magcache", "magcache"]
    preset = load_preset("tiny", PRESETS)
    tasks = split_tasks(items, job_id="j", preset=preset, model="m")
    assert sorted(len(t.items) for t in tasks) == [1, 1, 2]
    assert all(len({i.params.cache for i in t.items}) == 1 for t in tasks)


def test_a_job_default_and_a_preset_default(tmp_path: Path) -> None:
    items = items_for([PromptSpec("a cat", {"cache": "none"}), PromptSpec("a dog")], cache="magcache")
    assert [i.params.cache for i in items] == ["none", "magcache:threshold=0.06,max_skip=3,retention=0.2"]
    presets = tmp_path / "presets"
    presets.mkdir()
    tiny = (PRESETS / "tiny.toml").read_text()
    (presets / "cached.toml").write_text(tiny.replace("[defaults]", '[defaults]\ncache = "magcache:0.1"'))
    assert load_preset("cached", presets).defaults["cache"] == "magcache:0.1"
    (presets / "broken.toml").write_text(tiny.replace("[defaults]", '[defaults]\ncache = "turbo"'))
    with pytest.raises(ConfigurationError, match=r"broken.toml.*unknown cache policy 'turbo'"):
        load_preset("broken", presets)


def test_a_bad_policy_in_a_file_names_the_line_and_field(tmp_path: Path) -> None:
    prompts = tmp_path / "jobs.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "cache": "magcache:threshold=7"}\n')
    with pytest.raises(InputFileError) as refused:
        read_prompts(prompts)
    assert refused.value.where == f"{prompts}:2" and refused.value.field == "cache"


def test_a_preset_that_cannot_run_a_policy_refuses_it_at_submit() -> None:
    # fast compiles its blocks and replays a CUDA graph: FirstBlockCache's hooks would undo both.
    with pytest.raises(ValidationError, match="cannot run on preset 'fast'") as refused:
        items_for([PromptSpec("a cat", {"cache": "fbcache"}, source="p.txt:4")], preset="fast")
    assert refused.value.where == "p.txt:4" and refused.value.field == "cache"
    # MagCache's schedule is known before the run: fast keeps its graphs and runs it.
    assert items_for([PromptSpec("a cat", {"cache": "magcache"})], preset="fast")[0].params.cache.startswith("magcache")
    # bf16 compiles its blocks, which the hooks would run eagerly: slower than without the cache.
    with pytest.raises(ValidationError, match=r"preset 'bf16'.*outside \[compile\]"):
        items_for([PromptSpec("a cat", {"cache": "taylorseer"})], preset="bf16")
    assert items_for([PromptSpec("a cat", {"cache": "fbcache"})])[0].params.cache == "fbcache:threshold=0.05"


@pytest.mark.parametrize(
    ("cache", "words"),
    [
        ("mag", "not written in its canonical form"),
        ("magcache:threshold=0.06,max_skip=99,retention=0.2", "outside 1..10"),
        ("fbcache:threshold=0.05", "cannot run on preset 'fast'"),
    ],
)
def test_a_worker_refuses_a_queued_policy_its_preset_cannot_run(cache: str, words: str) -> None:
    # A message is never trusted: one that did not come through submit's checks fails its items with the reason.
    from fluxfleet.schema import Item, TaskPayload
    from workers.tasks.admission import Admission

    preset = load_preset("fast", PRESETS)
    params = PARAMS.model_copy(update={"cache": cache, "width": 1024, "height": 1024})
    key = item_key(model="m", preset="fast", prompt="a cat", seed=1, params=params)
    item = Item(index=0, prompt="a cat", seed=1, params=params, key=key, source="jobs.txt:1")
    payload = TaskPayload(job_id="j", task_id="j-0", preset="fast", model="m", items=[item], enqueued_at=0.0)
    with pytest.raises(ValidationError, match=words) as refused:
        Admission(preset, "m", Settings(), jobs=None).check(payload)  # type: ignore[arg-type]
    assert refused.value.field == "cache" and refused.value.where == "jobs.txt:1"


@pytest.mark.parametrize(
    ("cache", "words"),
    [("turbo", "unknown cache policy 'turbo'"), ("fbcache", "prompts.txt:1: cache policy fbcache cannot run")],
)
def test_the_command_line_refuses_a_policy_in_one_sentence(
    tmp_path: Path, tiny_model_dir: Path, cache: str, words: str
) -> None:
    from tests.test_cli_errors import cli_env, fluxfleet, one_sentence

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n")
    # Refused before Redis is asked: the broker URL points at a closed port.
    env = cli_env(tmp_path, tiny_model_dir, "redis://127.0.0.1:1/0")
    line = one_sentence(fluxfleet(env, "submit", str(prompts), "--preset", "fast", "--cache", cache))
    assert words in line and "(field 'cache')" in line
