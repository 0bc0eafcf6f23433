"""benchmarks/results/: the files follow one naming scheme and SUMMARY.md is what the JSON files give."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.results_names import RESULTS_DIR, device_tag, parse, plan_what, result_path
from benchmarks.summarize import main, render

NOT_RESULTS = {"README.md", "SUMMARY.md", "summary.json"}


def test_committed_summary_is_what_the_json_files_give() -> None:
    md, js = render(RESULTS_DIR)
    assert (RESULTS_DIR / "SUMMARY.md").read_text() == md, "run: python benchmarks/summarize.py"
    assert (RESULTS_DIR / "summary.json").read_text() == js, "run: python benchmarks/summarize.py"
    assert main(["--check"]) == 0


def test_every_result_file_is_named_by_date_device_and_what_it_measured() -> None:
    files = [p.name for p in RESULTS_DIR.iterdir() if p.is_file() and p.name not in NOT_RESULTS]
    assert len(files) > 70
    for name in files:
        parts = parse(name)
        assert parts is not None, f"{name}: not <date>-<device>-<what>.<ext>"
        assert "call" not in parts.what, name
    summarized = set(json.loads((RESULTS_DIR / "summary.json").read_text())["files"])
    assert summarized == {n for n in files if n.endswith(".json")}  # no JSON file left out of the summary


def bench_file(directory: Path) -> None:
    # Given: a gpu_bench run with the bf16 eager anchor at 28 steps only and the fast preset at 28 and 50.
    common = {"anchor": False, "through_worker": False, "mem_after_load_gib": 16.15, "peak_gib": 18.53}
    records = [
        {"label": "anchor:bf16", "preset": "bf16", "steps": 28, "ms_per_step": 183.8, "s_per_image": 5.3}
        | {"anchor": True, "through_worker": False, "mem_after_load_gib": 31.44, "peak_gib": 33.85},
        {"label": "fast:cold", "preset": "fast", "steps": 28, "ms_per_step": 92.7, "s_per_image": 2.818}
        | common
        | {"cold_start_s": 39.9},
        {"label": "fast:cold", "preset": "fast", "steps": 50, "ms_per_step": 92.8, "s_per_image": 4.865} | common,
        {"label": "worker:fast", "preset": "fast", "through_worker": True, "steps": 28, "images": 16}
        | {"worker_ready_s": 22.4, "s_per_image": 2.873},
    ]
    data: dict[str, Any] = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-01-02", "plan": "x", "records": records}
    data["versions"] = {"torch": "2.11.0", "diffusers": "0.42.1"}
    (directory / "2026-01-02-H100-fast-vs-anchors.json").write_text(json.dumps(data))


def test_a_row_holds_the_run_figures_its_anchors_and_dashes_for_what_was_not_measured(tmp_path: Path) -> None:
    bench_file(tmp_path)
    # When: the summary is rendered.
    md, js = render(tmp_path)
    # Then: the fast row has both step counts, the anchor of the same run beside it, and "—" for the
    # anchors this run did not measure and for the cold start it has no figure for in the 50-step record.
    row = (
        "| fast, empty compile cache | H100 | V1 | 92.7 / 92.8 | 2.818 | 4.865 | 16.15 | 18.53 | 39.9 | 183.8 / — / — |"
    )
    assert row in md
    assert "| anchor: bf16 eager | H100 | V1 | 183.8 / — | 5.3 | — | 31.44 | 33.85 | — |" in md
    assert "| fast | H100 | 28 | 16 | 22.4 | — | — | 2.873 | — | V1 |" in md
    assert "| V1 | torch 2.11.0, diffusers 0.42.1 |" in md
    summary = json.loads(js)
    assert summary["files"] == ["2026-01-02-H100-fast-vs-anchors.json"]
    assert [r["config"] for r in summary["presets"]] == ["anchor: bf16 eager", "fast, empty compile cache"]


def test_check_reports_a_stale_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench_file(tmp_path)
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--dir", str(tmp_path), "--check"]) == 0
    (tmp_path / "SUMMARY.md").write_text("edited by hand\n")
    assert main(["--dir", str(tmp_path), "--check"]) == 1
    assert "SUMMARY.md" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("device", "tag"),
    [
        ("NVIDIA H100 80GB HBM3, 580.159.04", "H100"),
        ("2x NVIDIA H200", "2xH200"),
        ("NVIDIA H200 (143771 MiB)", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("cpu-16core-x86_64", "cpu"),
        ("x86_64", "cpu"),
    ],
)
def test_device_tag(device: str, tag: str) -> None:
    assert device_tag(device) == tag
    assert device_tag(tag) == tag  # a tag read back from a name stays what it is


def test_a_second_run_of_the_day_never_overwrites_the_first(tmp_path: Path) -> None:
    first = result_path("fast-vs-anchors", "NVIDIA H100 80GB HBM3", tmp_path)
    first.write_text("{}")
    second = result_path("fast-vs-anchors", "NVIDIA H100 80GB HBM3", tmp_path)
    assert second != first
    assert (parse(first.name).device, parse(second.name).device) == ("H100", "H100")  # type: ignore[union-attr]
    assert parse(second.name).what.startswith("fast-vs-anchors-")  # type: ignore[union-attr]


def test_plan_what() -> None:
    assert plan_what("anchor:bf16,fast:cold,fast:warm,worker:fast,anchor:bf16_compile") == "fast-vs-anchors"
    assert plan_what("fast@cdtune:cold,fast@cdtune:warm") == "fast-cdtune"
    assert plan_what("anchor:fp8_compile") == "anchors"
