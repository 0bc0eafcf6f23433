"""Quantization backends: a registry of small builders keyed by the preset's ``quantization.backend``.

Each builder module is imported lazily, so a worker needs only the packages of its own preset; a
missing package fails with the extra to install. A builder module provides::

    pipeline_kwargs(preset, dtype, source) -> dict   # extra FluxPipeline.from_pretrained arguments
    after_load(pipe, preset, dtype) -> None          # optional: quantization applied to loaded modules

``pipeline_kwargs`` and ``post_load`` below are what ``workers.loading`` calls.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from fluxfleet.errors import BackendMissingError, ConfigurationError
from fluxfleet.presets import Preset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One entry of the registry: the builder module and what it needs installed."""

    module: str
    packages: tuple[str, ...] = ()  # import names, checked before the builder is imported
    extra: str = ""  # the pyproject extra that installs them
    serializable: bool = False  # save_pretrained keeps the quantized weights (workers.quantize)


BACKENDS: dict[str, Backend] = {
    "none": Backend("workers.backends.none", serializable=True),
    "bitsandbytes": Backend("workers.backends.bnb", ("bitsandbytes",), "bitsandbytes", serializable=True),
    "torchao": Backend("workers.backends.ao", ("torchao",), "torchao", serializable=True),
    "quanto": Backend("workers.backends.quanto", ("optimum.quanto",), "quanto"),
    "gguf": Backend("workers.backends.single_file", ("gguf",), "gguf"),
    "layerwise": Backend("workers.backends.layerwise"),
}
KNOWN_BACKENDS = tuple(BACKENDS)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def backend_entry(preset: Preset) -> Backend:
    name = preset.quantization.backend
    if name not in BACKENDS:
        raise ConfigurationError(
            f"preset '{preset.name}': unknown quantization backend '{name}'; known: {KNOWN_BACKENDS}"
        )
    return BACKENDS[name]


def load_backend(preset: Preset) -> ModuleType:
    """The builder module of the preset's backend; raises BackendMissingError naming the extra."""
    entry = backend_entry(preset)
    for package in entry.packages:
        if not _installed(package):
            raise BackendMissingError(preset.quantization.backend, package, entry.extra)
    return importlib.import_module(entry.module)


def pipeline_kwargs(preset: Preset, dtype: Any, source: str | None = None) -> dict[str, Any]:
    """Extra ``FluxPipeline.from_pretrained`` arguments for the preset's backend."""
    builder = load_backend(preset)
    return builder.pipeline_kwargs(preset, dtype, source or preset.model)


def after_load(pipe: Any, preset: Preset, dtype: Any) -> None:
    """Quantization that diffusers applies to loaded modules rather than through from_pretrained."""
    builder = load_backend(preset)
    hook = getattr(builder, "after_load", None)
    if hook is not None:
        hook(pipe, preset, dtype)


def post_load(pipe: Any, preset: Preset, device: str, placement: Any = None) -> None:
    """Place the loaded pipeline (planned when ``placement`` is None) and compile it as the preset says."""
    from workers.placement import apply_placement, plan_for_device

    apply_placement(pipe, placement or plan_for_device(preset, device), device)
    if preset.compile.enabled:
        if preset.compile.regional:
            pipe.transformer.compile_repeated_blocks(
                fullgraph=preset.compile.fullgraph, mode=preset.compile.mode, dynamic=preset.compile.dynamic
            )
        else:
            import torch

            pipe.transformer = torch.compile(
                pipe.transformer,
                fullgraph=preset.compile.fullgraph,
                mode=preset.compile.mode,
                dynamic=preset.compile.dynamic,
            )


def saved_quantization(source: str) -> list[str]:
    """Components of a local pipeline directory saved already quantized (their config names a method)."""
    import json
    from pathlib import Path

    root = Path(source).expanduser()
    found = []
    for config in sorted(root.glob("*/config.json")) if root.is_dir() else []:
        try:
            if json.loads(config.read_text()).get("quantization_config"):  # null once dequantized
                found.append(config.parent.name)
        except (OSError, ValueError):
            continue
    return found
