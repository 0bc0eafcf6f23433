"""Quantization backends: a registry of small builders keyed by the preset's ``quantization.backend``.

Each backend is imported lazily, so a worker needs only the packages of its own preset.
"""

from __future__ import annotations

from typing import Any

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset

KNOWN_BACKENDS = ("none",)


def pipeline_kwargs(preset: Preset, dtype: Any) -> dict[str, Any]:
    """Extra ``FluxPipeline.from_pretrained`` arguments for the preset's backend."""
    backend = preset.quantization.backend
    if backend == "none":
        return {}
    raise ConfigurationError(
        f"preset '{preset.name}': unknown quantization backend '{backend}'; known: {KNOWN_BACKENDS}"
    )


def post_load(pipe: Any, preset: Preset, device: str) -> None:
    """Place the loaded pipeline and compile it as the preset says."""
    pipe.to(device)
    if preset.compile.enabled:
        if preset.compile.regional:
            pipe.transformer.compile_repeated_blocks(fullgraph=preset.compile.fullgraph, mode=preset.compile.mode)
        else:
            import torch

            pipe.transformer = torch.compile(
                pipe.transformer, fullgraph=preset.compile.fullgraph, mode=preset.compile.mode
            )
