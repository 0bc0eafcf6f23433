"""One generation, in three timed stages: text encoding, denoising, VAE decode.

Serving (``workers.tasks.generation``) and the start's warm-up (``workers.pipeline.warmup``) both call
:func:`generate_images`, so the warm-up compiles exactly the graphs that serving runs: the same grad modes
(text encoding and decoding under ``inference_mode``, the pipeline under its own ``no_grad``) and shapes.
A different grad mode is a different dynamo guard, i.e. a second compile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

StepHook = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]
"""diffusers' ``callback_on_step_end``: checked between denoising steps."""
StageHook = Callable[[str, float], None]
"""Called with a stage's name ('text_encoding', 'denoising', 'vae_decode') and its seconds."""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def generate_images(
    pipe: Any,
    device: str,
    prompts: list[str],
    seeds: list[int],
    *,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    max_sequence_length: int,
    on_step_end: StepHook | None = None,
    on_stage: StageHook | None = None,
    image: list[Any] | None = None,
    strength: float | None = None,
) -> list[Any]:
    """PIL images of ``prompts`` (a task's prompts are encoded once, batched), one seed each. Image-to-image:
    ``pipe`` is the img2img pipeline, ``image`` one input per prompt (of the output's size) and ``strength``."""
    import torch

    report = on_stage or (lambda _stage, _seconds: None)
    execution_device = pipe._execution_device
    started = time.perf_counter()
    with torch.inference_mode():
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=execution_device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
    _sync(device)
    report("text_encoding", time.perf_counter() - started)

    started = time.perf_counter()
    latents = pipe(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        max_sequence_length=max_sequence_length,
        # CPU generators make a seed give the same starting noise on every device.
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        callback_on_step_end=on_step_end,
        output_type="latent",
        **({} if image is None else {"image": image, "strength": strength}),
    ).images
    _sync(device)
    report("denoising", time.perf_counter() - started)

    started = time.perf_counter()
    with torch.inference_mode():
        vae = pipe.vae
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type="pil")
    report("vae_decode", time.perf_counter() - started)
    return list(images)
