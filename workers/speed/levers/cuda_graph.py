"""``cuda_graph``: the transformer's forward replayed as a CUDA graph per input shape
(``workers.speed.cuda_graphs``), captured during the warm-up. CUDA only: elsewhere the lever is skipped."""

from __future__ import annotations

import logging
from typing import Any

from fluxfleet.presets import Preset
from workers.speed.levers import unwrap
from workers.speed.report import SpeedReport

logger = logging.getLogger(__name__)


def apply(pipe: Any, preset: Preset, device: str, report: SpeedReport) -> None:
    if not device.startswith("cuda"):
        logger.info("preset %s: cuda_graph needs CUDA; running without on %s", preset.name, device)
        return
    from workers.speed.cuda_graphs import graph_the_transformer

    graph_the_transformer(unwrap(pipe.transformer), preset.speed.cuda_graph_limit)
    report.applied.append("cuda_graph")
