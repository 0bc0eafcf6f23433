"""What a start's speed step did: the levers applied, the compile cache, the warm-up (for logs and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpeedReport:
    applied: list[str] = field(default_factory=list)
    cache_key: str | None = None
    cache_path: str | None = None
    cache_hit: bool = False
    cache_load_s: float = 0.0
    cache_save_s: float = 0.0
    cache_bytes: int = 0
    quantize_s: float = 0.0
    """Seconds the levers took to apply (the fp8 conversions, mostly)."""
    warmup_s: float = 0.0
