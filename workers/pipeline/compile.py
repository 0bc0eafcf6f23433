"""Compiling the transformer as the preset's ``[compile]`` says: its repeated blocks (regional) or the whole model.

Both are lazy: the graphs are traced at the first call, the start's warm-up, so the levers applied before
this step are what is compiled.
"""

from __future__ import annotations

from typing import Any

from fluxfleet.presets import Preset


def compile_transformer(pipe: Any, preset: Preset) -> None:
    spec = preset.compile
    if not spec.enabled:
        return
    if spec.regional:
        pipe.transformer.compile_repeated_blocks(fullgraph=spec.fullgraph, mode=spec.mode, dynamic=spec.dynamic)
        return
    import torch

    pipe.transformer = torch.compile(pipe.transformer, fullgraph=spec.fullgraph, mode=spec.mode, dynamic=spec.dynamic)
