"""fp8 layerwise casting: weights stored in float8, cast up to the compute dtype layer by layer."""

from __future__ import annotations

from fluxfleet.backends.base import ALWAYS, BackendSpec

SPEC = BackendSpec(
    name="layerwise",
    bytes_per_weight=lambda _options, _dtype_bytes: 1.0,  # float8 storage
    quantizes_modulation=False,  # diffusers' skip list keeps the norms' linears in the compute dtype
    quantizes_t5_wo=ALWAYS,
    converts_after_load=ALWAYS,
)
