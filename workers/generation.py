"""Turns a loaded pipeline into the engine's ``generate(batch, should_stop)`` function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxfleet.schema import Item
from workers.engine import GenerateFn, Interrupted
from workers.loading import LoadedPipeline


def pipeline_generate(loaded: LoadedPipeline) -> GenerateFn:
    def generate(batch: list[Item], should_stop: Callable[[], bool]) -> list[Any]:
        import torch

        params = batch[0].params

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # Checked between denoising steps: a cancelled job or a stopping worker ends the call
            # without decoding, so no partial image is ever stored.
            if should_stop():
                raise Interrupted(f"stopped at step {step}")
            return tensors

        result = loaded.pipe(
            prompt=[item.prompt for item in batch],
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            max_sequence_length=params.max_sequence_length,
            # CPU generators make a seed give the same starting noise on every device.
            generator=[torch.Generator("cpu").manual_seed(item.seed) for item in batch],
            callback_on_step_end=on_step_end,
        )
        return list(result.images)

    return generate
