"""Turns a loaded pipeline into the engine's ``generate(batch, should_stop)`` function.

The pipeline call is split into its three stages (``workers.pipeline.generation``) so each is timed on its
own, and a task's prompts are encoded once, batched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxfleet.schema import Item
from workers.pipeline.generation import generate_images
from workers.pipeline.loading import LoadedPipeline
from workers.tasks.engine import GenerateFn, Interrupted
from workers.tasks.observer import Observer


def pipeline_generate(loaded: LoadedPipeline, observer: Observer | None = None) -> GenerateFn:
    observer = observer or Observer()
    pipe = loaded.pipe

    def generate(batch: list[Item], should_stop: Callable[[], bool]) -> list[Any]:
        params = batch[0].params

        def on_step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # Checked between denoising steps: a cancelled job or a stopping worker ends the call
            # before decoding, so no partial image is ever stored.
            if should_stop():
                raise Interrupted(f"stopped at step {step}")
            return tensors

        def on_stage(stage: str, seconds: float) -> None:
            observer.stage(stage, seconds, len(batch))
            if stage == "denoising":
                observer.denoising_steps(params.steps * len(batch), seconds)

        images = generate_images(
            pipe,
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
        )
        observer.generation_memory()
        return images

    return generate
