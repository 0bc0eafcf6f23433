"""Applying a placement: the only place that moves the pipeline onto devices.

The decision is ``fluxfleet.planner.plan_placement`` (pure numbers); this module reads the free memory
of the worker's GPUs and calls ``.to()``, ``enable_model_cpu_offload()`` or ``enable_group_offload()``.
``device_map="balanced"`` and loading straight onto a single GPU must be chosen before loading:
:func:`load_kwargs` gives them to ``from_pretrained``.
"""

from __future__ import annotations

import logging
from typing import Any

from fluxfleet.planner import GIB, Placement, plan_placement
from fluxfleet.presets import Preset

logger = logging.getLogger(__name__)


def gpu_free_bytes(device: str) -> list[int]:
    """Free bytes of each GPU this process sees (the worker's GPUs); empty on a CPU device."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def plan_for_device(preset: Preset, device: str) -> Placement:
    """Plan for the GPUs present; log the decision with its reason and expected peak."""
    free = gpu_free_bytes(device)
    if not free:  # a CPU worker (tests, the demo): whatever the preset says, the CPU is the place
        preset = preset.model_copy(update={"placement": preset.placement.model_copy(update={"policy": "cpu"})})
    plan = plan_placement(preset, free)
    logger.info(
        "preset %s: placement %s on %d GPU(s), expected peak %.1f GiB (%s)%s",
        preset.name,
        plan.policy,
        plan.gpus,
        plan.expected_peak_bytes / GIB,
        plan.reason,
        "" if plan.fits else "; WARNING: the estimate exceeds the free memory",
    )
    return plan


def load_kwargs(plan: Placement, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments the placement needs at load time.

    A whole-pipeline-on-one-GPU placement loads straight onto the GPU (``device_map="cuda"``): no bf16 copy
    in host memory first, backends that quantize while loading (quanto, torchao) do it on the GPU, and
    torchao's int4 packing, which has no CPU kernel, finds its weights there. diffusers accepts only the
    bare device type, so a worker addressing ``cuda:N`` loads on the CPU and moves afterwards.
    """
    if plan.policy == "balanced":
        return {"device_map": "balanced"}
    if plan.policy == "gpu" and device == "cuda":
        return {"device_map": "cuda"}
    return {}


def apply_placement(pipe: Any, plan: Placement, device: str) -> None:
    """Put the loaded pipeline where ``plan`` says; ``device`` is 'cuda', 'cuda:N' or 'cpu'."""
    import torch

    if plan.policy == "balanced":
        return  # from_pretrained(device_map="balanced") already placed every component
    if plan.policy == "cpu" or device == "cpu":
        pipe.to("cpu")
        return
    if plan.policy == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
        return
    if plan.policy == "group_offload":
        _group_offload(pipe, plan, torch.device(device))
        return
    pipe.to(device)
    if plan.text_encoder_off_gpu_after_encode:
        text_encoders_off_after_encode(pipe, device)


def _group_offload(pipe: Any, plan: Placement, onload: Any) -> None:
    import torch
    from diffusers.hooks import apply_group_offloading

    kwargs: dict[str, Any] = {
        "onload_device": onload,
        "offload_device": torch.device("cpu"),
        "offload_type": plan.group_offload_type,
        "use_stream": plan.group_offload_use_stream,
    }
    if plan.group_offload_type == "block_level":
        kwargs["num_blocks_per_group"] = 1
    for name in plan.group_offload_components:
        module = getattr(pipe, name)
        if hasattr(module, "enable_group_offload"):
            module.enable_group_offload(**kwargs)
        else:  # transformers models (T5): the generic hook
            apply_group_offloading(module, **kwargs)
    # The rest goes to the GPU; diffusers' pipe.to() leaves group-offloaded modules alone.
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None and name not in plan.group_offload_components:
            module.to(onload)


def text_encoders_off_after_encode(pipe: Any, device: str, offload_device: str = "cpu") -> None:
    """Text encoders come to the GPU when called and leave it when the transformer runs.

    The peak is then the transformer's working set without the text encoders beside it (~9.5 GB of T5 in
    bf16, ~4 GB in NF4); the cost is one host-device copy of the encoders per task (a task's prompts are
    encoded once, batched). diffusers puts the token ids on the encoder's current device (the CPU after
    the first task), so the hook that brings an encoder back also brings its inputs along.
    """
    import torch
    from torch.utils._pytree import tree_map

    target = torch.device(device)
    encoders = [
        m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None
    ]

    def where(module: Any) -> Any:
        return next(module.parameters()).device

    def to_gpu(module: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        if where(module).type != target.type:
            module.to(target)
        here = where(module)

        def move(x: Any) -> Any:
            return x.to(here) if isinstance(x, torch.Tensor) and x.device != here else x

        return tree_map(move, args), tree_map(move, kwargs)

    def encoders_off(_module: Any, _args: Any) -> None:
        for encoder in encoders:
            if where(encoder).type != torch.device(offload_device).type:
                encoder.to(offload_device)

    for encoder in encoders:
        encoder.register_forward_pre_hook(to_gpu, with_kwargs=True)
    pipe.transformer.register_forward_pre_hook(encoders_off)
