"""Quantization backends by name: each module here declares one (``SPEC``, a :class:`BackendSpec`).

Adding a backend is a declaration here, its loader ``workers/pipeline/backends/NAME.py`` and a preset TOML.
"""

from __future__ import annotations

from fluxfleet.backends import bitsandbytes, gguf, layerwise, none, quanto, torchao
from fluxfleet.backends.base import BackendSpec

__all__ = ["BACKENDS", "KNOWN_BACKENDS", "BackendSpec", "backend_spec"]

BACKENDS: dict[str, BackendSpec] = {
    module.SPEC.name: module.SPEC for module in (none, bitsandbytes, torchao, quanto, gguf, layerwise)
}
KNOWN_BACKENDS = tuple(BACKENDS)


def backend_spec(name: str) -> BackendSpec:
    """The declaration of backend ``name``; ValueError naming the known ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown quantization backend '{name}'; known: {list(KNOWN_BACKENDS)}")
    return BACKENDS[name]
