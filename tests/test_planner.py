"""The planner is a function of numbers: a table of presets and GPU sizes against decisions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fluxfleet.errors import ConfigurationError
from fluxfleet.planner import GIB, component_bytes, no_estimate_reason, parse_bytes, plan_placement
from fluxfleet.presets import Preset, load_preset
from fluxfleet.settings import DEFAULT_PRESETS_DIR
from producer.cli import app


def preset(name: str, **updates: dict) -> Preset:
    p = load_preset(name, DEFAULT_PRESETS_DIR)
    for section, fields in updates.items():
        p = p.model_copy(update={section: getattr(p, section).model_copy(update=fields)})
    return p


NO_COMPILE = {"compile": {"enabled": False}}

# (preset, overrides, free GiB per GPU, expected policy, text encoders off after encode)
CASES = [
    ("bf16", {}, [80], "gpu", False),
    ("bf16", {}, [34], "gpu", True),  # 31.4 GiB fits, +4.6 GiB activations does not; without T5 it does
    ("bf16", NO_COMPILE, [30, 30], "balanced", False),
    ("bf16", NO_COMPILE, [28], "model_offload", False),  # transformer + activations = 26.8 GiB
    ("bf16", NO_COMPILE, [24], "group_offload", False),
    ("bnb-nf4", {}, [24], "gpu", False),
    ("bnb-nf4", {}, [16], "gpu", True),
    ("bnb-nf4-offload", {}, [80], "model_offload", False),  # forced by the preset
    ("torchao-int8wo", {}, [24], "gpu", False),
    ("gguf-q2k", {}, [24], "gpu", False),
    ("fp8-layerwise", {}, [24], "gpu", True),
    ("fp8-layerwise-group-offload", {}, [16], "group_offload", False),
    ("tiny", {}, [], "gpu", False),  # forced; on a CPU-only worker apply_placement keeps it on the CPU
    ("bf16", {}, [], "cpu", False),
]


@pytest.mark.parametrize(("name", "updates", "gib", "policy", "te_off"), CASES)
def test_plan_table(name: str, updates: dict, gib: list[int], policy: str, te_off: bool) -> None:
    plan = plan_placement(preset(name, **updates), [g * GIB for g in gib])
    assert (plan.policy, plan.text_encoder_off_gpu_after_encode) == (policy, te_off), plan.reason
    assert plan.fits or not gib  # no GPU: only the CPU 'fits'


# (preset, overrides, free GiB per GPU, words the refusal must contain)
REFUSALS = [
    ("bnb-nf4", {}, [], "CUDA"),
    ("quanto-int8", {"placement": {"policy": "group_offload"}}, [80], "#12610"),
    ("torchao-int8wo", {"placement": {"policy": "group_offload"}, **NO_COMPILE}, [80], "use_stream"),
    ("bf16", {"placement": {"policy": "group_offload"}}, [80], "fullgraph"),
    ("bf16", {}, [24, 24], "does not fit"),  # fullgraph compile rules out group offload; nothing else fits
]


@pytest.mark.parametrize(("name", "updates", "gib", "words"), REFUSALS)
def test_refusals_name_the_preset_and_reason(name: str, updates: dict, gib: list[int], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        plan_placement(preset(name, **updates), [g * GIB for g in gib])
    assert f"'{name}'" in str(info.value)


def test_torchao_group_offload_without_streams_is_allowed() -> None:
    p = preset("torchao-int8wo", placement={"policy": "group_offload", "group_offload_use_stream": False}, **NO_COMPILE)
    assert plan_placement(p, [24 * GIB]).policy == "group_offload"


# Seed (HF blog, H100): memory after loading, GiB (its "GB" are max_memory_reserved / 1024**3).
SEED_AFTER_LOAD = [
    ("bf16", 31.447),
    ("bnb-nf4", 12.584),
    ("bnb-int8", 19.273),
    ("torchao-int4", 10.635),
    ("torchao-int8wo", 17.020),
    ("torchao-fp8wo", 17.016),
    ("quanto-int4", 12.254),
    ("quanto-int8", 17.330),
    ("quanto-fp8", 16.395),
    ("gguf-q2k", 13.264),
    ("gguf-q4-1", 16.838),
    ("gguf-q8-0", 21.502),
    ("fp8-layerwise", 23.682),
]


@pytest.mark.parametrize(("name", "seed_gib"), SEED_AFTER_LOAD)
def test_estimates_are_calibrated_against_the_seed(name: str, seed_gib: float) -> None:
    estimate = sum(component_bytes(preset(name)).values()) / GIB
    assert estimate == pytest.approx(seed_gib, rel=0.05)


def test_group_offload_peak_matches_the_seed() -> None:
    # Seed: fp8 layerwise + leaf-level group offload with streams peaks at 14.232 GiB.
    plan = plan_placement(preset("fp8-layerwise-group-offload"), [80 * GIB])
    assert plan.expected_peak_bytes / GIB == pytest.approx(14.232, rel=0.1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * GIB), ("80GB", 80 * 10**9), ("512MiB", 512 * 1024**2), ("1.5G", int(1.5 * GIB)), ("1000", 1000)],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_a_toy_model_gets_no_flux_estimate() -> None:
    # The tiny preset's model is a few megabytes: FLUX.1-dev's 60-odd GiB would mean nothing.
    tiny = preset("tiny")
    assert "toy model" in (no_estimate_reason(tiny) or "")
    assert no_estimate_reason(preset("bf16")) is None
    with pytest.raises(ConfigurationError, match="'tiny' has no memory estimate"):
        component_bytes(tiny)
    plan = plan_placement(tiny, [80 * GIB])
    assert (plan.policy, plan.estimate, plan.expected_peak_bytes) == ("gpu", {}, 0)
    assert plan.no_estimate_reason and "no memory estimate" in plan.reason


def test_a_preset_without_estimate_must_force_its_placement() -> None:
    with pytest.raises(ConfigurationError, match="'auto' needs a memory estimate"):
        plan_placement(preset("tiny", placement={"policy": "auto"}), [80 * GIB])


def test_cli_reports_null_estimates_with_the_reason() -> None:
    rows = {row["name"]: row for row in json.loads(cli("presets", "--json"))}
    assert rows["tiny"]["estimated_bytes"] is None and rows["tiny"]["estimated_total_bytes"] is None
    assert "toy model" in rows["tiny"]["no_estimate_reason"]
    assert rows["bf16"]["no_estimate_reason"] is None and rows["bf16"]["estimated_total_bytes"] > 30 * GIB
    plan = json.loads(cli("plan", "--preset", "tiny", "--json"))
    assert (plan["policy"], plan["estimate_bytes"], plan["expected_peak_bytes"]) == ("gpu", None, None)
    assert "toy model" in plan["no_estimate_reason"]
    assert "n/a" in cli("presets")


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), terminal_width=400)
    assert result.exit_code == 0, result.output
    return result.output


def test_planner_and_cli_never_import_torch() -> None:
    code = "import sys, fluxfleet.planner, producer.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
