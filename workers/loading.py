"""Loading a preset's pipeline once per worker process, then warming it up.

Runs only inside the process that owns the GPU (the pool child), never in a parent that forks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
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
    memory: Any = None  # workers.backends.footprint.MemoryRecord: per component, after load, peaks
    stages: dict[str, float] = field(default_factory=dict)  # seconds: imports, plan, from_pretrained, placement, speed
    speed: Any = None  # workers.speed.SpeedReport: levers applied, compile cache hit, warm-up


class StageClock:
    """Seconds spent in each consecutive stage: ``mark(name)`` ends the stage that began at the last mark."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = now - self._last
        self._last = now


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


# transformers says so once per image-processor class diffusers names, though a text-to-image pipeline
# never builds one: the PIL fallback it takes is all FLUX needs.
TORCHVISION_NOTICE = "requires torchvision (not installed)"


class _DropNotice(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries() -> None:
    """Keep the worker log to the worker's own lines: no progress bars, library warnings through logging.

    A worker's stdout and stderr become ``WARNING celery.redirected`` lines, one per tqdm refresh; diffusers
    and transformers write to stderr through handlers of their own. Their bars go off (and the hub's, for
    downloads), and their records propagate to the worker's handler under their own logger names.
    Call before importing diffusers' pipelines. Idempotent.
    """
    notices = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropNotice) for f in notices.filters):
        notices.addFilter(_DropNotice(TORCHVISION_NOTICE))
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.disable_default_handler()
        library.enable_propagation()


def load_pipeline(preset: Preset, settings: Settings) -> LoadedPipeline:
    clock = StageClock()
    quiet_libraries()
    import torch
    from diffusers import FluxPipeline

    from fluxfleet.errors import FluxfleetError
    from workers.backends import after_load, pipeline_kwargs, post_load, saved_quantization
    from workers.backends.footprint import record_after_load
    from workers.placement import load_kwargs, plan_for_device
    from workers.speed import apply_speed

    source = preset.model_source(settings)
    check_model_source(source)
    device = resolve_device(settings.worker.device)
    dtype = getattr(torch, preset.dtype)
    # Decide before loading: a balanced placement is a from_pretrained argument; refusals come first.
    clock.mark("imports")
    placement = plan_for_device(preset, device)  # in a worker, the first CUDA call: it initialises CUDA
    clock.mark("plan")
    prequantized = saved_quantization(source)
    try:
        # A directory written by `fluxfleet quantize` carries its quantization config: load it as saved.
        kwargs = {} if prequantized else pipeline_kwargs(preset, dtype, source)
        pipe = FluxPipeline.from_pretrained(source, dtype=dtype, **kwargs, **load_kwargs(placement, device))
        pipe.set_progress_bar_config(disable=True)  # before any call: the speed levers' warm-up runs it
        if not prequantized:
            after_load(pipe, preset, dtype)
    except FluxfleetError:
        raise  # already names the preset and what to change (missing extra, bad option, bad GGUF file)
    except Exception as e:  # any other failure here means this worker cannot serve its preset
        raise ModelLoadError(f"preset '{preset.name}': cannot load model '{source}': {e}") from e
    if prequantized:
        logger.info("preset %s: loaded pre-quantized components %s from %s", preset.name, prequantized, source)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        component = getattr(pipe, name, None)
        if component is not None:
            component.eval()
    clock.mark("from_pretrained")
    post_load(pipe, preset, device, placement)
    clock.mark("placement")
    speed = apply_speed(pipe, preset, device)  # the preset's [speed] levers; a no-op without them
    clock.mark("speed")
    stages = clock.stages
    # load_s leaves out imports and the CUDA initialisation (the plan stage): paid once per process
    load_s = sum(v for k, v in stages.items() if k not in ("imports", "plan"))
    logger.info(
        "loaded preset %s (%s) on %s in %.1f s (%s)",
        preset.name,
        source,
        device,
        load_s,
        ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()),
    )
    memory = record_after_load(pipe, preset.name, device)
    return LoadedPipeline(
        pipe=pipe, device=device, model=source, load_s=load_s, memory=memory, stages=stages, speed=speed
    )


def warm_up(loaded: LoadedPipeline, preset: Preset, defaults: GenerationDefaults) -> float:
    """One generation per warm-up shape, so compilation and allocation happen before real work."""
    import torch

    from workers.speed import warmup_shapes

    shapes = [tuple(s) for s in preset.warmup.shapes] or [(defaults.width, defaults.height)]
    started = time.perf_counter()
    # The speed step's warm-up has already denoised and decoded at its shapes, from random embeddings: at
    # those shapes only the text encoders are still cold (a second full warm-up cost 0.7-0.8 s per start).
    speed_warmed = set(warmup_shapes(preset)) if loaded.speed is not None and loaded.speed.warmup_s > 0 else set()
    if any(shape in speed_warmed for shape in shapes):
        with torch.no_grad():  # as the pipeline's own call
            loaded.pipe.encode_prompt(
                prompt=["warm-up"] * preset.batch_size,
                prompt_2=None,
                max_sequence_length=defaults.max_sequence_length,
            )
    for width, height in [shape for shape in shapes if shape not in speed_warmed]:
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
