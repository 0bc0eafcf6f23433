"""Keep the quantization packages a worker's preset does not use out of its process.

diffusers and transformers import bitsandbytes and torchao whenever they are installed. On the H100 host
that costs seconds of a worker's start (bitsandbytes alone imports in 10-12 s there, and loads its CUDA
library: ``benchmarks/results/``, import cost), for a preset that never calls them. A ``None`` entry in
``sys.modules`` is Python's documented way to make a package look absent: ``importlib.util.find_spec``
returns None for it, which is how both libraries probe availability, so they skip it.

Only for a process that serves one preset and has not imported diffusers yet (the worker's pool child):
the libraries decide availability once, at their own import.
"""

from __future__ import annotations

import logging
import sys

from fluxfleet import levers
from fluxfleet.backends import backend_spec
from fluxfleet.presets import Preset

logger = logging.getLogger(__name__)

# Top-level packages that diffusers/transformers probe with find_spec and import only when present.
OPTIONAL_PACKAGES = ("bitsandbytes", "torchao")


def packages_needed(preset: Preset) -> set[str]:
    """Which of ``OPTIONAL_PACKAGES`` the preset's backend or speed levers declare they use."""
    declared = set(backend_spec(preset.quantization.backend).packages) | levers.packages_needed(preset)
    return declared & set(OPTIONAL_PACKAGES)


def keep_unused_backends_out(preset: Preset) -> list[str]:
    """Hide the optional packages the preset does not need; returns what was hidden.

    Nothing is hidden once diffusers is imported (too late to matter) or where a package is already loaded.
    """
    if "diffusers" in sys.modules:
        return []
    hidden = []
    for package in OPTIONAL_PACKAGES:
        if package not in packages_needed(preset) and package not in sys.modules:
            sys.modules[package] = None  # type: ignore[assignment]
            hidden.append(package)
    if hidden:
        logger.info("preset %s does not use %s: not imported in this worker", preset.name, ", ".join(hidden))
    return hidden
