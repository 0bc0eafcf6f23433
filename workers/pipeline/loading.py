"""Loading a preset's pipeline: where the model is, which device, ``from_pretrained`` with its backend.

Runs only inside the process that owns the GPU (the pool child), never in a parent that forks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxfleet.errors import FluxfleetError, ModelLoadError
from fluxfleet.planner import Placement
from fluxfleet.presets import Preset

logger = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    pipe: Any
    device: str
    model: str
    load_s: float
    warmup_s: float = 0.0
    memory: Any = None  # workers.pipeline.footprint.MemoryRecord: per component, after load, peaks
    stages: dict[str, float] = field(default_factory=dict)  # seconds of each step of workers.pipeline.build
    speed: Any = None  # workers.speed.report.SpeedReport: levers applied, compile cache hit, warm-up


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


def load(preset: Preset, source: str, device: str, placement: Placement) -> Any:
    """``from_pretrained`` with the preset's backend (or as saved, for a pre-quantized directory), in eval mode."""
    import torch
    from diffusers import FluxPipeline

    from workers.pipeline.backends import after_load, pipeline_kwargs, saved_quantization
    from workers.pipeline.placement import load_kwargs

    dtype = getattr(torch, preset.dtype)
    prequantized = saved_quantization(source)
    try:
        # A directory written by `fluxfleet quantize` carries its quantization config: load it as saved.
        kwargs = {} if prequantized else pipeline_kwargs(preset, dtype, source)
        pipe = FluxPipeline.from_pretrained(source, dtype=dtype, **kwargs, **load_kwargs(placement, device))
        pipe.set_progress_bar_config(disable=True)  # before any call: the warm-up runs it
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
    return pipe
