"""Step caching policies: an item's ``cache`` names how much transformer work its denoising reuses.

A policy is written ``name`` or ``name:option=value,...`` (``magcache:threshold=0.12,max_skip=4``); a bare
number after the colon sets the policy's main option (``magcache:0.12``, ``taylorseer:4``). Every accepted
policy is kept in its canonical form, with every option spelt out, so the same request always hashes to the
same storage key, and ``none`` (the default) leaves keys, grouping and images exactly as without caching.

- ``magcache`` (MagCache, Ma et al. 2025): skips a step's transformer blocks and reuses the last computed
  block residual while the accumulated change of the residual's magnitude, predicted by ratios calibrated
  on the real FLUX.1-dev, stays under ``threshold``. Its schedule depends only on those ratios, the
  threshold and the step count, so it is computed here, before the run, and the worker replays it without
  a host round trip (``workers/speed/step_cache.py``); it keeps every speed lever.
- ``fbcache`` (First Block Cache) and ``taylorseer`` (TaylorSeer) run as diffusers' hooks. FirstBlockCache
  decides each step from the GPU's values, and both hooks run the blocks outside ``torch.compile``: a
  compiled or graphed transformer cannot run them, so presets with ``[compile]`` or ``cuda_graph`` refuse them.

Plain data and pure functions, no torch: the producer checks and plans with them before anything is queued.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from fluxfleet.errors import ValidationError

NONE = "none"

FLUX_MAG_RATIOS = (
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047, 1.01562,
    1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484, 0.95703, 0.93359,
    0.89062,
)  # fmt: skip
"""MagCache's residual magnitude ratios of FLUX.1-dev over 28 steps, as diffusers 0.42.1 ships them
(``diffusers.hooks.mag_cache.FLUX_MAG_RATIOS``, from github.com/Zehong-Ma/MagCache); a test compares them."""


@dataclass(frozen=True)
class Option:
    """One option: its type, default, inclusive range, and what it means."""

    kind: type
    default: float
    low: float
    high: float
    meaning: str


@dataclass(frozen=True)
class PolicySpec:
    name: str
    main: str
    """The option a bare number after the colon sets."""
    options: dict[str, Option]
    graph_safe: bool
    """Whether it keeps a compiled and graphed transformer's speed (its schedule is known before the run)."""
    summary: str


POLICIES: dict[str, PolicySpec] = {
    "magcache": PolicySpec(
        name="magcache",
        main="threshold",
        options={
            "threshold": Option(float, 0.06, 0.0, 1.0, "largest accumulated error that still reuses a step"),
            "max_skip": Option(int, 3, 1, 10, "most steps reused one after another (K)"),
            "retention": Option(float, 0.2, 0.0, 1.0, "fraction of the first steps always computed"),
        },
        graph_safe=True,
        summary="reuse the block residual on steps MagCache's FLUX ratios predict change little",
    ),
    "fbcache": PolicySpec(
        name="fbcache",
        main="threshold",
        options={"threshold": Option(float, 0.05, 0.0, 1.0, "relative change of the first block's output")},
        graph_safe=False,
        summary="skip the other blocks while the first block's output changes by less than threshold",
    ),
    "taylorseer": PolicySpec(
        name="taylorseer",
        main="interval",
        options={
            "interval": Option(int, 5, 2, 20, "compute one step in every `interval`, predict the others"),
            "warmup": Option(int, 3, 0, 50, "first steps always computed"),
            "order": Option(int, 1, 1, 2, "order of the Taylor expansion"),
        },
        graph_safe=False,
        summary="predict skipped steps' features from a Taylor expansion of the computed ones",
    ),
}
ALIASES = {"mag": "magcache", "firstblock": "fbcache", "first_block": "fbcache", "taylor": "taylorseer"}


@dataclass(frozen=True)
class CachePolicy:
    name: str
    options: tuple[tuple[str, float], ...] = ()

    @property
    def is_none(self) -> bool:
        return self.name == NONE

    def option(self, name: str) -> Any:
        return dict(self.options)[name]

    def canonical(self) -> str:
        if self.is_none:
            return NONE
        return f"{self.name}:" + ",".join(f"{name}={_number(value)}" for name, value in self.options)


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(float(value))


def parse_policy(value: Any, *, where: str = "", field: str = "cache") -> CachePolicy:
    """``value`` as a policy, or ``ValidationError`` naming ``where``, ``field`` and what is wrong."""

    def refuse(why: str) -> ValidationError:
        return ValidationError(why, where=where, field=field)

    if not isinstance(value, str):
        raise refuse(f"cache must be a policy name, not {type(value).__name__}")
    text = value.strip()
    if len(text) > 200:
        raise refuse("cache policy is longer than 200 characters")
    name, _, rest = text.partition(":")
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name in ("", NONE, "off"):
        if rest.strip():
            raise refuse(f"cache 'none' takes no options, got {rest.strip()!r}")
        return CachePolicy(NONE)
    spec = POLICIES.get(name)
    if spec is None:
        known = ", ".join([NONE, *POLICIES])
        raise refuse(f"unknown cache policy {name[:40]!r} (known: {known})")
    given: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, equals, raw = part.partition("=")
        key = key.strip().lower() if equals else spec.main
        raw = raw if equals else part
        if key not in spec.options:
            raise refuse(f"{name} has no option {key[:40]!r} (options: {', '.join(spec.options)})")
        if key in given:
            raise refuse(f"{name} option {key!r} is given twice")
        given[key] = _option_value(spec.options[key], raw.strip(), f"{name} {key}", refuse)
    return CachePolicy(
        name, tuple((key, option.kind(given.get(key, option.default))) for key, option in spec.options.items())
    )


def _option_value(option: Option, raw: str, label: str, refuse: Any) -> float:
    try:
        number: float = int(raw) if option.kind is int else float(raw)
    except ValueError:
        kind = "whole number" if option.kind is int else "number"
        raise refuse(f"{label} {raw[:40]!r} is not a {kind}") from None
    if number != number or not option.low <= number <= option.high:
        low, high = _number(option.kind(option.low)), _number(option.kind(option.high))
        raise refuse(f"{label} {raw[:40]} is outside {low}..{high}")
    return number


def canonical_policy(value: Any, *, where: str = "", field: str = "cache") -> str:
    return parse_policy(value, where=where, field=field).canonical()


def preset_refusal(policy: CachePolicy, preset: Any) -> str | None:
    """Why ``preset`` cannot run ``policy`` (a sentence), or None."""
    if policy.is_none or POLICIES[policy.name].graph_safe:
        return None
    blockers = []
    if preset.compile.enabled:
        blockers.append("[compile]")
    if preset.speed.cuda_graph:
        blockers.append("cuda_graph")
    if not blockers:
        return None
    return (
        f"cache policy {policy.name} cannot run on preset '{preset.name}': its hooks run the transformer blocks "
        f"outside {' and '.join(blockers)}, which would lose more speed than the cache gains; use magcache, "
        "or a preset without them"
    )


def check_policy(canonical: str, preset: Any, *, where: str = "") -> CachePolicy:
    """The canonical ``canonical`` policy, refused when ``preset`` cannot run it."""
    policy = parse_policy(canonical, where=where)
    if policy.canonical() != canonical:
        raise ValidationError(f"cache {canonical!r} is not written in its canonical form", where=where, field="cache")
    refusal = preset_refusal(policy, preset)
    if refusal:
        raise ValidationError(refusal, where=where, field="cache")
    return policy


# -- MagCache's schedule -------------------------------------------------------------------------------------
def _f32(value: float) -> float:
    """``value`` rounded to float32: diffusers accumulates MagCache's error in float32 tensors."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _interpolated_ratios(steps: int) -> list[float]:
    """diffusers' ``nearest_interp`` of the 28 ratios to ``steps``: a float32 grid times the scale, rounded
    half to even (torch.round and Python's round agree)."""
    ratios = [_f32(r) for r in FLUX_MAG_RATIOS]
    if steps == len(ratios):
        return ratios
    if steps == 1:
        return ratios[-1:]
    scale = _f32((len(ratios) - 1) / (steps - 1))
    return [ratios[round(_f32(float(i) * scale))] for i in range(steps)]


def magcache_schedule(steps: int, threshold: float, max_skip: int, retention: float) -> list[bool]:
    """For each denoising step, whether MagCache computes it (True) or reuses the last residual (False);
    the same decisions diffusers' MagCache hook takes with ``FLUX_MAG_RATIOS``."""
    ratios = _interpolated_ratios(steps)
    retention_step = int(retention * steps + 0.5)
    limit = _f32(threshold)
    computed: list[bool] = []
    ratio, err, run = 1.0, 0.0, 0
    for step in range(steps):
        compute = True
        if step >= retention_step:
            ratio = _f32(ratio * ratios[step])
            run += 1
            err = _f32(err + _f32(abs(1.0 - ratio)))
            if computed and err <= limit and run <= max_skip:
                compute = False
            else:
                ratio, err, run = 1.0, 0.0, 0
        computed.append(compute)
    return computed


def schedule(policy: CachePolicy, steps: int) -> list[bool] | None:
    """The computed/reused decision of every step where the policy knows it before the run, else None."""
    if policy.is_none:
        return [True] * steps
    if policy.name == "magcache":
        return magcache_schedule(
            steps, policy.option("threshold"), policy.option("max_skip"), policy.option("retention")
        )
    if policy.name == "taylorseer":
        # diffusers' TaylorSeer hook: the warm-up steps, then every `interval`-th step after the first.
        warmup, interval = policy.option("warmup"), policy.option("interval")
        return [step < warmup or (step - warmup - 1) % interval == 0 for step in range(steps)]
    return None
