"""bitsandbytes: 4-bit (nf4/fp4, nested quantization) and 8-bit LLM.int8, through PipelineQuantizationConfig.

Options: ``bits`` (4 or 8), ``quant_type`` ("nf4"/"fp4"), ``compute_dtype`` (default: the preset's
dtype), ``double_quant``, ``llm_int8_threshold``, ``llm_int8_skip_modules``, ``quantize_t5_wo``. Needs a
CUDA GPU for loading through diffusers.

``quantize_t5_wo`` (4-bit only): transformers leaves T5's feed-forward output layers (``wo``, 1.0B of T5-XXL's
4.7B parameters) out of bitsandbytes quantization because they overflow in float16; in bfloat16 that only
costs memory (2 GB). This option quantizes them after loading with bitsandbytes' own ``Linear4bit``, storing
the packed weights in the compute dtype: T5's forward casts its input to ``wo.weight.dtype``, which must not
be the packed uint8.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from fluxfleet.errors import ConfigurationError
from fluxfleet.planner import Placement
from fluxfleet.presets import Preset
from workers.pipeline.backends.mapping import check_options, quant_mapping, torch_dtype

OPTIONS = {
    "bits",
    "quant_type",
    "compute_dtype",
    "double_quant",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "quantize_t5_wo",
}


def config_kwargs(preset: Preset, dtype: Any) -> dict[str, Any]:
    """Arguments of BitsAndBytesConfig, identical for the diffusers and the transformers class."""
    opts = check_options(preset, OPTIONS)
    bits = int(opts.get("bits", 4))
    if opts.get("quantize_t5_wo") and (bits != 4 or "text_encoder_2" not in preset.quantization.components):
        raise ConfigurationError(
            f"preset '{preset.name}': quantization.options.quantize_t5_wo needs bits = 4 and 'text_encoder_2' "
            "in quantization.components"
        )
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


def after_load(pipe: Any, preset: Preset, dtype: Any) -> None:
    if preset.quantization.options.get("quantize_t5_wo"):
        quantize_t5_wo(pipe.text_encoder_2, config_kwargs(preset, dtype))


def quantize_t5_wo(encoder: Any, kwargs: dict[str, Any]) -> int:
    """Replace T5's unquantized ``wo`` linears by 4-bit ones where they are; returns how many."""
    import bitsandbytes as bnb
    import torch

    compute = kwargs["bnb_4bit_compute_dtype"]
    replaced = 0
    for block in encoder.modules():
        wo = getattr(block, "wo", None)
        if not isinstance(wo, torch.nn.Linear) or isinstance(wo, bnb.nn.Linear4bit):
            continue
        packed = bnb.nn.Linear4bit(
            wo.in_features,
            wo.out_features,
            bias=wo.bias is not None,
            compute_dtype=compute,
            compress_statistics=kwargs["bnb_4bit_use_double_quant"],
            quant_type=kwargs["bnb_4bit_quant_type"],
            quant_storage=compute,
            device="meta",
        )
        packed.weight = bnb.nn.Params4bit(
            wo.weight.data.to(compute),
            requires_grad=False,
            compress_statistics=kwargs["bnb_4bit_use_double_quant"],
            quant_type=kwargs["bnb_4bit_quant_type"],
            quant_storage=compute,
        )
        if wo.bias is not None:
            packed.bias = torch.nn.Parameter(wo.bias.data, requires_grad=False)
        block.wo = packed.to(wo.weight.device)  # moving a Params4bit is what quantizes it
        replaced += 1
    return replaced


def check_placement(preset: Preset, plan: Placement) -> None:
    """8-bit weights and model CPU offload: only bitsandbytes from 0.48 moves them."""
    if int(preset.quantization.options.get("bits", 4)) == 8 and plan.policy == "model_offload":
        version = importlib.metadata.version("bitsandbytes")
        if tuple(int(p) for p in version.split(".")[:2]) < (0, 48):
            raise ConfigurationError(
                f"preset '{preset.name}': bitsandbytes 8-bit cannot be moved by model CPU offload with "
                f"bitsandbytes {version} (diffusers skips its hook, so it never leaves the GPU); needs >= 0.48"
            )
