"""Memory planning: how many bytes a preset needs per component, and where the pipeline should live.

Pure numbers, no torch: the producer (``fluxfleet plan``) and the worker share it, and tests run it
with a table. The estimate is parameter counts of the FLUX.1-dev components (counted once on the
meta device) times bytes per weight of the preset's backend, calibrated against the seed's H100
tables (whose "GB" are GiB: ``max_memory_reserved() / 1024**3``)::

    plan = plan_placement(preset, [24 * GIB])
    plan.policy, plan.expected_peak_bytes, plan.reason

A preset whose model is not FLUX.1-dev-sized says so (``[estimate] applies = false``): it gets no
numbers (``no_estimate_reason``) and must force its placement policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset

GIB = 1024**3

# Parameter counts of FLUX.1-dev, by group. "modulation" are the AdaLayerNorm linears (names contain
# "norm"): layerwise casting skips them, so they stay in the compute dtype. "kept" is T5's ``wo``,
# which transformers keeps out of quantization (``_keep_in_fp32_modules``).
PARAMS: dict[str, dict[str, int]] = {
    "transformer": {"linear": 8_651_931_648, "modulation": 3_246_391_296, "other": 3_085_376},
    "text_encoder_2": {"linear": 3_623_878_656, "kept": 1_006_632_960, "other": 131_799_040},
    "text_encoder": {"other": 123_060_480},
    "vae": {"other": 83_819_683},
}
LARGEST_LINEAR = 56_623_104  # one 3072x18432 modulation linear: the unit of leaf-level group offload
LARGEST_BLOCK = 339_831_296  # one double-stream block: the unit of block-level group offload
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = tuple(PARAMS)

ACTIVATION_BYTES_1MP = int(4.6 * GIB)
"""Peak minus after-load at 1024x1024, batch 1, in bytes (seed: 4.0-5.2 GiB for every backend)."""
SAFETY_BYTES = 512 * 1024**2
"""Bytes kept free on each GPU for the CUDA context, cuBLAS workspaces and fragmentation."""

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GGUF_BITS = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q5_0": 5.5, "Q5_1": 6.0}
GGUF_BITS |= {"Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "F16": 16.0, "BF16": 16.0}
# Backends known not to survive an offload mode, with the evidence.
GROUP_OFFLOAD_REFUSED = {
    "quanto": "quanto weights stay on the CPU under group offload (diffusers issue #12610)",
}
GROUP_OFFLOAD_STREAM_REFUSED = {
    "torchao": "torchao tensors under group offload with use_stream=True stay on the CPU or fail to pin "
    "(diffusers issues #13281, #14433); set placement.group_offload_use_stream = false",
}

Policy = Literal["gpu", "balanced", "model_offload", "group_offload", "cpu"]


def _dtype_bytes(name: str) -> float:
    return float(DTYPE_BYTES[name])


def linear_bytes_per_weight(preset: Preset) -> float:
    """Bytes per weight of a quantized linear layer, scales and zero points included."""
    q, opts = preset.quantization, preset.quantization.options
    if q.backend == "bitsandbytes":
        if int(opts.get("bits", 4)) == 8:
            return 1.0
        # 4-bit codes plus one fp32 absmax per 64 weights; nested quantization stores it in 8 bits.
        return 0.5 + (1 / 64 + 4 / (64 * 256) if opts.get("double_quant", False) else 4 / 64)
    if q.backend in ("torchao", "quanto"):
        kind = str(opts.get("type", opts.get("weights", "int8")))
        if "int4" in kind and q.backend == "quanto":
            # Calibrated: the seed measures ~2 GiB more than packed int4 + bf16 scale/shift per 128 would be.
            return 0.67
        if "int4" in kind:
            return 0.5 + 4 / int(opts.get("group_size", 128))  # bf16 scale and zero point per group
        return 1.0
    if q.backend == "gguf":
        quant_type = str(opts.get("quant_type", "Q8_0")).upper()
        if quant_type not in GGUF_BITS:
            raise ConfigurationError(
                f"preset '{preset.name}': quantization.options.quant_type '{quant_type}' "
                f"is not one of {sorted(GGUF_BITS)}"
            )
        return GGUF_BITS[quant_type] / 8
    if q.backend == "layerwise":
        return 1.0  # float8 storage
    return _dtype_bytes(preset.dtype)


def no_estimate_reason(preset: Preset) -> str | None:
    """Why FLUX.1-dev's parameter counts say nothing about this preset's model; None when they apply."""
    if preset.estimate.applies:
        return None
    return preset.estimate.reason or "the preset's model is not FLUX.1-dev-sized"


def component_bytes(preset: Preset) -> dict[str, int]:
    """Estimated bytes of each component after loading the preset.

    Raises ``ConfigurationError`` for a preset without an estimate rather than return FLUX.1-dev numbers.
    """
    why = no_estimate_reason(preset)
    if why is not None:
        raise ConfigurationError(f"preset '{preset.name}' has no memory estimate: {why}")
    dtype_b = _dtype_bytes(preset.dtype)
    q = preset.quantization
    quantized = set(q.components) if q.backend != "none" else set()
    if q.backend == "gguf":
        quantized = {"transformer"}  # the file holds only the transformer
    per_weight = linear_bytes_per_weight(preset)
    # quanto's quantize/freeze does not know transformers' keep list; bitsandbytes' quantize_t5_wo packs it too
    direct = (q.backend == "quanto" and _quanto_direct(q.options)) or (
        q.backend == "bitsandbytes" and bool(q.options.get("quantize_t5_wo"))
    )
    out: dict[str, int] = {}
    for name, groups in PARAMS.items():
        total = groups.get("other", 0) * dtype_b
        if name in quantized:
            total += groups.get("linear", 0) * per_weight
            # Layerwise casting skips the norm (modulation) linears; other backends quantize them.
            mod_b = dtype_b if q.backend == "layerwise" else per_weight
            total += groups.get("modulation", 0) * mod_b
            # T5's wo: bitsandbytes keeps it in fp32 (seed calibration), the others in the compute dtype,
            # unless quantized directly.
            kept_b = per_weight if direct else (4.0 if q.backend == "bitsandbytes" else dtype_b)
            total += groups.get("kept", 0) * kept_b
        else:
            total += sum(v for k, v in groups.items() if k != "other") * dtype_b
        out[name] = int(total)
    return out


def _quanto_direct(options: dict[str, Any]) -> bool:
    return bool(options.get("direct", str(options.get("weights", "int8")) == "float8"))


def activation_bytes(preset: Preset) -> int:
    """Working memory of one generation, scaled by pixels and batch from the seed's 1024x1024 figure."""
    width = int(preset.defaults.get("width", 1024))
    height = int(preset.defaults.get("height", 1024))
    for w, h in preset.warmup.shapes:
        width, height = max(width, w), max(height, h)
    return int(ACTIVATION_BYTES_1MP * (width * height) / (1024 * 1024) * preset.batch_size)


@dataclass(frozen=True)
class Placement:
    """Where the pipeline lives; decided by :func:`plan_placement`, applied by ``workers.placement``."""

    policy: Policy
    gpus: int = 1
    text_encoder_off_gpu_after_encode: bool = False
    group_offload_type: str = "leaf_level"
    group_offload_use_stream: bool = True
    group_offload_components: tuple[str, ...] = ()
    estimate: dict[str, int] = field(default_factory=dict)
    expected_peak_bytes: int = 0
    fits: bool = True
    reason: str = ""
    no_estimate_reason: str = ""
    """Set when the preset has no estimate: ``estimate`` is then empty and the peak unknown (0)."""


def incompatibility(preset: Preset, policy: str) -> str | None:
    """Why ``policy`` cannot run this preset, or None. Version-dependent checks happen in the worker."""
    backend = preset.quantization.backend
    if backend == "bitsandbytes" and policy == "cpu":
        return "bitsandbytes quantizes only on a CUDA GPU (diffusers: 'No GPU found')"
    if policy == "group_offload" and backend in GROUP_OFFLOAD_REFUSED:
        return GROUP_OFFLOAD_REFUSED[backend]
    if (
        policy == "group_offload"
        and preset.placement.group_offload_use_stream
        and backend in GROUP_OFFLOAD_STREAM_REFUSED
    ):
        return GROUP_OFFLOAD_STREAM_REFUSED[backend]
    if policy == "group_offload" and preset.compile.enabled and preset.compile.fullgraph:
        # Group offload hooks sit on the layers inside the compiled blocks and move weights mid-forward.
        return (
            "group offload hooks run inside the compiled blocks, which fullgraph cannot trace; "
            "set compile.fullgraph = false"
        )
    return None


def _peak(policy: str, preset: Preset, est: dict[str, int], act: int, te_off: bool, offloaded: tuple[str, ...]) -> int:
    total = sum(est.values())
    te = sum(est[c] for c in TEXT_ENCODERS)
    if policy == "gpu":
        return max(total, total - te + act) if te_off else total + act
    if policy == "model_offload":
        return max(est["transformer"] + act, est["text_encoder_2"] + act // 8, est["vae"] + act)
    if policy == "group_offload":
        per_weight = est["transformer"] / sum(PARAMS["transformer"].values())
        unit = LARGEST_BLOCK * preset.placement.num_blocks_per_group
        if preset.placement.group_offload_type == "leaf_level":
            unit = LARGEST_LINEAR
        # With streams the next group is prefetched while the current one runs: two groups resident.
        resident = int(unit * per_weight * (2 if preset.placement.group_offload_use_stream else 1))
        on_gpu = sum(v for k, v in est.items() if k not in offloaded)
        return on_gpu + resident * len(offloaded) + act
    return 0  # cpu


def _balanced(est: dict[str, int], act: int, caps: list[int]) -> tuple[bool, int]:
    """Largest component first onto the GPU with most room (the transformer also carries activations).

    Returns whether every component found room, and the largest load put on one GPU.
    """
    room = list(caps)
    load = [0] * len(caps)
    fits = True
    for name in sorted(est, key=lambda n: est[n], reverse=True):
        need = est[name] + (act if name == "transformer" else 0)
        best = max(range(len(room)), key=room.__getitem__)
        fits = fits and room[best] >= need
        room[best] -= need
        load[best] += need
    return fits, max(load, default=0)


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
    act = activation_bytes(preset)
    caps = [max(0, free - SAFETY_BYTES) for free in gpu_free_bytes]
    spec = preset.placement
    base: dict[str, Any] = {
        "estimate": est,
        "group_offload_type": spec.group_offload_type,
        "group_offload_use_stream": spec.group_offload_use_stream,
    }

    def make(policy: Policy, reason: str, te_off: bool = False, offloaded: tuple[str, ...] = ()) -> Placement:
        peak = _peak(policy, preset, est, act, te_off, offloaded)
        gpus = len(caps) if policy == "balanced" else (0 if policy == "cpu" else 1)
        if policy == "balanced":
            fits, peak = _balanced(est, act, caps)
        else:
            fits = policy == "cpu" or (bool(caps) and peak <= caps[0])
        return Placement(
            policy, gpus, te_off, group_offload_components=offloaded, expected_peak_bytes=peak, fits=fits,
            reason=reason, **base,
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
    best = min(allowed, key=lambda p: p.expected_peak_bytes) if allowed else candidates[-1]
    raise ConfigurationError(
        f"preset '{preset.name}' does not fit: even {best.policy} needs {best.expected_peak_bytes / GIB:.1f} GiB, "
        f"has {caps[0] / GIB:.1f} GiB usable" + (f"; refused: {'; '.join(refused)}" if refused else "")
    )


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '512MiB' or a plain number of bytes."""
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": GIB, "TIB": 1024**4, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    units |= {"TB": 10**12, "B": 1, "G": GIB, "M": 1024**2}
    upper = text.strip().upper().replace(" ", "")
    for suffix in sorted(units, key=len, reverse=True):
        if upper.endswith(suffix):
            return int(float(upper[: -len(suffix)]) * units[suffix])
    return int(float(upper))
