"""Turns a loaded pipeline into the engine's ``generate(batch, should_stop)`` function.

The pipeline call is split into its three stages (``workers.pipeline.generation``) so each is timed on its
own, and a task's prompts are encoded once, batched. The batch's cache policy (one per batch: tasks group
items by it) runs through the transformer's ``StepCache``; each image carries its count of computed and
reused steps in ``image.info[STEPS_INFO]`` for its manifest record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from fluxfleet.caching import parse_policy
from fluxfleet.input_images import denoising_steps
from fluxfleet.schema import Item
from fluxfleet.settings import LimitSettings
from workers.pipeline.adapters import AdapterFailure, PipelineAdapters
from workers.pipeline.generation import generate_images
from workers.pipeline.img2img import Img2Img, InputsRefused
from workers.pipeline.loading import LoadedPipeline
from workers.tasks.engine import STEPS_INFO, GenerateFn, Interrupted
from workers.tasks.observer import Observer


def pipeline_generate(
    loaded: LoadedPipeline,
    observer: Observer | None = None,
    adapters: PipelineAdapters | None = None,
    *,
    storage: Callable[[], Any] | None = None,
    limits: LimitSettings | None = None,
) -> GenerateFn:
    """``storage()``: the worker's storage, where image-to-image inputs given as s3:// are read."""
    observer = observer or Observer()
    pipe = loaded.pipe
    img2img = Img2Img(pipe, storage, limits or LimitSettings())
    from workers.speed.step_cache import find  # torch: imported where the pipeline is

    step_cache = find(pipe.transformer)

    def generate(batch: list[Item], should_stop: Callable[[], bool]) -> list[Any]:
        params = batch[0].params
        inputs = None
        if params.image is not None:
            inputs, refused = img2img.inputs(batch)
            if refused:
                raise InputsRefused(refused)
        # Image-to-image runs the last part of the schedule only: that many steps are denoised and cached.
        steps = params.steps if params.strength is None else denoising_steps(params.steps, params.strength)

        def on_step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # Checked between denoising steps: a cancelled job or a stopping worker ends the call
            # before decoding, so no partial image is ever stored.
            if should_stop():
                raise Interrupted(f"stopped at step {step}")
            return tensors

        def on_stage(stage: str, seconds: float) -> None:
            observer.stage(stage, seconds, len(batch))
            if stage == "denoising":
                observer.denoising_steps(steps * len(batch), seconds)

        # The batch's LoRA adapters (one set per batch: tasks group items by it), or none.
        if adapters is not None:
            adapters.activate(params.adapters)
        elif params.adapters:
            raise AdapterFailure("this worker's pipeline was built without LoRA adapter support")
        policy = parse_policy(params.cache)
        with _policy_run(step_cache, policy, steps) as count:
            images = generate_images(
                pipe if inputs is None else img2img.pipeline(),
                loaded.device,
                [item.prompt for item in batch],
                [item.seed for item in batch],
                width=params.width,
                height=params.height,
                steps=params.steps,
                guidance=params.guidance,
                max_sequence_length=params.max_sequence_length,
                on_step_end=on_step_end,
                on_stage=on_stage,
                image=inputs,
                strength=params.strength,
            )
        observer.generation_memory()
        if count.reused:
            observer.steps_reused(count.reused * len(batch))
        for image in images:
            image.info[STEPS_INFO] = (count.computed, count.reused)
        return images

    return generate


def _policy_run(step_cache: Any, policy: Any, steps: int) -> Any:
    """The step cache's run of one batch; a pipeline without one (built outside the levers) runs every step."""
    from workers.speed.step_cache import StepCount

    if step_cache is not None:
        return step_cache.run(policy, steps)
    if not policy.is_none:
        raise RuntimeError("this pipeline has no step cache, so it cannot run a cache policy")
    return contextlib.nullcontext(StepCount(computed=steps))
