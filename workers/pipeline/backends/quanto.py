"""optimum-quanto: int4, int8 and float8 weights.

int4/int8 go through PipelineQuantizationConfig. float8 follows the seed's direct path (quanto's
``quantize`` + ``freeze`` on the loaded modules), because the diffusers integration did not handle
it; ``direct = true`` forces that path for any ``weights``.
"""

from __future__ import annotations

from typing import Any

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset
from workers.pipeline.backends.mapping import check_options, quant_mapping

WEIGHTS = ("int4", "int8", "float8")
OPTIONS = {"weights", "direct"}


def _weights(preset: Preset) -> tuple[str, bool]:
    opts = check_options(preset, OPTIONS)
    weights = str(opts.get("weights", "int8"))
    if weights not in WEIGHTS:
        raise ConfigurationError(
            f"preset '{preset.name}': quantization.options.weights '{weights}' is not one of {WEIGHTS}"
        )
    return weights, bool(opts.get("direct", weights == "float8"))


def pipeline_kwargs(preset: Preset, dtype: Any, source: str) -> dict[str, Any]:
    weights, direct = _weights(preset)
    if direct:
        return {}
    from diffusers import QuantoConfig as DiffusersConfig
    from transformers import QuantoConfig as TransformersConfig

    # The two classes name the same argument differently (weights_dtype vs weights).
    return quant_mapping(
        preset, lambda: DiffusersConfig(weights_dtype=weights), lambda: TransformersConfig(weights=weights)
    )


def after_load(pipe: Any, preset: Preset, dtype: Any) -> None:
    weights, direct = _weights(preset)
    if not direct:
        return
    from optimum.quanto import freeze, qfloat8, qint4, qint8, quantize

    qtype = {"int4": qint4, "int8": qint8, "float8": qfloat8}[weights]
    for name in preset.quantization.components:
        module = getattr(pipe, name, None)
        if module is None:
            raise ConfigurationError(
                f"preset '{preset.name}': quantization.components names '{name}', not in the pipeline"
            )
        quantize(module, weights=qtype)
        freeze(module)
