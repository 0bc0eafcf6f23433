"""Shared by the builders: one ``PipelineQuantizationConfig`` from per-library config factories.

diffusers components (transformer, vae) take diffusers' config class, transformers components (the
text encoders) take transformers' class of the same backend, as the seed's ``quant_mapping`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset

DIFFUSERS_COMPONENTS = ("transformer", "vae")
TRANSFORMERS_COMPONENTS = ("text_encoder", "text_encoder_2")


def quant_mapping(
    preset: Preset, for_diffusers: Callable[[], Any], for_transformers: Callable[[], Any]
) -> dict[str, Any]:
    """``{"quantization_config": PipelineQuantizationConfig(...)}`` for the preset's components."""
    from diffusers.quantizers import PipelineQuantizationConfig

    mapping: dict[str, Any] = {}
    for component in preset.quantization.components:
        if component in DIFFUSERS_COMPONENTS:
            mapping[component] = for_diffusers()
        elif component in TRANSFORMERS_COMPONENTS:
            mapping[component] = for_transformers()
        else:
            raise ConfigurationError(
                f"preset '{preset.name}': quantization.components has '{component}'; "
                f"known: {DIFFUSERS_COMPONENTS + TRANSFORMERS_COMPONENTS}"
            )
    if not mapping:
        return {}
    return {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)}


def torch_dtype(name: str, preset: Preset, field: str) -> Any:
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ConfigurationError(f"preset '{preset.name}': quantization.options.{field} '{name}' is not a torch dtype")
    return value


def check_options(preset: Preset, known: set[str]) -> dict[str, Any]:
    """The preset's options, refusing names the backend does not know (a typo must not pass silently)."""
    unknown = set(preset.quantization.options) - known
    if unknown:
        raise ConfigurationError(
            f"preset '{preset.name}': unknown quantization.options {sorted(unknown)} for backend "
            f"'{preset.quantization.backend}'; known: {sorted(known)}"
        )
    return preset.quantization.options
