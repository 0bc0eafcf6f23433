"""GGUF: a pre-quantized transformer file (Q2_K, Q4_1, Q8_0, ...); ``quant_type`` sizes it for the planner."""

from __future__ import annotations

from fluxfleet.backends.base import BackendSpec, Options

BITS = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q5_0": 5.5, "Q5_1": 6.0}
BITS |= {"Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "F16": 16.0, "BF16": 16.0}


def bytes_per_weight(options: Options, _dtype_bytes: float) -> float:
    quant_type = str(options.get("quant_type", "Q8_0")).upper()
    if quant_type not in BITS:
        raise ValueError(f"quantization.options.quant_type '{quant_type}' is not one of {sorted(BITS)}")
    return BITS[quant_type] / 8


SPEC = BackendSpec(
    name="gguf",
    bytes_per_weight=bytes_per_weight,
    packages=("gguf",),
    extra="gguf",
    components=("transformer",),
)
