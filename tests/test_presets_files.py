"""Every preset file validates; bad names and bad files fail with the name, file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fluxfleet.errors import ConfigurationError, UnknownPresetError
from fluxfleet.presets import load_preset, preset_names
from fluxfleet.settings import DEFAULT_PRESETS_DIR
from producer.cli import app

NAMES = preset_names(DEFAULT_PRESETS_DIR)
SEED_RECIPES = [
    "bf16", "bnb-nf4", "bnb-fp4", "bnb-nf4-nested", "bnb-int8", "torchao-int4", "torchao-int8wo", "torchao-fp8wo",
    "torchao-fp8-dynamic-row", "quanto-int4", "quanto-int8", "quanto-fp8", "gguf-q2k", "gguf-q4-1", "gguf-q8-0",
    "fp8-layerwise", "bnb-nf4-offload", "fp8-layerwise-group-offload",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_file_loads(name: str) -> None:
    preset = load_preset(name, DEFAULT_PRESETS_DIR)
    assert preset.name == name
    if preset.quantization.backend == "gguf":
        assert preset.single_file, "a GGUF preset names its file"


def test_every_seed_recipe_has_a_preset() -> None:
    assert set(SEED_RECIPES) <= set(NAMES)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(UnknownPresetError) as info:
        load_preset("no-such-preset", DEFAULT_PRESETS_DIR)
    assert "bnb-nf4" in str(info.value) and "no-such-preset" in str(info.value)


def test_invalid_preset_file_names_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('model = "m"\n[quantization]\nbackend = "int3-magic"\n')
    with pytest.raises(ConfigurationError, match=r"bad\.toml.*quantization\.backend"):
        load_preset("bad", tmp_path)


def test_presets_json_describes_each_preset() -> None:
    result = CliRunner().invoke(app, ["presets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert set(rows) == set(NAMES)
    for row in rows.values():
        assert set(row["backends"]) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
        assert row["placement"]["policy"] and "enabled" in row["compile"]
        if row["no_estimate_reason"]:  # a toy model: no FLUX.1-dev figures (tests/test_planner.py)
            assert row["estimated_bytes"] is None and row["estimated_total_bytes"] is None
        else:
            assert row["estimated_total_bytes"] == sum(row["estimated_bytes"].values()) > 0
    assert rows["bnb-nf4"]["backends"]["text_encoder_2"] == "bitsandbytes"
    assert rows["gguf-q8-0"]["backends"] == {
        "transformer": "gguf",
        "text_encoder": "none",
        "text_encoder_2": "none",
        "vae": "none",
    }
    assert rows["bnb-nf4"]["estimated_total_bytes"] < rows["bf16"]["estimated_total_bytes"] / 2


def test_plan_command_prints_decision_and_estimates() -> None:
    result = CliRunner().invoke(app, ["plan", "--preset", "bnb-nf4", "--gpu-memory", "12GiB", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["policy"] == "gpu" and plan["text_encoder_off_gpu_after_encode"] is True
    assert plan["expected_peak_bytes"] > plan["estimate_bytes"]["transformer"]
    refused = CliRunner().invoke(app, ["plan", "--preset", "bnb-nf4", "--gpus", "0"])
    assert refused.exit_code == 1 and "CUDA" in refused.output


def test_multi_kernel_with_a_compile_cache_is_refused_naming_the_file(tmp_path: Path) -> None:
    # Given a preset asking for inductor multi-kernel and the shared compile cache together,
    (tmp_path / "mk.toml").write_text('model = "m"\n[speed]\nmulti_kernel = true\ncompile_cache = true\n')
    # then loading it fails before any worker starts, naming the file, the section and why.
    refused = r"mk\.toml.*speed.*multi_kernel cannot be combined with compile_cache"
    with pytest.raises(ConfigurationError, match=refused):
        load_preset("mk", tmp_path)
