"""The start's one warm-up: a generation at each shape the worker serves, through serving's own code.

Compilation, CUDA graph capture, autotuning and the allocator's first growth all happen here, before the
worker says it is ready; the compile cache is saved after it, so it holds these shapes.
"""

from __future__ import annotations

import logging
import time

from fluxfleet.presets import Preset
from fluxfleet.settings import GenerationDefaults
from workers.pipeline.generation import generate_images
from workers.pipeline.loading import LoadedPipeline

logger = logging.getLogger(__name__)


def serve_shapes(preset: Preset, defaults: GenerationDefaults) -> list[tuple[int, int]]:
    """(width, height) to warm up at: the preset's ``[warmup] shapes``, else the size it generates by default."""
    return [(int(w), int(h)) for w, h in preset.warmup.shapes] or [(defaults.width, defaults.height)]


def warm_up(loaded: LoadedPipeline, preset: Preset, defaults: GenerationDefaults) -> float:
    """One generation per warm-up shape; returns the seconds it took."""
    started = time.perf_counter()
    shapes = serve_shapes(preset, defaults)
    for width, height in shapes:
        generate_images(
            loaded.pipe,
            loaded.device,
            ["warm-up"] * preset.batch_size,
            [0] * preset.batch_size,
            width=width,
            height=height,
            # Two at least, as the [speed] step's own warm-up always ran: what the compile cache saves after it.
            steps=max(2, preset.warmup.steps),
            guidance=defaults.guidance,
            max_sequence_length=defaults.max_sequence_length,
        )
    loaded.warmup_s = time.perf_counter() - started
    logger.info("warmed up preset %s at %s in %.1f s", preset.name, shapes, loaded.warmup_s)
    return loaded.warmup_s
