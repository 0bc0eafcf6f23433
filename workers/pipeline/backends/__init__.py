"""Quantization loaders: ``workers/pipeline/backends/NAME.py`` loads the backend that ``fluxfleet/backends/NAME.py``
declares.

Each loader is imported lazily, so a worker needs only the packages of its own preset; a missing package
fails with the declared extra to install. A loader module provides::

    pipeline_kwargs(preset, dtype, source) -> dict   # extra FluxPipeline.from_pretrained arguments
    after_load(pipe, preset, dtype) -> None          # optional: quantization applied to loaded modules
    check_placement(preset, plan) -> None            # optional: refusals that depend on installed versions
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from fluxfleet.backends import BackendSpec, backend_spec
from fluxfleet.errors import BackendMissingError, ConfigurationError
from fluxfleet.planner import Placement
from fluxfleet.presets import Preset


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def declared(preset: Preset) -> BackendSpec:
    try:
        return backend_spec(preset.quantization.backend)
    except ValueError as e:
        raise ConfigurationError(f"preset '{preset.name}': {e}") from e


def loader(preset: Preset) -> ModuleType:
    """The loader module of the preset's backend; raises BackendMissingError naming the extra."""
    spec = declared(preset)
    for package in spec.packages:
        if not _installed(package):
            raise BackendMissingError(spec.name, package, spec.extra)
    return importlib.import_module(f"{__name__}.{spec.name}")


def pipeline_kwargs(preset: Preset, dtype: Any, source: str | None = None) -> dict[str, Any]:
    """Extra ``FluxPipeline.from_pretrained`` arguments for the preset's backend."""
    return loader(preset).pipeline_kwargs(preset, dtype, source or preset.model)


def after_load(pipe: Any, preset: Preset, dtype: Any) -> None:
    """Quantization that diffusers applies to loaded modules rather than through from_pretrained."""
    hook = getattr(loader(preset), "after_load", None)
    if hook is not None:
        hook(pipe, preset, dtype)


def check_placement(preset: Preset, plan: Placement) -> None:
    """The backend's refusals of ``plan`` that depend on the installed versions (the planner judged the rest)."""
    hook = getattr(loader(preset), "check_placement", None)
    if hook is not None:
        hook(preset, plan)


def saved_quantization(source: str) -> list[str]:
    """Components of a local pipeline directory saved already quantized (their config names a method)."""
    root = Path(source).expanduser()
    found = []
    for config in sorted(root.glob("*/config.json")) if root.is_dir() else []:
        try:
            if json.loads(config.read_text()).get("quantization_config"):  # null once dequantized
                found.append(config.parent.name)
        except (OSError, ValueError):
            continue
    return found
