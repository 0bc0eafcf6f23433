"""Memory footprint: bytes per component after loading, device memory after load, peak per generation.

Quantized weights (bitsandbytes, torchao and quanto tensor subclasses, GGUF parameters) report their
real storage through ``get_memory_footprint`` on diffusers and transformers models; anything else is
counted from parameter and buffer bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
GIB = 1024**3


def tensor_bytes(tensor: Any) -> int:
    """Storage bytes of a tensor; a tensor subclass (torchao) counts the inner tensors it is made of,
    since its own ``element_size`` reports the dtype it stands for, not what it stores."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if callable(flatten):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return int(tensor.numel() * tensor.element_size())


def module_bytes(module: Any) -> int:
    """Bytes a module holds; quantized tensors count their packed storage."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(callable(getattr(t, "__tensor_flatten__", None)) for t in tensors):
        # get_memory_footprint multiplies numel by element_size, which over-counts torchao tensors.
        return sum(tensor_bytes(t) for t in tensors)
    footprint = getattr(module, "get_memory_footprint", None)
    if callable(footprint):
        try:
            return int(footprint())
        except Exception:  # some tensor subclasses do not answer; fall back to counting
            logger.debug("get_memory_footprint failed for %s; counting parameters", type(module).__name__)
    return sum(tensor_bytes(t) for t in tensors)


@dataclass
class MemoryRecord:
    """What a worker records about memory: per component, after load, and the last/max generation peak."""

    components: dict[str, int] = field(default_factory=dict)
    after_load_bytes: int = 0
    load_peak_bytes: int = 0
    """Most bytes allocated while loading, up to the warm-up (a backend's or a lever's conversion after loading
    included): the planner's ``load_peak_bytes``. The warm-up's peak is the first generation peak."""
    peak_bytes: int = 0
    last_peak_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "components": dict(self.components),
            "after_load_bytes": self.after_load_bytes,
            "load_peak_bytes": self.load_peak_bytes,
            "peak_bytes": self.peak_bytes,
            "last_peak_bytes": self.last_peak_bytes,
        }


def _cuda(device: str) -> Any:
    import torch

    return torch if device.startswith("cuda") and torch.cuda.is_available() else None


def record_after_load(pipe: Any, preset_name: str, device: str) -> MemoryRecord:
    """Log each component's footprint and the device memory after loading; reset the peak counter."""
    record = MemoryRecord()
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            record.components[name] = module_bytes(module)
            logger.info("preset %s: %s holds %.2f GiB", preset_name, name, record.components[name] / GIB)
    torch = _cuda(device)
    if torch is not None:
        # Summed over the worker's GPUs: a balanced placement spreads the components.
        record.after_load_bytes = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
        # Read before the reset below: nothing else keeps the peak of loading (bf16 weights before an fp8
        # conversion can need more than serving).
        record.load_peak_bytes = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    else:
        record.after_load_bytes = sum(record.components.values())
    # The peak while loading is known on a GPU only (the CPU keeps no allocation counter).
    peak = f" (peak while loading {record.load_peak_bytes / GIB:.2f} GiB)" if torch is not None else ""
    logger.info("preset %s: %.2f GiB after load on %s%s", preset_name, record.after_load_bytes / GIB, device, peak)
    return record


def record_generation_peak(record: MemoryRecord, device: str) -> int:
    """After a pipeline call: read and reset the peak counter; returns the bytes of this call's peak."""
    torch = _cuda(device)
    if torch is None:
        return 0
    peak = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    record.last_peak_bytes = peak
    record.peak_bytes = max(record.peak_bytes, peak)
    logger.debug("generation peak %.2f GiB", peak / GIB)
    return peak
