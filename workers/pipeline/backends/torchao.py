"""torchao: int4/int8/float8 weight-only and float8 dynamic activation with row-wise scales.

diffusers 0.38+ takes torchao config objects, not string names. ``type`` is one of TYPES; int4 takes
``group_size`` and ``int4_packing_format``. torchao 0.18's default int4 format ("plain") needs the
mslk package, which has no usable wheel on the GPU host; "tile_packed_to_4d" runs on torch's own
tinygemm kernel (``aten._weight_int4pack_mm``, CUDA, bfloat16 only), so it is the default here.

The float8 configs are ``workers.speed.torchao_float8``'s, shared with the ``[speed]`` fp8 levers; every
config is built with ``set_inductor_config=False`` (why: that module).
"""

from __future__ import annotations

from typing import Any

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset
from workers.pipeline.backends.mapping import check_options, quant_mapping
from workers.speed.torchao_float8 import float8_config

TYPES = ("int4_weight_only", "int8_weight_only", "float8_weight_only", "float8_dynamic_row")
OPTIONS = {"type", "group_size", "int4_packing_format", "modules_to_not_convert"}


def ao_config(preset: Preset) -> Any:
    """The torchao config object for the preset's ``type``."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    opts = check_options(preset, OPTIONS)
    kind = opts.get("type", "int8_weight_only")
    if kind == "int4_weight_only":
        packing = opts.get("int4_packing_format", "tile_packed_to_4d")
        if packing == "tile_packed_to_4d" and preset.dtype != "bfloat16":
            raise ConfigurationError(
                f"preset '{preset.name}': torchao int4 'tile_packed_to_4d' needs dtype = 'bfloat16', "
                f"got '{preset.dtype}'"
            )
        return Int4WeightOnlyConfig(
            group_size=int(opts.get("group_size", 128)), int4_packing_format=packing, set_inductor_config=False
        )
    if kind == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if kind == "float8_weight_only":
        return float8_config("weight_only")
    if kind == "float8_dynamic_row":
        return float8_config("dynamic_row")
    raise ConfigurationError(f"preset '{preset.name}': quantization.options.type '{kind}' is not one of {TYPES}")


def pipeline_kwargs(preset: Preset, dtype: Any, source: str) -> dict[str, Any]:
    from diffusers import TorchAoConfig as DiffusersConfig
    from transformers import TorchAoConfig as TransformersConfig

    skip = preset.quantization.options.get("modules_to_not_convert")
    return quant_mapping(
        preset,
        lambda: DiffusersConfig(ao_config(preset), modules_to_not_convert=skip),
        lambda: TransformersConfig(ao_config(preset), modules_to_not_convert=skip),
    )
