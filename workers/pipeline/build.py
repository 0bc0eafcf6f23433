"""Building a worker's pipeline, in one place and one order: plan, load, place, levers, compile, warm up.

Each step hands the next what it made; none calls back into another::

    plan      fluxfleet.planner, for the GPUs present (workers.pipeline.placement), and the backend's
              version-dependent refusals (workers.pipeline.backends)
    load      from_pretrained with the preset's quantization backend (workers.pipeline.loading)
    place     .to(), offload hooks (workers.pipeline.placement)
    levers    the preset's [speed] levers (workers.speed.levers)
    compile   the transformer, lazily (workers.pipeline.compile); the shared compile cache loaded
    warm up   once, at the shapes the worker serves, through serving's own code (workers.pipeline.warmup);
              then the compile cache is saved

Runs only inside the process that owns the GPU (the pool child), never in a parent that forks.
"""

from __future__ import annotations

import logging

from fluxfleet.presets import Preset, effective_defaults
from fluxfleet.settings import Settings
from workers.pipeline.adapters import prepare_hotswap
from workers.pipeline.backends import check_placement
from workers.pipeline.compile import compile_transformer
from workers.pipeline.footprint import record_after_load, record_generation_peak
from workers.pipeline.loading import (
    LoadedPipeline,
    StageClock,
    check_model_source,
    load,
    quiet_libraries,
    resolve_device,
)
from workers.pipeline.placement import apply_placement, plan_for_device
from workers.pipeline.warmup import warm_up
from workers.speed import compile_cache
from workers.speed.levers import apply_levers

logger = logging.getLogger(__name__)

__all__ = ["build_pipeline"]


def build_pipeline(preset: Preset, settings: Settings, warm: bool = False) -> LoadedPipeline:
    """The preset's pipeline, ready to serve. It warms up when ``warm`` (a worker: ``settings.worker.warmup``) or
    when its ``[speed]`` levers ask to (``speed.warm_up``: compiling before the compile cache is saved)."""
    clock = StageClock()
    quiet_libraries()
    # Imported here, so the "imports" stage holds what a worker pays once per process (seconds).
    import torch  # noqa: F401
    from diffusers import FluxPipeline  # noqa: F401

    source = preset.model_source(settings)
    check_model_source(source)
    device = resolve_device(settings.worker.device)
    clock.mark("imports")
    # Decide before loading: a balanced placement is a from_pretrained argument; refusals come first.
    placement = plan_for_device(preset, device)  # in a worker, the first CUDA call: it initialises CUDA
    check_placement(preset, placement)
    clock.mark("plan")
    pipe = load(preset, source, device, placement)
    clock.mark("from_pretrained")
    apply_placement(pipe, placement, device)
    clock.mark("placement")
    speed = apply_levers(pipe, preset, device)
    clock.mark("speed")
    prepare_hotswap(pipe, preset)  # before compiling: adapters then swap in without a recompile
    compile_transformer(pipe, preset)
    if compile_cache.wanted(preset):
        compile_cache.load_cache(preset, device, speed)
    clock.mark("compile")
    # load_s leaves out imports and the CUDA initialisation (the plan stage): paid once per process.
    load_s = sum(v for k, v in clock.stages.items() if k not in ("imports", "plan"))
    logger.info(
        "loaded preset %s (%s) on %s in %.1f s (%s)",
        preset.name,
        source,
        device,
        load_s,
        ", ".join(f"{k} {v:.1f}s" for k, v in clock.stages.items()),
    )
    memory = record_after_load(pipe, preset.name, device)
    loaded = LoadedPipeline(
        pipe=pipe, device=device, model=source, load_s=load_s, memory=memory, stages=clock.stages, speed=speed
    )
    if warm or (preset.speed.enabled and preset.speed.warm_up):
        speed.warmup_s = warm_up(loaded, preset, effective_defaults(preset, settings))
        record_generation_peak(memory, device)
        compile_cache.save_cache(speed)
        clock.mark("warm_up")  # loaded.stages is this clock's: the benchmarks show the warm-up beside the rest
    if preset.speed.enabled:
        logger.info(
            "speed levers for preset %s: %s; cache %s (%s) load %.1fs save %.1fs; warm-up %.1fs",
            preset.name,
            ", ".join(speed.applied) or "none",
            "hit" if speed.cache_hit else "miss",
            speed.cache_key,
            speed.cache_load_s,
            speed.cache_save_s,
            speed.warmup_s,
        )
    return loaded
