"""Replay the whole transformer forward as one CUDA graph per input shape (the ``cuda_graph`` speed lever).

A denoising step launches hundreds of kernels (210 fp8 GEMMs and 57 attention calls alone in an H100
profile): the regionally compiled blocks, their guards, and the eager parts around them (embeddings, RoPE,
the output norm). The fast preset's kernels summed to 88.6 ms per step while a step of the transformer took
93.3 ms: time between kernels, part of it the CPU launching them. A captured graph launches them all
with one call: -1.5 ms for the transformer, -1.3 ms per pipeline step (benchmarks/results/notes/2026-11-23-H100.md).

Each distinct input signature (shapes, dtypes, non-tensor arguments) is captured once, after two warm-up
runs on a side stream (so compilation and cuDNN/cuBLAS plans exist before capture), into one memory pool
shared by all of this transformer's graphs. Later calls copy their tensors into the captured inputs, replay,
and return a copy of the output, so a caller never holds memory the next replay overwrites. Beyond ``limit``
signatures, or with arguments a graph cannot hold (attention kwargs with content, tensors off the GPU),
the call runs the ordinary forward.

A forward that has modes (``workers.speed.step_cache.StepCache``: off, full, reuse) is asked for the mode
of each call before the graph is chosen; the mode is part of the key, so each mode is its own graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class GraphedForward:
    """Callable that replaces a module's ``forward``; keyword-only, as diffusers' pipelines call it."""

    def __init__(self, forward: Any, limit: int = 4) -> None:
        self.eager_forward = forward
        self.limit = limit
        self.graphs: dict[tuple[Any, ...], _Captured | None] = {}  # None: capture failed, run eagerly
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0
        self.mode_of_call = getattr(forward, "mode_of_call", None)
        if self.mode_of_call is not None:
            forward.decided_outside = True  # this wrapper advances its schedule, once per call

    @staticmethod
    def signature(kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        key = []
        for name, value in sorted(kwargs.items()):
            if isinstance(value, torch.Tensor):
                if not value.is_cuda:
                    return None
                key.append((name, tuple(value.shape), value.dtype, value.stride()))
            elif value is None or isinstance(value, bool | int | float | str):
                key.append((name, value))
            elif isinstance(value, dict) and not value:
                key.append((name, "{}"))  # FluxPipeline passes joint_attention_kwargs={} when it has none
            else:
                return None  # e.g. IP-adapter embeddings in joint_attention_kwargs: not a graph input
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), *key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        mode = self.mode_of_call() if self.mode_of_call is not None else None
        key = None if args else self.signature(kwargs)
        if key is not None and mode is not None:
            key = (mode, *key)
        if key is not None and key not in self.graphs and len(self.graphs) < self.limit:
            self.graphs[key] = self._try_capture(kwargs)
        captured = self.graphs.get(key) if key is not None else None
        if captured is None:
            return self.eager_forward(*args, **kwargs)
        for name, static in captured.inputs.items():
            static.copy_(kwargs[name])
        captured.graph.replay()
        self.replays += 1
        return self._wrap(captured.output.clone(), kwargs)

    def _try_capture(self, kwargs: dict[str, Any]) -> _Captured | None:
        try:
            return self._capture(kwargs)
        except Exception:  # a forward a graph cannot hold is slower without one, not broken
            logger.exception("CUDA graph capture of the transformer failed; this shape runs without a graph")
            torch.cuda.synchronize()
            # The aborted capture leaves the default CUDA generator in capture mode: every later random
            # draw on the GPU raises "Offset increment outside graph capture". An empty capture that ends
            # normally takes it out of that mode (measured on an H200, torch 2.11).
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
            return None

    def _capture(self, kwargs: dict[str, Any]) -> _Captured:
        inputs = {name: value.clone() for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        call = {**kwargs, **inputs, "return_dict": False}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.eager_forward(**call)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.eager_forward(**call)[0]
        logger.info(
            "captured a CUDA graph of the transformer for %s",
            {name: tuple(t.shape) for name, t in inputs.items() if t.dim() > 1},
        )
        return _Captured(graph=graph, inputs=inputs, output=output)

    @staticmethod
    def _wrap(output: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=output)
        return (output,)


def graph_the_transformer(transformer: torch.nn.Module, limit: int) -> GraphedForward:
    """Route ``transformer``'s forward through CUDA graphs (its module and hooks stay as they are)."""
    graphed = GraphedForward(transformer.forward, limit)
    transformer.forward = graphed  # type: ignore[method-assign]
    return graphed
