"""Loading a preset's pipeline once per worker process, then warming it up.

Runs only inside the process that owns the GPU (the pool child), never in a parent that forks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxfleet.errors import ModelLoadError
from fluxfleet.presets import Preset
from fluxfleet.settings import GenerationDefaults, Settings

logger = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    pipe: Any
    device: str
    model: str
    load_s: float
    warmup_s: float = 0.0


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()


def check_model_source(source: str) -> None:
    """Fail before anything loads when a local model directory is missing (no torch needed)."""
    if looks_local(source):
        path = Path(source).expanduser()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model directory '{source}' has no model_index.json (missing or not diffusers format)"
            )


def load_pipeline(preset: Preset, settings: Settings) -> LoadedPipeline:
    import torch
    from diffusers import FluxPipeline

    from workers.backends import pipeline_kwargs, post_load

    source = preset.model_source(settings)
    check_model_source(source)
    device = resolve_device(settings.worker.device)
    dtype = getattr(torch, preset.dtype)
    started = time.perf_counter()
    try:
        kwargs = pipeline_kwargs(preset, dtype)
        pipe = FluxPipeline.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except Exception as e:  # any failure here means this worker cannot serve its preset
        raise ModelLoadError(f"preset '{preset.name}': cannot load model '{source}': {e}") from e
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        component = getattr(pipe, name, None)
        if component is not None:
            component.eval()
    post_load(pipe, preset, device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    logger.info("loaded preset %s (%s) on %s in %.1f s", preset.name, source, device, load_s)
    return LoadedPipeline(pipe=pipe, device=device, model=source, load_s=load_s)


def warm_up(loaded: LoadedPipeline, preset: Preset, defaults: GenerationDefaults) -> float:
    """One generation per warm-up shape, so compilation and allocation happen before real work."""
    import torch

    shapes = preset.warmup.shapes or [(defaults.width, defaults.height)]
    started = time.perf_counter()
    for width, height in shapes:
        loaded.pipe(
            prompt=["warm-up"] * preset.batch_size,
            width=width,
            height=height,
            num_inference_steps=preset.warmup.steps,
            guidance_scale=defaults.guidance,
            max_sequence_length=defaults.max_sequence_length,
            generator=[torch.Generator("cpu").manual_seed(0) for _ in range(preset.batch_size)],
        )
    loaded.warmup_s = time.perf_counter() - started
    logger.info("warmed up preset %s at %s in %.1f s", preset.name, shapes, loaded.warmup_s)
    return loaded.warmup_s
