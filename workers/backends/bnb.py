"""bitsandbytes: 4-bit (nf4/fp4, nested quantization) and 8-bit LLM.int8, through PipelineQuantizationConfig.

Options: ``bits`` (4 or 8), ``quant_type`` ("nf4"/"fp4"), ``compute_dtype`` (default: the preset's
dtype), ``double_quant``, ``llm_int8_threshold``, ``llm_int8_skip_modules``. Needs a CUDA GPU.
"""

from __future__ import annotations

from typing import Any

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset
from workers.backends.mapping import check_options, quant_mapping, torch_dtype

OPTIONS = {"bits", "quant_type", "compute_dtype", "double_quant", "llm_int8_threshold", "llm_int8_skip_modules"}


def config_kwargs(preset: Preset, dtype: Any) -> dict[str, Any]:
    """Arguments of BitsAndBytesConfig, identical for the diffusers and the transformers class."""
    opts = check_options(preset, OPTIONS)
    bits = int(opts.get("bits", 4))
    if bits == 4:
        if opts.get("quant_type", "nf4") not in ("nf4", "fp4"):
            raise ConfigurationError(f"preset '{preset.name}': quantization.options.quant_type must be 'nf4' or 'fp4'")
        compute = opts.get("compute_dtype")
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": opts.get("quant_type", "nf4"),
            # The docs: keep the compute dtype equal to torch_dtype; bnb's own default is float32.
            "bnb_4bit_compute_dtype": torch_dtype(compute, preset, "compute_dtype") if compute else dtype,
            "bnb_4bit_use_double_quant": bool(opts.get("double_quant", False)),
        }
    if bits == 8:
        kwargs: dict[str, Any] = {
            "load_in_8bit": True,
            "llm_int8_threshold": float(opts.get("llm_int8_threshold", 6.0)),
        }
        if opts.get("llm_int8_skip_modules"):
            kwargs["llm_int8_skip_modules"] = list(opts["llm_int8_skip_modules"])
        return kwargs
    raise ConfigurationError(f"preset '{preset.name}': quantization.options.bits must be 4 or 8, got {bits}")


def pipeline_kwargs(preset: Preset, dtype: Any, source: str) -> dict[str, Any]:
    from diffusers import BitsAndBytesConfig as DiffusersConfig
    from transformers import BitsAndBytesConfig as TransformersConfig

    kwargs = config_kwargs(preset, dtype)
    return quant_mapping(preset, lambda: DiffusersConfig(**kwargs), lambda: TransformersConfig(**kwargs))
