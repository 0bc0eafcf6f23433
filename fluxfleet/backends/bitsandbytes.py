"""bitsandbytes: 4-bit (nf4/fp4, nested quantization) or 8-bit LLM.int8 weights; quantizes on a CUDA GPU only."""

from __future__ import annotations

from fluxfleet.backends.base import BackendSpec, Options


def bytes_per_weight(options: Options, _dtype_bytes: float) -> float:
    if int(options.get("bits", 4)) == 8:
        return 1.0
    # 4-bit codes plus one fp32 absmax per 64 weights; nested quantization stores it in 8 bits.
    return 0.5 + (1 / 64 + 4 / (64 * 256) if options.get("double_quant", False) else 4 / 64)


SPEC = BackendSpec(
    name="bitsandbytes",
    bytes_per_weight=bytes_per_weight,
    packages=("bitsandbytes",),
    extra="bitsandbytes",
    serializable=True,
    dequantizable=True,
    refuses={"cpu": "bitsandbytes quantizes only on a CUDA GPU (diffusers: 'No GPU found')"},
    # transformers keeps T5's wo unquantized (bnb-nf4 10.67 GiB on an H100) unless the option quantizes it.
    quantizes_t5_wo=lambda options: bool(options.get("quantize_t5_wo")),
)
