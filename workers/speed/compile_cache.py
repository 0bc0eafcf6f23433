"""The shared compile cache: ``torch.compile``'s artifacts (inductor, triton, autotune) kept between starts.

Saved with ``torch.compiler.save_cache_artifacts`` in a shared directory after the start's warm-up and
loaded before it by the next worker with the same key (GPU model, torch/diffusers/torchao/triton versions,
preset, shapes). A hit skips inductor's codegen and autotuning; dynamo still traces the two block types.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fluxfleet.presets import Preset
from workers.speed.report import SpeedReport

logger = logging.getLogger(__name__)

CACHE_ENV = "FLUXFLEET_COMPILE_CACHE_DIR"
# What ``with sdpa_kernel(...)`` leaves in a dynamo graph (torch 2.11-2.13).
SDPA_KERNEL_HELPERS = ("torch.nn.attention._sdpa_kernel", "torch.nn.attention._backend_from_string")


def versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "torchao", "triton", "bitsandbytes"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def warmup_shapes(preset: Preset) -> list[tuple[int, int]]:
    """The preset's warm-up shapes as its TOML gives them (its defaults' size when it lists none)."""
    if preset.warmup.shapes:
        return [tuple(s) for s in preset.warmup.shapes]  # type: ignore[misc]
    return [(int(preset.defaults.get("width", 1024)), int(preset.defaults.get("height", 1024)))]


def cache_key(preset: Preset, device: str) -> str:
    """GPU model + versions + the preset's loading/speed/compile settings + warm-up shapes."""
    import torch

    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    material = {
        "gpu": gpu,
        "versions": versions(),
        "preset": preset.name,
        "settings": preset.model_dump(include={"dtype", "batch_size", "quantization", "compile", "speed"}),
        "shapes": warmup_shapes(preset),
        "max_sequence_length": int(preset.defaults.get("max_sequence_length", 512)),
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
    safe_gpu = "".join(c if c.isalnum() else "-" for c in gpu)
    return f"{preset.name}-{safe_gpu}-torch{material['versions'].get('torch', '?')}-{digest}"


def cache_dir(preset: Preset) -> Path:
    chosen = os.environ.get(CACHE_ENV) or preset.speed.compile_cache_dir or "~/.cache/fluxfleet/compile-cache"
    return Path(chosen).expanduser()


def wanted(preset: Preset) -> bool:
    return preset.speed.compile_cache and preset.compile.enabled


def load_cache(preset: Preset, device: str, report: SpeedReport) -> None:
    """Before the first compiled call: load the artifacts saved under the preset's key, if any."""
    import torch
    import torch._inductor.config

    # diffusers' _native_* attention backends pick the SDPA kernel with torch.nn.attention.sdpa_kernel,
    # which dynamo records as calls to two private helpers of torch.nn.attention. AOTAutograd's cache
    # refuses private torch functions it does not know, so every warm start re-ran AOT tracing although
    # inductor's graphs came from the cache (dynamo+AOT 7.4-8.7 s before, 4.7 s after on an H100 host).
    # Their arguments are constants of the graph, so marking them cacheable keys the cache on them.
    for helper in SDPA_KERNEL_HELPERS:
        torch._inductor.config.unsafe_marked_cacheable_functions[helper] = torch.__version__
    report.cache_key = cache_key(preset, device)
    path = cache_dir(preset) / f"{report.cache_key}.bin"
    report.cache_path = str(path)
    if path.is_file():
        started = time.perf_counter()
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
            report.cache_hit = True
        except Exception as e:  # a corrupt or foreign artifact only costs a compile
            logger.warning("compile cache %s unusable (%s); compiling", path, e)
        report.cache_load_s = time.perf_counter() - started


def save_cache(report: SpeedReport) -> None:
    """After the warm-up, on a miss: save what compiling it made, atomically."""
    import torch

    if report.cache_path is None or report.cache_hit:
        return
    path = Path(report.cache_path)
    started = time.perf_counter()
    saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        data: Any = saved[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: concurrent workers never read half a file
        report.cache_bytes = len(data)
    report.cache_save_s = time.perf_counter() - started
