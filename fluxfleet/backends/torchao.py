"""torchao: int4/int8/float8 weight-only and float8 dynamic activation with row-wise scales."""

from __future__ import annotations

from fluxfleet.backends.base import ALWAYS, BackendSpec, Options


def bytes_per_weight(options: Options, _dtype_bytes: float) -> float:
    if "int4" in str(options.get("type", "int8")):
        # Packed int4 plus a bf16 scale and zero point per group; measured: torchao-int4's transformer
        # 6,330,368,128 bytes (an H100 smoke run).
        return 0.5 + 4 / int(options.get("group_size", 128))
    return 1.0


SPEC = BackendSpec(
    name="torchao",
    bytes_per_weight=bytes_per_weight,
    packages=("torchao",),
    extra="torchao",
    serializable=True,
    refuses={
        "group_offload_stream": "torchao tensors under group offload with use_stream=True stay on the CPU or fail "
        "to pin (diffusers issues #13281, #14433); set placement.group_offload_use_stream = false",
    },
    # torchao quantizes T5's wo too (torchao-int4's T5 2,723,557,376 bytes on an H100).
    quantizes_t5_wo=ALWAYS,
)
