"""Step caching in the worker, on the tiny pipeline built by the worker's own builder: MagCache through the
transformer's StepCache computes exactly what diffusers' MagCache hook computes, ``none`` exactly what the
forward as loaded computes, and the hook policies run and count their steps. Then a job through a real worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fluxfleet.caching import parse_policy, schedule
from fluxfleet.keys import manifest_key
from fluxfleet.settings import Settings, WorkerSettings
from tests.conftest import SharedStack


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    from fluxfleet.presets import load_preset
    from workers.pipeline.build import build_pipeline

    settings = Settings(model_dir=tiny_model_dir, worker=WorkerSettings(device="cpu"))
    return build_pipeline(load_preset("tiny", settings.presets_dir), settings)


def latents(loaded: Any, steps: int, policy: str = "none", seed: int = 3) -> Any:
    import torch

    from workers.speed.step_cache import find

    step_cache = find(loaded.pipe.transformer)
    with step_cache.run(parse_policy(policy), steps) as count:
        out = loaded.pipe(
            prompt="a red cat",
            width=64,
            height=64,
            num_inference_steps=steps,
            max_sequence_length=64,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        ).images
    return out, count


def as_loaded(loaded: Any, steps: int, config: Any = None) -> Any:
    """The latents of the transformer's forward as loaded, with diffusers' own cache hook when ``config``."""
    import torch

    from workers.speed.step_cache import find

    transformer = loaded.pipe.transformer
    step_cache = find(transformer)
    transformer.forward = step_cache.original
    if config is not None:
        transformer.enable_cache(config)
    try:
        return loaded.pipe(
            prompt="a red cat",
            width=64,
            height=64,
            num_inference_steps=steps,
            max_sequence_length=64,
            generator=torch.Generator("cpu").manual_seed(3),
            output_type="latent",
        ).images
    finally:
        if config is not None:
            transformer.disable_cache()
        transformer.forward = step_cache


def test_every_preset_routes_the_transformer_through_a_step_cache(loaded: Any) -> None:
    from workers.speed.step_cache import StepCache, find

    assert isinstance(find(loaded.pipe.transformer), StepCache)


def test_none_computes_exactly_what_the_forward_as_loaded_computes(loaded: Any) -> None:
    cached, count = latents(loaded, 6)
    assert (count.computed, count.reused) == (6, 0)
    assert cached.numpy().tobytes() == as_loaded(loaded, 6).numpy().tobytes()


@pytest.mark.parametrize(("steps", "policy"), [(12, "magcache"), (28, "magcache:threshold=0.12,max_skip=4")])
def test_magcache_is_diffusers_magcache_without_its_hooks(loaded: Any, steps: int, policy: str) -> None:
    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    chosen = parse_policy(policy)
    config = MagCacheConfig(
        threshold=chosen.option("threshold"),
        max_skip_steps=chosen.option("max_skip"),
        retention_ratio=chosen.option("retention"),
        num_inference_steps=steps,
        mag_ratios=FLUX_MAG_RATIOS,
    )
    cached, count = latents(loaded, steps, policy)
    plan = schedule(chosen, steps) or []
    assert (count.computed, count.reused) == (sum(plan), steps - sum(plan)) and count.reused > 0
    # The same skip decisions and the same residual reuse: the same latents, to the bit.
    assert cached.numpy().tobytes() == as_loaded(loaded, steps, config).numpy().tobytes()
    assert not np.array_equal(cached.numpy(), latents(loaded, steps)[0].numpy())


def test_hook_policies_run_and_count_their_steps(loaded: Any) -> None:
    uncached = latents(loaded, 10)[0]
    # FirstBlockCache: a threshold of 1 reuses every step after the first two (its residual is compared).
    fb, fb_count = latents(loaded, 10, "fbcache:1.0")
    assert fb_count.reused > 0 and fb_count.computed + fb_count.reused == 10
    assert not np.array_equal(fb.numpy(), uncached.numpy())
    taylor, taylor_count = latents(loaded, 10, "taylorseer:interval=2,warmup=1")
    assert (taylor_count.computed, taylor_count.reused) == (5, 5)
    assert not np.array_equal(taylor.numpy(), uncached.numpy())
    # The hooks are gone after their run: the next uncached run is the uncached run.
    assert latents(loaded, 10)[0].numpy().tobytes() == uncached.numpy().tobytes()


def test_a_job_with_per_line_policies_through_a_real_worker(shared_stack: SharedStack, tmp_path: Path) -> None:
    prompts = tmp_path / "cached.jsonl"
    lines = [
        {"prompt": "a lamp in the fog", "steps": 12},
        {"prompt": "a lamp in the fog", "steps": 12, "cache": "magcache"},
        {"prompt": "a lamp in the fog", "steps": 12, "cache": "fbcache:1.0"},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    job = shared_stack.client().submit(prompts, preset="tiny", seed=5)
    status = job.wait(timeout=180)
    assert (status.done, status.failed) == (3, 0)
    records = sorted(job.results(), key=lambda r: r.index)
    assert [r.params.cache.split(":")[0] for r in records] == ["none", "magcache", "fbcache"]
    assert len({r.key for r in records}) == 3
    plan = schedule(parse_policy("magcache"), 12) or []
    assert (records[0].steps_computed, records[0].steps_reused) == (12, 0)
    assert (records[1].steps_computed, records[1].steps_reused) == (sum(plan), 12 - sum(plan))
    assert records[2].steps_reused and records[2].steps_computed + records[2].steps_reused == 12
    manifest = (shared_stack.storage_root / manifest_key(job.id)).read_text().splitlines()
    assert [json.loads(line)["steps_reused"] for line in manifest] == [r.steps_reused for r in records]
    with Image.open(records[0].location) as image:
        assert "Cache:" not in image.info["parameters"]
    with Image.open(records[1].location) as image:
        assert image.info["parameters"].endswith(f", Cache: {records[1].params.cache}")
