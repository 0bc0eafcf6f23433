"""No quantization: the components load in the preset's dtype (the bf16 reference)."""

from __future__ import annotations

from fluxfleet.backends.base import BackendSpec

SPEC = BackendSpec(
    name="none",
    bytes_per_weight=lambda _options, dtype_bytes: dtype_bytes,
    serializable=True,
    components=(),  # quantizes nothing
)
