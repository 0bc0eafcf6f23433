"""What a person reads: `fluxfleet demo`'s output and a worker's log at INFO carry no warnings from
libraries the preset does not use, no deprecations and no progress bars.

Every warning-looking line fails the test unless ``EXPECTED`` lists it with the reason it stays.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from producer.client import Client
from producer.stack import LocalStack
from tests.conftest import FAST_ENV, ROOT, settings_for

# A warning in any of the forms seen in worker logs and the demo: a log record at WARNING, a Python
# warning category, torch's glog-style "W1202 ..." lines, the quantization packages' notices, and the
# Hugging Face libraries' own prefixed handlers.
WARNING_LINE = re.compile(
    r"\bWARNING\b|\b\w*Warning\b|^W\d{4} |Failed to load|Detected no triton|\[transformers\]|\[diffusers\]"
)
# A tqdm refresh ("Loading weights:  50%|#####     | 18/36 [00:00<00:00, 29.4it/s]") or its cursor-up code.
PROGRESS_BAR = re.compile(r"\d+%\||it/s\]|s/it\]|^\[A$|\x1b\[A")

EXPECTED = [
    # Celery's own start-up warning when a worker runs as root (CI containers do). It is a real concern for
    # an operator, so it stays; a worker started by an ordinary user never prints it.
    re.compile(r"SecurityWarning: You're running the worker with superuser privileges"),
]


def unexpected_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if (WARNING_LINE.search(line) or PROGRESS_BAR.search(line)) and not any(p.search(line) for p in EXPECTED)
    ]


def test_the_line_filter_catches_what_the_issue_saw() -> None:
    seen = [
        "2026-12-02 08:21:55,054 WARNING celery.redirected: Loading pipeline components...:   0%|          | 0/7",
        "Loading weights: 100%|##########| 36/36 [00:00<00:00, 29290.97it/s]",
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.",
        "Warning: Detected no triton, on systems without Triton certain kernels will not work",
        "W1202 08:21:27.363000 7916 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass",
        "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back",
        "deprecation_utils.py:23: FutureWarning: `torch_dtype` is deprecated and will be removed in version 1.0.0.",
    ]
    assert unexpected_lines("\n".join(seen)) == seen
    assert unexpected_lines("2026-12-02 08:24:14,764 INFO workers.service.app: worker ready: preset tiny") == []


def test_building_the_tiny_model_prints_only_its_result(tmp_path: Path) -> None:
    # Given a fresh directory, as `make demo` sees on a clean clone
    proc = subprocess.run(
        [sys.executable, "-m", "workers.tools.tiny_model", str(tmp_path / "tiny")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then the build says what it made, and nothing from bitsandbytes, torchao or the saving bars
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert unexpected_lines(output) == [], output
    assert output.strip().splitlines() == [
        f"saved a random-weight FLUX pipeline (transformer 0.00B, text_encoder 0.00B, text_encoder_2 0.00B, "
        f"vae 0.00B) to {tmp_path / 'tiny'}"
    ]


def test_demo_output_and_worker_log_are_readable(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Given two prompts and the shared tiny model, the demo as `make demo` runs it, without a terminal
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    env = {**os.environ, **FAST_ENV, "TMPDIR": str(tmp_path), "COLUMNS": "80", "FLUXFLEET_LOGLEVEL": "INFO"}
    command = [str(Path(sys.executable).parent / "fluxfleet"), "demo", "--prompts", str(prompts)]
    command += ["--output", str(tmp_path / "out"), "--model-dir", str(tiny_model_dir)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "done: 2 images" in output

    # Then the demo's own output has no warning and no bar
    assert unexpected_lines(output) == [], output

    # And the worker's log holds the stages an operator follows, and nothing that looks like a warning
    match = re.search(r"\(log: (\S+)\)", output)
    assert match, output
    log = Path(match.group(1)).read_text()
    for needed in ("loaded preset tiny", "warmed up preset tiny", "worker ready: preset tiny", "received", "succeeded"):
        assert needed in log, f"{needed!r} missing from the worker log:\n{log}"
    assert unexpected_lines(log) == [], log
    assert "celery.redirected" not in log, log
    assert "torch_dtype" not in log, log


def test_presets_at_80_columns_shows_every_name_whole() -> None:
    from fluxfleet.presets import preset_names
    from fluxfleet.settings import Settings

    # Given no terminal and 80 columns, as in a CI log or a pipe
    env = {**os.environ, "COLUMNS": "80"}
    fluxfleet = str(Path(sys.executable).parent / "fluxfleet")
    proc = subprocess.run([fluxfleet, "presets"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # Then each preset starts a table row with its whole name, then its description line; nothing is cut
    names = preset_names(Settings().presets_dir)
    assert len(names) >= 20
    for name in names:
        assert sum(line.split()[:1] == [name] for line in lines) == 2, f"{name}:\n{proc.stdout}"
    assert "…" not in proc.stdout and max(len(line) for line in lines) <= 80, proc.stdout
    assert "est." in proc.stdout and "n/a" in proc.stdout  # the numbers stay in the table


def test_an_s3_worker_log_holds_no_library_chatter(
    make_stack: Callable[..., LocalStack], s3_endpoint: str, s3_bucket: str
) -> None:
    # Given a worker storing to S3 (moto over HTTP) with the AWS_* credentials of the environment (the
    # s3_endpoint fixture sets them), serving one job
    stack = make_stack(f"s3://{s3_bucket}/images", FLUXFLEET_STORAGE__ENDPOINT_URL=s3_endpoint)
    stack.start_redis()
    worker = stack.start_worker("tiny")
    worker.wait_ready(timeout=180)
    job = Client(settings_for(stack.env)).submit(["a red cat", "a blue dog"], preset="tiny")
    assert job.wait(timeout=120).state == "done"
    worker.stop()
    log = worker.log()
    # Then its log has the worker's own lines: no INFO chatter of the S3 client, nothing that looks like a warning
    assert "botocore" not in log and "s3transfer" not in log, log
    assert unexpected_lines(log) == [], log
    assert "Task fluxfleet.generate" in log and "succeeded" in log
