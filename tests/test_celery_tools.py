"""Celery's own tools work on a fluxfleet fleet: ``celery -A fluxfleet inspect ping`` answers from a real
worker, with the app built from the FLUXFLEET_* settings (fluxfleet/celery.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from producer.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).parent / "celery")


def celery_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CELERY, "-A", "fluxfleet", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_inspect_ping_gets_pong_from_a_real_worker(make_stack: Callable[..., LocalStack], tmp_path: Path) -> None:
    # Given a Redis and a tiny worker started the way fluxfleet starts them
    stack = make_stack()
    stack.start_redis()
    worker = stack.start_worker("tiny")
    worker.wait_ready(timeout=180)

    # When Celery's own command line asks the fleet's broker who is there (from outside the checkout)
    result = celery_cli(
        "inspect",
        "ping",
        "--timeout",
        "5",
        env={"FLUXFLEET_BROKER__URL": stack.env["FLUXFLEET_BROKER__URL"]},
        cwd=tmp_path,
    )

    # Then the worker answers by its name
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pong" in result.stdout
    assert "tiny-gpu0@" in result.stdout


def test_importing_the_app_module_reads_nothing_and_loads_no_torch() -> None:
    # An invalid setting would fail Settings(): importing must not build it; the first access of `app` does.
    code = (
        "import sys, fluxfleet.celery as m\n"
        "assert 'torch' not in sys.modules and m._app is None\n"
        "try:\n"
        "    m.app\n"
        "except Exception as e:\n"
        "    print('raised on access:', str(e).lower())\n"
    )
    env = {**os.environ, "FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S": "not-a-number"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("raised on access:") and "visibility_timeout" in result.stdout, result.stdout


def test_the_app_carries_the_fleet_settings(tmp_path: Path) -> None:
    code = (
        "import fluxfleet.celery as m\n"
        "c = m.app.conf\n"
        "print(m.celery is m.app, c.broker_url, c.accept_content, c.broker_transport_options['visibility_timeout'])\n"
    )
    env = {
        **os.environ,
        "FLUXFLEET_BROKER__URL": "redis://10.0.0.7:6390/2",
        "FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S": "7200",
    }
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "redis://10.0.0.7:6390/2", "['json']", "7200"]
