"""Speed levers, declared: what each reads from a preset's ``[speed]``, needs, refuses, installs and costs in memory.

Plain data and pure functions, no torch. The preset validator refuses what a lever cannot combine with (so
``load_preset`` names the file), the planner's estimate reads the memory effects, and a worker keeps out
the packages no lever of its preset needs. The worker applies lever NAME with
``workers/speed/levers/NAME.py``'s ``apply()``, in the order of :data:`LEVERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class Preset(Protocol):
    """What a lever reads of a ``fluxfleet.presets.Preset``: named structurally, since the presets import this
    module to validate themselves."""

    @property
    def speed(self) -> Any: ...
    @property
    def compile(self) -> Any: ...
    @property
    def placement(self) -> Any: ...


TORCHAO_FP8 = ("dynamic_row", "weight_only")
"""The [speed] fp8 schemes that run through torchao; the "_plain" ones are fluxfleet's own and need no torchao."""
HOLDS_BOTH = ("dynamic_row_plain", "weight_only_plain")
"""Plain fp8 conversions keep a component's bf16 and fp8 weights both alive while it converts (measured on an
H200: 42.76 GiB while the fast preset's transformer converts, 31.43 GiB before); torchao's ``quantize_``
replaces weights one module at a time."""
# 19 double-stream blocks x 6 (q, k, v and the text stream's added q, k, v) + 38 single-stream x 3 projections,
# each 3072x3072: diffusers' fuse_projections builds all the fused copies before the unfused ones are dropped
# (measured on an H200: +4.06 GiB during the fusion, none after).
QKV_PARAMS = (19 * 6 + 38 * 3) * 3072 * 3072


def _none(_preset: Preset) -> str | None:
    return None


def _no_fp8(_preset: Preset) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class LeverSpec:
    """One lever. ``active(preset)``: whether the preset turns it on. ``refuses(preset)``: why the preset's other
    settings cannot go with it (a prerequisite missing or a combination that fails), or None. ``packages``:
    optional packages it imports. Memory: ``fp8(preset)`` the components it converts to fp8 with their scheme;
    ``transient_params`` weights it holds on the transformer while applying (in the preset's dtype). Every
    ``refuses`` is asked, whether or not its lever is active: a setting may be wrong by its presence."""

    name: str
    fields: tuple[str, ...]
    active: Callable[[Preset], bool]
    refuses: Callable[[Preset], str | None] = _none
    packages: Callable[[Preset], set[str]] = lambda _preset: set()
    fp8: Callable[[Preset], dict[str, str]] = _no_fp8
    transient_params: int = 0
    transient_step: str = ""
    """The loading step ``transient_params`` are held in, as the planner names it."""
    every_preset: bool = False
    """Installed on every preset, ``[speed]`` or not: it changes nothing until an item asks for it."""


def _fp8_gelu(preset: Preset) -> str | None:
    if preset.speed.fp8_gelu_fusion and preset.speed.transformer_fp8 != "dynamic_row_plain":
        return (
            "speed.fp8_gelu_fusion needs transformer_fp8 = 'dynamic_row_plain' (it rewrites those fp8 linears),"
            f" not {preset.speed.transformer_fp8!r}"
        )
    return None


def _multi_kernel(preset: Preset) -> str | None:
    if preset.speed.compile_cache:
        # torch 2.11 / triton 3.6: a multi-kernel graph read back from inductor's cache fails in
        # MultiKernelCall (triton's JITFunction has no hash lock after loading); seen on an H100.
        return "speed.multi_kernel cannot be combined with compile_cache: cached multi-kernel graphs fail to load"
    return None


def _cuda_graph(preset: Preset) -> str | None:
    if not preset.speed.cuda_graph:
        return None
    if preset.placement.policy in ("balanced", "model_offload", "group_offload"):
        return (
            f"speed.cuda_graph needs the pipeline on one GPU; placement.policy {preset.placement.policy!r}"
            " moves weights or splits the model during the forward, which one graph cannot replay"
        )
    if preset.compile.enabled and (not preset.compile.regional or preset.compile.mode == "reduce-overhead"):
        return (
            "speed.cuda_graph captures the forward itself: use it with compile.regional = true and"
            " without mode 'reduce-overhead'"
        )
    return None


def _torchao_if(schemes: Callable[[Any], tuple[str, ...]]) -> Callable[[Preset], set[str]]:
    return lambda preset: {"torchao"} if any(s in TORCHAO_FP8 for s in schemes(preset.speed)) else set()


def _compiled(preset: Preset) -> bool:
    return preset.compile.enabled


BUILD_FIELDS = ("compile_cache", "compile_cache_dir", "warm_up")
"""``[speed]`` fields that are no lever: the pipeline builder's compile-cache and warm-up steps read them."""

LEVERS: tuple[LeverSpec, ...] = (
    LeverSpec("attention", ("attention_backend",), lambda p: bool(p.speed.attention_backend)),
    LeverSpec(
        "fuse_qkv",
        ("fuse_qkv",),
        lambda p: p.speed.fuse_qkv,
        transient_params=QKV_PARAMS,
        transient_step="fusing QKV (fused and unfused projections both held)",
    ),
    LeverSpec(
        "transformer_fp8",
        ("transformer_fp8", "fp8_gelu_fusion"),
        lambda p: p.speed.transformer_fp8 != "none",
        refuses=_fp8_gelu,
        packages=_torchao_if(lambda s: (s.transformer_fp8,)),
        fp8=lambda p: {"transformer": p.speed.transformer_fp8} if p.speed.transformer_fp8 != "none" else {},
    ),
    LeverSpec(
        "text_encoder_2_fp8",
        ("text_encoder_2_fp8",),
        lambda p: p.speed.text_encoder_2_fp8 != "none",
        packages=_torchao_if(lambda s: (s.text_encoder_2_fp8,)),
        fp8=lambda p: {"text_encoder_2": p.speed.text_encoder_2_fp8} if p.speed.text_encoder_2_fp8 != "none" else {},
    ),
    LeverSpec(
        "vae", ("vae_tiling", "compile_vae_decoder"), lambda p: p.speed.vae_tiling or p.speed.compile_vae_decoder
    ),
    # Inductor's own settings act only on what is compiled: without [compile] they stay off.
    LeverSpec(
        "inductor",
        ("coordinate_descent_tuning", "multi_kernel", "recompile_limit"),
        _compiled,
        refuses=lambda p: _multi_kernel(p) if p.speed.multi_kernel else None,
    ),
    # Per item, not per preset: an item's `cache` policy (fluxfleet.caching) picks the mode of each step.
    LeverSpec("step_cache", (), lambda _p: True, every_preset=True),
    LeverSpec("cuda_graph", ("cuda_graph", "cuda_graph_limit"), lambda p: p.speed.cuda_graph, refuses=_cuda_graph),
)
"""In the order a worker applies them: the fp8 conversions after the fusion they must see; the CUDA graph last,
around the forward the others made."""


def refusals(preset: Preset) -> list[str]:
    """Why the preset's levers cannot run as configured; empty when they can."""
    return [why for lever in LEVERS if (why := lever.refuses(preset))]


def active_levers(preset: Preset) -> list[LeverSpec]:
    return [lever for lever in LEVERS if lever.every_preset or (preset.speed.enabled and lever.active(preset))]


def packages_needed(preset: Preset) -> set[str]:
    return {package for lever in active_levers(preset) for package in lever.packages(preset)}


def fp8_conversions(preset: Preset) -> dict[str, str]:
    """Components the levers convert to fp8 after loading, with the scheme."""
    out: dict[str, str] = {}
    for lever in active_levers(preset):
        out.update(lever.fp8(preset))
    return out
