"""Memory estimate of a preset: bytes per component once served, bytes while loading, working memory per stage.

Pure numbers, no torch. Parameter counts of the FLUX.1-dev components (as counted on the built models in
``benchmarks/results/2026-12-02-H200-fast-load-peak.json``) times the bytes per weight that the preset's
quantization backend and its ``[speed]`` fp8 conversion leave, plus the working memory of the stage that runs
(text encoding, denoising, VAE decoding). All figures are ``torch.cuda.memory_allocated`` bytes, what the
worker records (``workers/pipeline/footprint.py``) and ``benchmarks/results/`` holds; ``tests/test_planner.py``
checks every preset measured there against these numbers::

    component_bytes(preset)            # {"transformer": ..., ...} once loaded and converted
    load_peak(preset, COMPONENTS)      # (bytes, what sets it) while loading on one GPU
"""

from __future__ import annotations

from fluxfleet.backends import BackendSpec, backend_spec
from fluxfleet.errors import ConfigurationError
from fluxfleet.levers import HOLDS_BOTH, active_levers, fp8_conversions
from fluxfleet.presets import Preset

GIB = 1024**3

# Parameter counts of FLUX.1-dev, by group. "modulation" are the AdaLayerNorm linears (names contain
# "norm"): layerwise casting skips them, so they stay in the compute dtype. "kept" is T5's ``wo``, which
# transformers' ``_keep_in_fp32_modules`` may keep out of quantization (see ``_kept_bytes``). The
# transformer's "other" are its linears' biases (and the q/k norms' weights).
PARAMS: dict[str, dict[str, int]] = {
    "transformer": {"linear": 8_651_931_648, "modulation": 3_246_391_296, "other": 3_085_376},
    "text_encoder_2": {"linear": 3_623_878_656, "kept": 1_006_632_960, "other": 131_799_040},
    "text_encoder": {"other": 123_060_480},
    "vae": {"other": 83_819_683},
}
LARGEST_LINEAR = 56_623_104  # one 3072x18432 modulation linear: the unit of leaf-level group offload
LARGEST_BLOCK = 339_831_296  # one double-stream block: the unit of block-level group offload
T5_LARGEST_LINEAR = 41_943_040  # one 4096x10240 feed-forward linear
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = tuple(PARAMS)
STAGE_OF = {"text_encoder": "encode", "text_encoder_2": "encode", "transformer": "denoise", "vae": "decode"}

# Working memory of each stage at 1024x1024, batch 1, 512 text tokens: allocated bytes above the weights at
# that stage's peak. Fitted to these measurements (the decode figure is the same for every backend within 0.05 GiB):
# decode: peak minus after-load with the whole pipeline resident (its peak is the VAE decode): bf16 2.41,
#   bnb-nf4 2.41, torchao-int4 2.41, quanto-int8 2.41, fp8-layerwise 2.41, fast 2.38, lean 2.38 GiB, all
#   H100; one VAE decode alone on an H200: 2.37 (benchmarks/results/SUMMARY.md).
# denoise: bnb-nf4-offload's peak (6.98 GiB with only the NF4 transformer, ~6.28 GiB, on the GPU):
#   0.70; one eager fp8 transformer forward on an H200: 0.87. Taken as 0.8.
# encode: lean's first design (encoders moved off after encoding, before quantize_t5_wo, so its peak is the
#   encode with everything resident): 0.26; fp8 weight-only T5 on an H200 (dequantizes each weight): 0.39.
STAGE_BYTES_1MP = {"encode": int(0.4 * GIB), "denoise": int(0.8 * GIB), "decode": int(2.4 * GIB)}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _dtype_bytes(name: str) -> float:
    return float(DTYPE_BYTES[name])


def _backend(preset: Preset) -> BackendSpec:
    return backend_spec(preset.quantization.backend)


def linear_bytes_per_weight(preset: Preset) -> float:
    """Bytes per weight of a quantized linear layer, scales and zero points included (the backend's declaration)."""
    try:
        return _backend(preset).bytes_per_weight(preset.quantization.options, _dtype_bytes(preset.dtype))
    except ValueError as e:
        raise ConfigurationError(f"preset '{preset.name}': {e}") from e


def no_estimate_reason(preset: Preset) -> str | None:
    """Why FLUX.1-dev's parameter counts say nothing about this preset's model; None when they apply."""
    if preset.estimate.applies:
        return None
    return preset.estimate.reason or "the preset's model is not FLUX.1-dev-sized"


def quantized_components(preset: Preset) -> set[str]:
    """Components the quantization backend (not ``[speed]``) stores quantized."""
    fixed = _backend(preset).components
    return set(fixed) if fixed is not None else set(preset.quantization.components)


def speed_fp8(preset: Preset) -> dict[str, str]:
    """Components that ``[speed]`` converts to fp8 after loading, with the scheme. A component the backend
    already quantized is left alone: its linear weights are no longer bf16, which the fp8 swap requires."""
    done = quantized_components(preset)
    return {c: kind for c, kind in fp8_conversions(preset).items() if c not in done}


def _kept_bytes(preset: Preset, per_weight: float) -> float:
    """Bytes per weight of T5's ``wo`` when T5 is quantized: transformers' ``_keep_in_fp32_modules`` keeps it
    out of some backends' quantization, in the compute dtype (measured with transformers 5.17; the
    declarations say which)."""
    quantized = _backend(preset).quantizes_t5_wo(preset.quantization.options)
    return per_weight if quantized else _dtype_bytes(preset.dtype)


def component_bytes(preset: Preset, speed: bool = True) -> dict[str, int]:
    """Estimated bytes of each component once loaded, after the ``[speed]`` fp8 conversion (``speed=False``:
    before it). Raises ``ConfigurationError`` for a preset without an estimate rather than return FLUX.1-dev
    numbers."""
    why = no_estimate_reason(preset)
    if why is not None:
        raise ConfigurationError(f"preset '{preset.name}' has no memory estimate: {why}")
    dtype_b = _dtype_bytes(preset.dtype)
    quantized = quantized_components(preset)
    converted = speed_fp8(preset) if speed else {}
    per_weight = linear_bytes_per_weight(preset)
    out: dict[str, int] = {}
    for name, groups in PARAMS.items():
        total = groups.get("other", 0) * dtype_b
        linears = sum(v for k, v in groups.items() if k != "other")
        if name in converted:
            # Every linear of both components has sizes the fp8 GEMM accepts; biases stay in the dtype.
            # (The fp32 scale per output row adds ~0.1%.)
            total += linears * 1.0
        elif name in quantized:
            total += groups.get("linear", 0) * per_weight
            # Layerwise casting skips the norm (modulation) linears; other backends quantize them.
            total += groups.get("modulation", 0) * (per_weight if _backend(preset).quantizes_modulation else dtype_b)
            total += groups.get("kept", 0) * _kept_bytes(preset, per_weight)
        else:
            total += linears * dtype_b
        out[name] = int(total)
    return out


def _converted_after_load(preset: Preset) -> set[str]:
    """Components a backend quantizes after ``from_pretrained`` (not while loading): layerwise casting and
    quanto's direct quantize/freeze."""
    q = preset.quantization
    return set(q.components) if _backend(preset).converts_after_load(q.options) else set()


def load_peak(preset: Preset, on_gpu: tuple[str, ...] | list[str], straight_to_gpu: bool) -> tuple[int, str]:
    """Largest allocation on one GPU while loading the components ``on_gpu`` there, and the step that sets it.

    ``straight_to_gpu``: ``from_pretrained`` puts them on the GPU (``device_map``, workers/pipeline/placement.py), so a
    backend that quantizes after loading does it there, from bf16. The ``[speed]`` steps run once the pipeline
    is placed, always on the GPU: fusing QKV, then the transformer's fp8 conversion, then T5's.
    """
    names = [c for c in COMPONENTS if c in on_gpu]
    served, plain = component_bytes(preset), component_bytes(preset, speed=False)
    dtype_b = _dtype_bytes(preset.dtype)
    bf16 = {c: int(sum(PARAMS[c].values()) * dtype_b) for c in COMPONENTS}
    late = _converted_after_load(preset) if straight_to_gpu else set()
    now = sum(bf16[c] if c in late else plain[c] for c in names)
    steps = [(now, "loading")]
    for c in (c for c in names if c in late):
        steps.append((now + 4 * _largest_linear(c), f"the backend quantizing {c} on the GPU"))
        now += plain[c] - bf16[c]
    for lever in active_levers(preset):
        if lever.transient_params and "transformer" in names:
            steps.append((now + int(lever.transient_params * dtype_b), lever.transient_step))
    for c, kind in speed_fp8(preset).items():
        if c in names:
            held = served[c] if kind in HOLDS_BOTH else 0
            what = "its bf16 and fp8 copies both held" if held else "one layer at a time"
            steps.append((now + held + 4 * _largest_linear(c), f"the [speed] fp8 conversion of {c} ({what})"))
            now += served[c] - plain[c]
    return max(steps)


def _largest_linear(component: str) -> int:
    # The conversion of one layer holds an fp32 copy of its weight.
    return {"transformer": LARGEST_LINEAR, "text_encoder_2": T5_LARGEST_LINEAR}.get(component, 0)


def stage_bytes(preset: Preset) -> dict[str, int]:
    """Working memory of each stage, scaled from 1024x1024 by the largest image, the batch and the tokens."""
    width = int(preset.defaults.get("width", 1024))
    height = int(preset.defaults.get("height", 1024))
    for w, h in preset.warmup.shapes:
        width, height = max(width, w), max(height, h)
    pixels = width * height / (1024 * 1024) * preset.batch_size
    tokens = int(preset.defaults.get("max_sequence_length", 512)) / 512 * preset.batch_size
    scale = {"encode": tokens, "denoise": pixels, "decode": pixels}
    return {stage: int(b * scale[stage]) for stage, b in STAGE_BYTES_1MP.items()}


def working_bytes(stages: dict[str, int], components: tuple[str, ...] | list[str] | set[str]) -> int:
    """The largest working memory among the stages these components run."""
    return max((stages[STAGE_OF[c]] for c in components), default=0)
