"""The README documents what the code has: every metric (its table is generated from
``fluxfleet/metric_names.py``) and every public member of the ``Job`` object."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

from fluxfleet import metric_names as m
from producer.client import Job
from tests.conftest import ROOT

README = ROOT / "README.md"


def readme_table(text: str) -> str:
    start = text.index(m.README_BEGIN) + len(m.README_BEGIN)
    return text[start : text.index(m.README_END)].lstrip("\n")


def test_readme_metrics_table_is_the_generated_one() -> None:
    # If this fails: python -m fluxfleet.metric_names --update README.md
    assert readme_table(README.read_text(encoding="utf-8")) == m.markdown_table()


def test_the_generator_prints_the_table_and_updates_in_place(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fluxfleet.metric_names", "--markdown"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == m.markdown_table()
    # One row per metric, each with a unit
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `fluxfleet_")]
    assert [re.match(r"\| `([a-z_]+)`", row).group(1) for row in rows] == [s.name for s in m.ALL_METRICS]  # type: ignore[union-attr]
    assert all(row.split(" | ")[2].strip() for row in rows)
    # --update rewrites only what lies between the markers
    stale = f"intro\n{m.README_BEGIN}\n| old table |\n{m.README_END}\noutro\n"
    readme = tmp_path / "README.md"
    readme.write_text(stale)
    subprocess.run([sys.executable, "-m", "fluxfleet.metric_names", "--update", str(readme)], cwd=ROOT, check=True)
    assert readme.read_text() == f"intro\n{m.README_BEGIN}\n{m.markdown_table()}{m.README_END}\noutro\n"


def test_every_metric_has_a_unit() -> None:
    units = {spec.name: m.unit(spec) for spec in m.ALL_METRICS}
    assert units["fluxfleet_gpu_memory_peak_bytes"] == "bytes"
    assert units["fluxfleet_image_duration_seconds"] == "seconds"
    assert units["fluxfleet_images_total"] == "images"
    assert all(units.values())


def test_readme_documents_every_public_member_of_job() -> None:
    text = README.read_text(encoding="utf-8")
    members = {name for name, _ in inspect.getmembers(Job) if not name.startswith("_")}
    members |= {"id", "already_submitted"}  # instance attributes
    members -= {"client"}  # the Client it came from, not part of what a job offers
    missing = [name for name in sorted(members) if f"`job.{name}" not in text]
    assert not missing, f"README's Job table lacks {missing}"
    assert "job.job_id" not in text
