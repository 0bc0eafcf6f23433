"""``fluxfleet report``: a contact sheet and plots from a tiny-pipeline job, opened as images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageStat

pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install 'fluxfleet[report]'")

FLUXFLEET = str(Path(sys.executable).with_name("fluxfleet"))


@pytest.mark.slow
def test_report_from_a_tiny_job(shared_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Given a finished job of 6 images
    job = shared_stack.client().submit([f"report image {i}: a snowy owl on a branch" for i in range(6)], preset="tiny")
    assert job.wait(timeout=180).state == "done"

    # When the report is written
    out = tmp_path / "report"
    env = {**os.environ, **shared_stack.stack.env}
    result = subprocess.run(
        [FLUXFLEET, "report", job.id, "--out", str(out), "--json"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)

    # Then each file is a real, non-blank PNG of the expected size
    assert paths["images"] == 6
    with Image.open(paths["contact_sheet"]) as sheet:
        assert sheet.format == "PNG"
        assert sheet.width >= 3 * 192 and sheet.height >= 2 * 192
        assert max(hi - lo for lo, hi in sheet.convert("RGB").getextrema()) > 100
        assert ImageStat.Stat(sheet.convert("L")).stddev[0] > 10
    for key in ("throughput", "seconds_per_image"):
        with Image.open(paths[key]) as plot:
            assert plot.format == "PNG" and plot.size == (800, 400)
            assert ImageStat.Stat(plot.convert("L")).stddev[0] > 5, f"{key} plot is blank"


def test_report_unknown_job_fails_cleanly(shared_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, **shared_stack.stack.env}
    result = subprocess.run(
        [FLUXFLEET, "report", "no-such-job", "--out", str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "no stored images" in result.stderr
