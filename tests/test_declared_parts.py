"""Backends and speed levers are declared parts: every declaration has its worker module, and every ``[speed]``
setting belongs to a declared lever (or to the builder's compile-cache and warm-up steps)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fluxfleet.backends import BACKENDS
from fluxfleet.levers import BUILD_FIELDS, LEVERS
from fluxfleet.presets import SpeedSpec

ROOT = Path(__file__).resolve().parent.parent


def functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_declared_backend_has_a_loader(name: str) -> None:
    assert "pipeline_kwargs" in functions(ROOT / "workers" / "pipeline" / "backends" / f"{name}.py")


@pytest.mark.parametrize("name", [lever.name for lever in LEVERS])
def test_every_declared_lever_applies_itself(name: str) -> None:
    assert "apply" in functions(ROOT / "workers" / "speed" / "levers" / f"{name}.py")


def test_every_speed_setting_belongs_to_one_lever_or_to_the_builder() -> None:
    declared = [field for lever in LEVERS for field in lever.fields] + list(BUILD_FIELDS)
    assert sorted(declared) == sorted(SpeedSpec.model_fields)


def test_a_backend_refusal_is_reported_when_the_preset_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxfleet.backends import BackendSpec
    from fluxfleet.errors import ConfigurationError
    from fluxfleet.presets import load_preset

    # Given a backend that declares it cannot run under CUDA graphs,
    refusing = BackendSpec("refusing", lambda _options, dtype_bytes: dtype_bytes, refuses={"cuda_graph": "no replay"})
    monkeypatch.setitem(BACKENDS, "refusing", refusing)
    (tmp_path / "r.toml").write_text('model = "m"\n[quantization]\nbackend = "refusing"\n[speed]\ncuda_graph = true\n')
    # then a preset combining them is refused when read, naming the file, the backend and the reason.
    with pytest.raises(ConfigurationError, match=r"r\.toml.*backend 'refusing' refuses cuda_graph: no replay"):
        load_preset("r", tmp_path)
    # and without the CUDA graph it loads.
    (tmp_path / "r.toml").write_text('model = "m"\n[quantization]\nbackend = "refusing"\n')
    assert load_preset("r", tmp_path).quantization.backend == "refusing"


def test_the_planner_sizes_a_backend_by_its_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxfleet.backends import BackendSpec
    from fluxfleet.estimate import PARAMS, component_bytes
    from fluxfleet.presets import Preset

    # Given a new backend that declares 2 bits per weight and quantizes the transformer only,
    two_bit = BackendSpec("two-bit", lambda _options, _dtype_bytes: 0.25, components=("transformer",))
    monkeypatch.setitem(BACKENDS, "two-bit", two_bit)
    preset = Preset.model_validate({"name": "p", "model": "m", "quantization": {"backend": "two-bit"}})
    # then the estimate counts its linear layers at that size and leaves the other components in bf16.
    est = component_bytes(preset)
    t = PARAMS["transformer"]
    assert est["transformer"] == int((t["linear"] + t["modulation"]) * 0.25 + t["other"] * 2)
    assert est["text_encoder_2"] == 2 * sum(PARAMS["text_encoder_2"].values())
