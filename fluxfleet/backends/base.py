"""What a quantization backend declares: plain data and pure functions of its options, no torch.

The contract reads these declarations (the preset validator, the planner's estimate, the install hint);
the worker's loader for backend NAME is ``workers/pipeline/backends/NAME.py``, which reads them too (the
packages to check, what ``fluxfleet quantize`` may save). Like diffusers' ``DiffusersQuantizer``
subclasses, nothing outside the declaration and the loader branches on a backend's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Options = Mapping[str, Any]


def _always(_options: Options) -> bool:
    return True


def _never(_options: Options) -> bool:
    return False


@dataclass(frozen=True)
class BackendSpec:
    """One quantization backend, as the rest of fluxfleet needs to know it.

    ``bytes_per_weight(options, dtype_bytes)`` sizes the linear layers it quantizes (scales included);
    ``refuses`` maps what the backend cannot run under to the reason: a placement policy, ``group_offload_stream``
    (group offload with CUDA streams), ``compile`` or ``cuda_graph`` (the last two refused when the preset is
    read, the policies when the planner places it).
    """

    name: str
    bytes_per_weight: Callable[[Options, float], float]
    packages: tuple[str, ...] = ()
    """Import names the loader needs; a worker checks them first and keeps the others out of its process."""
    extra: str = ""
    """The pyproject extra that installs ``packages``: the worker's install hint (``BackendMissingError``)."""
    serializable: bool = False
    """``save_pretrained`` keeps the quantized weights (``fluxfleet quantize``)."""
    dequantizable: bool = False
    """diffusers can turn the weights back into the preset's dtype (``fluxfleet quantize --dequantize``)."""
    refuses: Mapping[str, str] = field(default_factory=dict)
    quantizes_modulation: bool = True
    """Whether the AdaLayerNorm (modulation) linears are quantized too; layerwise casting skips them."""
    quantizes_t5_wo: Callable[[Options], bool] = _never
    """Whether T5's ``wo`` layers, which transformers keeps out of most quantizers, are quantized."""
    converts_after_load: Callable[[Options], bool] = _never
    """Whether it quantizes loaded bf16 modules (after ``from_pretrained``) rather than while loading."""
    components: tuple[str, ...] | None = None
    """Components it always quantizes whatever the preset lists (a GGUF file holds the transformer); None: the
    preset's ``quantization.components``."""


ALWAYS = _always
