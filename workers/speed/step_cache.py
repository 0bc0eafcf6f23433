"""Step caching in the worker: the transformer's forward with MagCache-style residual reuse (``step_cache``).

``StepCache`` replaces the transformer's ``forward`` on every preset and changes nothing until an item asks
for a policy (``fluxfleet.caching``). Each call runs in one of three modes:

    off    the forward as loaded: a ``cache = none`` item is computed exactly as without this module
    full   the same blocks, plus the block residual (image tokens after the last block minus after the
           embedding) written into a buffer kept per shape
    reuse  no blocks: the embedding plus the stored residual, then the output norm and projection

MagCache's and TaylorSeer's schedules are known before the run, so the mode of every call is decided on the
host without reading the GPU: under the ``cuda_graph`` lever each mode is its own captured graph (the mode is
part of the graph's key), the full graph writes the residual buffer and the reuse graph reads it, and the
compiled blocks see the inputs they were compiled for. FirstBlockCache and TaylorSeer run as diffusers'
hooks on presets without compile or graphs (``fluxfleet.caching.preset_refusal``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fluxfleet.caching import CachePolicy, schedule

logger = logging.getLogger(__name__)

MODES = ("off", "full", "reuse")


@dataclass
class StepCount:
    """Transformer calls of one pipeline run: computed through the blocks, or reused."""

    computed: int = 0
    reused: int = 0


class StepCache:
    """The transformer's ``forward``: keyword-only, as diffusers' pipelines call it."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.module = transformer
        self.original = transformer.forward
        self.plan: list[bool] | None = None
        self.calls = 0
        self.mode = "off"
        self.decided_outside = False
        """True once a CUDA graph wrapper calls :meth:`mode_of_call` itself before each call."""
        self.residuals: dict[tuple[Any, ...], torch.Tensor] = {}
        self.count = StepCount()

    # -- the schedule, advanced once per transformer call ---------------------------------------------------
    def mode_of_call(self) -> str:
        """The mode of the call about to run; advances the schedule."""
        if self.plan is None:
            self.mode = "off"
            return self.mode
        compute = self.plan[self.calls] if self.calls < len(self.plan) else True
        self.calls += 1
        self.mode = "full" if compute else "reuse"
        if compute:
            self.count.computed += 1
        else:
            self.count.reused += 1
        return self.mode

    @contextlib.contextmanager
    def run(self, policy: CachePolicy, steps: int) -> Iterator[StepCount]:
        """One pipeline run of ``steps`` steps under ``policy``; yields its count, complete on exit."""
        self.count = StepCount()
        self.calls = 0
        plan = schedule(policy, steps)
        hooked = plan is None or policy.name == "taylorseer"
        if hooked:
            self._enable_hooks(policy)
        # A hook policy runs the forward as loaded (its hooks sit on the blocks); the count follows its
        # schedule where it has one (TaylorSeer), else it is read from the hook's state at the end.
        self.plan = None if hooked else plan
        try:
            yield self.count
        finally:
            self.plan = None
            self.mode = "off"
            if hooked:
                self._finish_hooks(plan, steps)

    def _enable_hooks(self, policy: CachePolicy) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

        if policy.name == "fbcache":
            config: Any = FirstBlockCacheConfig(threshold=policy.option("threshold"))
        else:
            config = TaylorSeerCacheConfig(
                cache_interval=policy.option("interval"),
                disable_cache_before_step=policy.option("warmup"),
                max_order=policy.option("order"),
            )
        self.module.enable_cache(config)  # type: ignore[operator]
        if policy.name == "fbcache":
            self._count_first_block_decisions()

    def _count_first_block_decisions(self) -> None:
        """FirstBlockCache decides each step on the GPU's values: count its decisions as it takes them."""
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(self.module.transformer_blocks[0])  # type: ignore[index]
        head = registry.get_hook("fbc_leader_block_hook")
        decide = head._should_compute_remaining_blocks

        def counted(residual: torch.Tensor) -> bool:
            compute = bool(decide(residual))
            self.count.computed += compute
            self.count.reused += not compute
            return compute

        head._should_compute_remaining_blocks = counted

    def _finish_hooks(self, plan: list[bool] | None, steps: int) -> None:
        # TaylorSeer's count is its schedule; FirstBlockCache's was counted as it decided.
        if plan is not None:
            self.count.computed, self.count.reused = sum(plan), steps - sum(plan)
        self.module.disable_cache()  # type: ignore[operator]

    # -- the forward ---------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        mode = self.mode if self.decided_outside else self.mode_of_call()
        if mode == "off" or args:
            return self.original(*args, **kwargs)
        hook = getattr(self.module, "_hf_hook", None)
        if hook is not None:  # model CPU offload: the transformer's own hook brings it to the GPU first
            _, kwargs = hook.pre_forward(self.module, **kwargs)
        output = self._forward(kwargs, reuse=mode == "reuse")
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=output)
        return (output,)

    def _forward(self, kwargs: dict[str, Any], *, reuse: bool) -> torch.Tensor:
        """diffusers 0.42.1's ``FluxTransformer2DModel.forward`` without ControlNet, IP-adapter and gradient
        checkpointing (inference), with the residual kept or reused."""
        m: Any = self.module
        hidden = m.x_embedder(kwargs["hidden_states"])
        timestep = kwargs["timestep"].to(hidden.dtype) * 1000
        guidance = kwargs.get("guidance")
        if guidance is None:
            temb = m.time_text_embed(timestep, kwargs["pooled_projections"])
        else:
            temb = m.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, kwargs["pooled_projections"])
        key = (tuple(hidden.shape), hidden.dtype, hidden.device)
        if reuse:
            residual = self.residuals.get(key)
            if residual is None:
                raise RuntimeError("a reused step before any computed step of this shape")
            hidden = hidden + residual
        else:
            hidden = self._blocks(m, hidden, temb, kwargs, key)
        return m.proj_out(m.norm_out(hidden, temb))  # type: ignore[no-any-return]

    def _blocks(
        self, m: Any, hidden: torch.Tensor, temb: torch.Tensor, kwargs: dict[str, Any], key: tuple[Any, ...]
    ) -> torch.Tensor:
        embedded = hidden
        encoder = m.context_embedder(kwargs["encoder_hidden_states"])
        txt_ids, img_ids = kwargs["txt_ids"], kwargs["img_ids"]
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = m.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        attention_kwargs = kwargs.get("joint_attention_kwargs")
        for block in (*m.transformer_blocks, *m.single_transformer_blocks):
            encoder, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                temb=temb,
                image_rotary_emb=rotary,
                joint_attention_kwargs=attention_kwargs,
            )
        residual = self.residuals.get(key)
        if residual is None:
            # Allocated outside any graph capture (the graph wrapper's warm-up runs come first), so the
            # full and reuse graphs share one fixed address.
            residual = self.residuals[key] = torch.empty_like(hidden)
        torch.sub(hidden, embedded, out=residual)  # in place: no temporary of the residual's size
        return hidden


def install(transformer: torch.nn.Module) -> StepCache:
    """Route ``transformer``'s forward through a :class:`StepCache` (before any CUDA graph wraps it)."""
    cache = StepCache(transformer)
    transformer.forward = cache  # type: ignore[method-assign]
    return cache


def find(transformer: Any) -> StepCache | None:
    """The transformer's :class:`StepCache`, under a CUDA graph wrapper or ``torch.compile`` if any."""
    module = getattr(transformer, "_orig_mod", transformer)
    forward = module.forward
    forward = getattr(forward, "eager_forward", forward)
    return forward if isinstance(forward, StepCache) else None
