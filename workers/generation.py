"""Turns a loaded pipeline into the engine's ``generate(batch, should_stop)`` function.

The pipeline call is split into its three stages (text encoding, denoising, VAE decode) so each
is timed on its own, and a task's prompts are encoded once, batched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fluxfleet.schema import Item
from workers.engine import GenerateFn, Interrupted
from workers.loading import LoadedPipeline
from workers.observer import Observer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def pipeline_generate(loaded: LoadedPipeline, observer: Observer | None = None) -> GenerateFn:
    observer = observer or Observer()
    pipe = loaded.pipe

    def generate(batch: list[Item], should_stop: Callable[[], bool]) -> list[Any]:
        import torch

        params = batch[0].params
        device = pipe._execution_device

        started = time.perf_counter()
        with torch.inference_mode():
            prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
                prompt=[item.prompt for item in batch],
                prompt_2=None,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=params.max_sequence_length,
            )
        _sync(loaded.device)
        observer.stage("text_encoding", time.perf_counter() - started, len(batch))

        def on_step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # Checked between denoising steps: a cancelled job or a stopping worker ends the call
            # before decoding, so no partial image is ever stored.
            if should_stop():
                raise Interrupted(f"stopped at step {step}")
            return tensors

        started = time.perf_counter()
        latents = pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            max_sequence_length=params.max_sequence_length,
            # CPU generators make a seed give the same starting noise on every device.
            generator=[torch.Generator("cpu").manual_seed(item.seed) for item in batch],
            callback_on_step_end=on_step_end,
            output_type="latent",
        ).images
        _sync(loaded.device)
        denoise_s = time.perf_counter() - started
        observer.stage("denoising", denoise_s, len(batch))
        observer.denoising_steps(params.steps * len(batch), denoise_s)

        started = time.perf_counter()
        with torch.inference_mode():
            vae = pipe.vae
            unpacked = pipe._unpack_latents(latents, params.height, params.width, pipe.vae_scale_factor)
            unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
            decoded = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
            images = pipe.image_processor.postprocess(decoded, output_type="pil")
        observer.stage("vae_decode", time.perf_counter() - started, len(batch))
        observer.generation_memory()
        return list(images)

    return generate
