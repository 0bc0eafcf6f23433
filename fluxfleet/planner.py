"""Memory planning: where a preset's pipeline should live, from its memory estimate.

Pure numbers, no torch: the producer (``fluxfleet plan``) and the worker share it, and tests run it
with a table. The estimate (``fluxfleet.estimate``) is parameter counts of the FLUX.1-dev components
times bytes per weight of the preset's backend and ``[speed]`` fp8 conversion, plus the working memory
of each stage, checked against the GPU measurements in ``benchmarks/results/``::

    plan = plan_placement(preset, [24 * GIB])
    plan.policy, plan.after_load_bytes, plan.expected_peak_bytes, plan.load_peak_bytes, plan.reason

Two peaks: serving (weights plus a generation's working memory) and loading (a preset converted after
loading holds its bf16 weights on the GPU first). A plan fits only when both do.

A preset whose model is not FLUX.1-dev-sized says so (``[estimate] applies = false``): it gets no
numbers (``no_estimate_reason``) and must force its placement policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

from fluxfleet.backends import backend_spec
from fluxfleet.errors import ConfigurationError
from fluxfleet.estimate import (
    COMPONENTS,
    GIB,
    LARGEST_BLOCK,
    LARGEST_LINEAR,
    PARAMS,
    TEXT_ENCODERS,
    component_bytes,
    load_peak,
    no_estimate_reason,
    stage_bytes,
    working_bytes,
)
from fluxfleet.presets import Preset

__all__ = [
    "COMPONENTS",
    "GIB",
    "SAFETY_BYTES",
    "Placement",
    "component_bytes",
    "incompatibility",
    "no_estimate_reason",
    "parse_bytes",
    "plan_placement",
]

SAFETY_BYTES = 512 * 1024**2
"""Bytes kept free on each GPU for the CUDA context, cuBLAS workspaces and fragmentation."""

Policy = Literal["gpu", "balanced", "model_offload", "group_offload", "cpu"]


@dataclass(frozen=True)
class Placement:
    """Where the pipeline lives; decided by :func:`plan_placement`, applied by ``workers.pipeline.placement``."""

    policy: Policy
    gpus: int = 1
    text_encoder_off_gpu_after_encode: bool = False
    group_offload_type: str = "leaf_level"
    group_offload_use_stream: bool = True
    group_offload_components: tuple[str, ...] = ()
    estimate: dict[str, int] = field(default_factory=dict)
    """Bytes of each component once loaded and converted, wherever it lives."""
    after_load_bytes: int = 0
    """Bytes on the GPUs once loaded, all GPUs together (0 where every component waits on the CPU)."""
    gpu_peaks: tuple[int, ...] = ()
    """Serving peak of each GPU: its weights plus the largest working memory of the stages it runs."""
    expected_peak_bytes: int = 0
    """The largest serving peak on one GPU."""
    load_peak_bytes: int = 0
    """The largest allocation on one GPU while loading: more than serving where weights are converted on it."""
    load_peak_step: str = ""
    """The loading step that sets ``load_peak_bytes``."""
    fits: bool = True
    """Both peaks fit the GPUs, serving and loading."""
    load_fits: bool = True
    reason: str = ""
    no_estimate_reason: str = ""
    """Set when the preset has no estimate: ``estimate`` is then empty and the peaks unknown (0)."""


def incompatibility(preset: Preset, policy: str) -> str | None:
    """Why ``policy`` cannot run this preset, or None. Version-dependent checks happen in the worker."""
    refuses = backend_spec(preset.quantization.backend).refuses
    if policy in refuses:
        return refuses[policy]
    if policy == "group_offload" and preset.placement.group_offload_use_stream and "group_offload_stream" in refuses:
        return refuses["group_offload_stream"]
    if policy == "group_offload" and preset.compile.enabled and preset.compile.fullgraph:
        # Group offload hooks sit on the layers inside the compiled blocks and move weights mid-forward.
        return (
            "group offload hooks run inside the compiled blocks, which fullgraph cannot trace; "
            "set compile.fullgraph = false"
        )
    return None


def _one_gpu(
    policy: str, preset: Preset, est: dict[str, int], stages: dict[str, int], te_off: bool, offloaded: tuple[str, ...]
) -> tuple[int, int, tuple[int, str]]:
    """(serving peak, bytes on the GPU after loading, (load peak, its step)) of a policy that uses one GPU."""
    total = sum(est.values())
    if policy == "gpu":
        if te_off:  # the encoders leave the GPU before the transformer runs
            te = sum(est[c] for c in TEXT_ENCODERS)
            peak = max(
                total + working_bytes(stages, TEXT_ENCODERS),
                total - te + working_bytes(stages, ("transformer", "vae")),
            )
        else:
            peak = total + working_bytes(stages, COMPONENTS)
        # workers.pipeline.placement.load_kwargs loads a one-GPU pipeline straight onto the GPU (device_map="cuda").
        return peak, total, load_peak(preset, COMPONENTS, straight_to_gpu=True)
    if policy == "model_offload":
        # One component at a time on the GPU, with its stage's working memory. Loading (and any [speed]
        # conversion) happens on the CPU.
        return max(est[c] + working_bytes(stages, (c,)) for c in COMPONENTS), 0, (0, "loading on the CPU")
    if policy == "group_offload":
        per_weight = est["transformer"] / sum(PARAMS["transformer"].values())
        unit = LARGEST_BLOCK * preset.placement.num_blocks_per_group
        if preset.placement.group_offload_type == "leaf_level":
            unit = LARGEST_LINEAR
        # With streams the next group is prefetched while the current one runs: two groups resident.
        resident = int(unit * per_weight * (2 if preset.placement.group_offload_use_stream else 1))
        on_gpu = tuple(c for c in COMPONENTS if c not in offloaded)
        after = sum(est[c] for c in on_gpu)
        peak = after + resident * len(offloaded) + working_bytes(stages, COMPONENTS)
        return peak, after, load_peak(preset, on_gpu, straight_to_gpu=False)
    return 0, 0, (0, "")  # cpu


def _balanced(
    preset: Preset, est: dict[str, int], stages: dict[str, int], caps: list[int]
) -> tuple[tuple[int, ...], tuple[int, str], bool, bool]:
    """Largest component first onto the GPU with most room; each GPU then peaks at its weights plus the largest
    working memory of the stages its components run.

    Returns the serving peak of each GPU, the largest load peak, and whether serving and loading fit.
    """
    room = list(caps)
    placed: list[list[str]] = [[] for _ in caps]
    for name in sorted(est, key=lambda n: est[n], reverse=True):
        best = max(range(len(room)), key=room.__getitem__)
        room[best] -= est[name] + working_bytes(stages, (name,))
        placed[best].append(name)
    peaks = tuple(sum(est[c] for c in names) + working_bytes(stages, names) for names in placed)
    loads = [load_peak(preset, names, straight_to_gpu=True) if names else (0, "") for names in placed]
    serving_fits = all(peak <= cap for peak, cap in zip(peaks, caps, strict=True))
    load_fits = all(load <= cap for (load, _), cap in zip(loads, caps, strict=True))
    return peaks, max(loads, default=(0, "")), serving_fits, load_fits


def _check_forced(preset: Preset) -> Policy:
    """The preset's own policy, refused when it cannot run the preset."""
    policy = preset.placement.policy
    problem = incompatibility(preset, policy)
    if problem:
        raise ConfigurationError(f"preset '{preset.name}': placement.policy '{policy}' refused: {problem}")
    return cast(Policy, policy)


def _forced_without_estimate(preset: Preset, gpus: int, why: str) -> Placement:
    """The preset's forced placement, with no numbers: without an estimate nothing can be chosen or checked."""
    spec = preset.placement
    if spec.policy == "auto":
        raise ConfigurationError(
            f"preset '{preset.name}': placement.policy 'auto' needs a memory estimate, and it has none ({why}); "
            "set placement.policy"
        )
    policy = _check_forced(preset)
    return Placement(
        policy,
        gpus=gpus if policy == "balanced" else (0 if policy == "cpu" else 1),
        text_encoder_off_gpu_after_encode=spec.text_encoder_off_gpu_after_encode,
        group_offload_type=spec.group_offload_type,
        group_offload_use_stream=spec.group_offload_use_stream,
        group_offload_components=tuple(spec.group_offload_components) if policy == "group_offload" else (),
        reason=f"forced by the preset; no memory estimate: {why}",
        no_estimate_reason=why,
    )


def plan_placement(preset: Preset, gpu_free_bytes: list[int]) -> Placement:
    """Decide the placement of ``preset`` on GPUs with these free bytes (empty: no GPU).

    Auto picks the first that fits of: whole on one GPU; the same with the text encoders moved off the
    GPU after encoding; ``device_map="balanced"`` over several GPUs; model CPU offload; group offload.
    A preset's own policy is kept (and refused only when incompatible); it may not fit, which is reported.
    """
    why = no_estimate_reason(preset)
    if why is not None:
        return _forced_without_estimate(preset, len(gpu_free_bytes), why)
    est = component_bytes(preset)
    stages = stage_bytes(preset)
    caps = [max(0, free - SAFETY_BYTES) for free in gpu_free_bytes]
    spec = preset.placement
    base: dict[str, Any] = {
        "estimate": est,
        "group_offload_type": spec.group_offload_type,
        "group_offload_use_stream": spec.group_offload_use_stream,
    }

    def make(policy: Policy, reason: str, te_off: bool = False, offloaded: tuple[str, ...] = ()) -> Placement:
        if policy == "balanced":
            peaks, load, serving_fits, load_fits = _balanced(preset, est, stages, caps)
            after = sum(est.values())
        else:
            peak, after, load = _one_gpu(policy, preset, est, stages, te_off, offloaded)
            peaks = () if policy == "cpu" else (peak,)
            serving_fits = policy == "cpu" or (bool(caps) and peak <= caps[0])
            load_fits = policy == "cpu" or (bool(caps) and load[0] <= caps[0])
        return Placement(
            policy, len(caps) if policy == "balanced" else (0 if policy == "cpu" else 1), te_off,
            group_offload_components=offloaded, after_load_bytes=after, gpu_peaks=peaks,
            expected_peak_bytes=max(peaks, default=0), load_peak_bytes=load[0], load_peak_step=load[1],
            fits=serving_fits and load_fits, load_fits=load_fits, reason=reason, **base,
        )  # fmt: skip

    if spec.policy != "auto":
        policy = _check_forced(preset)
        offloaded = tuple(spec.group_offload_components) if policy == "group_offload" else ()
        return make(policy, "forced by the preset", spec.text_encoder_off_gpu_after_encode, offloaded)

    if not caps:
        if incompatibility(preset, "cpu"):
            raise ConfigurationError(f"preset '{preset.name}': no GPU: {incompatibility(preset, 'cpu')}")
        return make("cpu", "no GPU visible")
    candidates: list[Placement] = [
        make("gpu", "the whole pipeline fits on one GPU", spec.text_encoder_off_gpu_after_encode),
        make("gpu", "fits on one GPU once the text encoders leave it after encoding", True),
    ]
    if len(caps) > 1:
        candidates.append(make("balanced", f"the components fit across {len(caps)} GPUs"))
    candidates.append(make("model_offload", "only one component at a time fits on the GPU"))
    candidates.append(make("group_offload", "only the non-transformer parts fit", offloaded=("transformer",)))
    candidates.append(
        make(
            "group_offload",
            "transformer and T5 both streamed from the CPU",
            offloaded=("transformer", "text_encoder_2"),
        )
    )
    refused: list[str] = []
    for plan in candidates:
        problem = incompatibility(preset, plan.policy)
        if problem:
            if f"{plan.policy}: {problem}" not in refused:
                refused.append(f"{plan.policy}: {problem}")
        elif plan.fits:
            return plan
    allowed = [p for p in candidates if not incompatibility(preset, p.policy)]
    best = min(allowed, key=_need) if allowed else candidates[-1]
    loading = " while loading" if best.load_peak_bytes > best.expected_peak_bytes else ""
    raise ConfigurationError(
        f"preset '{preset.name}' does not fit: even {best.policy} needs {_need(best) / GIB:.1f} GiB{loading}, "
        f"has {caps[0] / GIB:.1f} GiB usable" + (f"; refused: {'; '.join(refused)}" if refused else "")
    )


def _need(plan: Placement) -> int:
    return max(plan.expected_peak_bytes, plan.load_peak_bytes)


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '512MiB' or a plain number of bytes."""
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": GIB, "TIB": 1024**4, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    units |= {"TB": 10**12, "B": 1, "G": GIB, "M": 1024**2}
    upper = text.strip().upper().replace(" ", "")
    for suffix in sorted(units, key=len, reverse=True):
        if upper.endswith(suffix):
            return int(float(upper[: -len(suffix)]) * units[suffix])
    return int(float(upper))
