"""fp8 layerwise casting: weights stored in float8, cast up to the compute dtype layer by layer.

Not a quantizer: ``enable_layerwise_casting`` on diffusers models, ``apply_layerwise_casting`` on
others (T5, CLIP). Options: ``storage_dtype`` ("float8_e4m3fn" or "float8_e5m2"). diffusers' default
skip list keeps norms, embeddings and proj_in/out in the compute dtype.
"""

from __future__ import annotations

from typing import Any

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset
from workers.pipeline.backends.mapping import check_options, torch_dtype

STORAGE = ("float8_e4m3fn", "float8_e5m2")


def pipeline_kwargs(preset: Preset, dtype: Any, source: str) -> dict[str, Any]:
    check_options(preset, {"storage_dtype"})
    return {}


def after_load(pipe: Any, preset: Preset, dtype: Any) -> None:
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.models.modeling_utils import ModelMixin

    storage_name = preset.quantization.options.get("storage_dtype", "float8_e4m3fn")
    if storage_name not in STORAGE:
        raise ConfigurationError(f"preset '{preset.name}': quantization.options.storage_dtype must be one of {STORAGE}")
    storage = torch_dtype(storage_name, preset, "storage_dtype")
    for name in preset.quantization.components:
        module = getattr(pipe, name, None)
        if module is None:
            raise ConfigurationError(
                f"preset '{preset.name}': quantization.components names '{name}', not in the pipeline"
            )
        if isinstance(module, ModelMixin):
            module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype)
        else:
            apply_layerwise_casting(module, storage_dtype=storage, compute_dtype=dtype, skip_modules_pattern="auto")
