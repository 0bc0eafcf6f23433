"""optimum-quanto: int4, int8 and float8 weights; float8 (or ``direct = true``) quantizes the loaded modules."""

from __future__ import annotations

from fluxfleet.backends.base import BackendSpec, Options


def direct(options: Options) -> bool:
    """quanto's own quantize/freeze on the loaded modules instead of diffusers' integration."""
    return bool(options.get("direct", str(options.get("weights", "int8")) == "float8"))


def bytes_per_weight(options: Options, _dtype_bytes: float) -> float:
    # int4: packed plus a bf16 scale and zero point per group of 128 (quanto-int4 10.26 GiB, an H100 smoke run).
    return 0.5 + 4 / 128 if "int4" in str(options.get("weights", "int8")) else 1.0


SPEC = BackendSpec(
    name="quanto",
    bytes_per_weight=bytes_per_weight,
    packages=("optimum.quanto",),
    extra="quanto",
    refuses={"group_offload": "quanto weights stay on the CPU under group offload (diffusers issue #12610)"},
    # Through transformers' integration T5's wo stays in the dtype (quanto-int8's T5 5,902,513,280 bytes on
    # an H100); quanto's direct path quantizes every linear.
    quantizes_t5_wo=direct,
    converts_after_load=direct,
)
