"""``fluxfleet up``: GPU selection (pure, table-tested) and a real two-worker fleet on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fluxfleet.errors import ConfigurationError
from producer.client import Client
from producer.stack import free_port
from producer.up import (
    NoGpuError,
    discover_gpus,
    group_gpus,
    plan_workers,
    port_in_use,
    select_gpus,
)
from tests.conftest import base_env, settings_for

REPO = Path(__file__).resolve().parent.parent
TOKEN_VAR = "FLUXFLEET_UP_TEST_TOKEN"


def four_gpus() -> list[str]:
    return ["0", "1", "2", "3"]


def no_smi() -> list[str]:
    raise NoGpuError("no GPU found: `nvidia-smi` is not installed")


@pytest.mark.parametrize(
    ("spec", "environ", "query", "expected"),
    [
        ("all", {}, four_gpus, ["0", "1", "2", "3"]),
        ("ALL", {}, four_gpus, ["0", "1", "2", "3"]),
        ("0,1", {}, no_smi, ["0", "1"]),
        (" 3, 1 ", {}, no_smi, ["3", "1"]),
        # CUDA_VISIBLE_DEVICES already restricts this process: `all` means those, nvidia-smi is not asked.
        ("all", {"CUDA_VISIBLE_DEVICES": "2,3"}, no_smi, ["2", "3"]),
        ("all", {"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}, no_smi, ["GPU-1a2b", "GPU-3c4d"]),
        # CUDA ignores everything from the first invalid entry on.
        ("all", {"CUDA_VISIBLE_DEVICES": "1,-1,2"}, no_smi, ["1"]),
    ],
)
def test_select_gpus(spec: str, environ: dict[str, str], query: Callable[[], list[str]], expected: list[str]) -> None:
    assert select_gpus(spec, environ, query) == expected


@pytest.mark.parametrize(
    ("spec", "environ", "error", "message"),
    [
        ("all", {}, NoGpuError, "nvidia-smi"),
        ("all", {"CUDA_VISIBLE_DEVICES": ""}, NoGpuError, "hides every GPU"),
        ("all", {"CUDA_VISIBLE_DEVICES": "-1"}, NoGpuError, "hides every GPU"),
        ("", {}, ConfigurationError, "expected 'all'"),
        ("0,,1", {}, ConfigurationError, "expected 'all'"),
        ("0,x", {}, ConfigurationError, "'x' is not a GPU index"),
        ("-1", {}, ConfigurationError, "not a GPU index"),
        ("0,1,0", {}, ConfigurationError, "GPU 0 named twice"),
    ],
)
def test_select_gpus_rejects(spec: str, environ: dict[str, str], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        select_gpus(spec, environ, no_smi)


def test_nvidia_smi_is_asked_only_without_cuda_visible_devices() -> None:
    calls: list[int] = []

    def query() -> list[str]:
        calls.append(1)
        return ["0"]

    assert discover_gpus({"CUDA_VISIBLE_DEVICES": "5"}, query) == ["5"] and not calls
    assert discover_gpus({}, query) == ["0"] and calls == [1]


@pytest.mark.parametrize(
    ("gpus", "per_worker", "expected"),
    [
        (["0", "1", "2", "3"], 1, ["0", "1", "2", "3"]),
        (["0", "1", "2", "3"], 2, ["0,1", "2,3"]),
        (["4", "6"], 2, ["4,6"]),
    ],
)
def test_group_gpus(gpus: list[str], per_worker: int, expected: list[str]) -> None:
    assert group_gpus(gpus, per_worker) == expected


@pytest.mark.parametrize(("gpus", "per_worker"), [(["0", "1", "2"], 2), ([], 1), (["0"], 0)])
def test_group_gpus_rejects(gpus: list[str], per_worker: int) -> None:
    with pytest.raises(ConfigurationError):
        group_gpus(gpus, per_worker)


def test_plan_pins_each_gpu_with_its_own_metrics_port() -> None:
    specs = plan_workers(gpu_groups=["0", "1", "2,3"], metrics_base_port=9400, cpu_count=16)
    assert [(s.name, s.gpu, s.metrics_port) for s in specs] == [
        ("gpu0", "0", 9400),
        ("gpu1", "1", 9401),
        ("gpu2_3", "2,3", 9402),
    ]
    assert {s.env["OMP_NUM_THREADS"] for s in specs} == {"5"}


def test_plan_cpu_workers_hide_gpus_and_can_turn_metrics_off() -> None:
    specs = plan_workers(gpu_groups=None, cpu_workers=2, metrics_base_port=0, cpu_count=2)
    assert [(s.name, s.gpu, s.metrics_port) for s in specs] == [("cpu0", None, None), ("cpu1", None, None)]
    assert specs[1].env == {
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "FLUXFLEET_WORKER__DEVICE": "cpu",
        "FLUXFLEET_WORKER__GPU": "cpu1",
    }
    with pytest.raises(ConfigurationError):
        plan_workers(gpu_groups=None, cpu_workers=0)


def test_up_without_a_gpu_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.cli import app

    # Given a host without nvidia-smi and without CUDA_VISIBLE_DEVICES,
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    # when `up --gpus all` runs, it exits 2 before starting anything and says what to do.
    result = CliRunner().invoke(app, ["up", "--preset", "tiny", "--gpus", "all", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no GPU found" in result.output and "--device cpu" in result.output
    assert not (tmp_path / "fleet.json").exists()


# -- a real fleet ---------------------------------------------------------------------------------


def processes_with(token: str) -> list[int]:
    """Every live process started under this test (the token is inherited through the environment)."""
    marker = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def token() -> Iterator[str]:
    value = uuid.uuid4().hex
    yield value
    for pid in processes_with(value):  # only on failure: the test itself asserts there are none
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; output so far:\n{what()}")
        time.sleep(0.2)


@pytest.mark.slow
def test_up_serves_a_batch_on_two_cpu_workers_and_stops_everything(
    tmp_path: Path, tiny_model_dir: Path, token: str
) -> None:
    # Given `fluxfleet up --device cpu --workers 2` with no broker configured (so it starts its own Redis),
    store = tmp_path / "store"
    env = {**os.environ, **base_env(tiny_model_dir, f"file://{store}"), TOKEN_VAR: token}
    env.pop("FLUXFLEET_BROKER__URL", None)
    redis_port = free_port()
    state = tmp_path / "state"
    out = tmp_path / "up.log"
    args = ["up", "--preset", "tiny", "--device", "cpu", "--workers", "2", "--redis-port", str(redis_port)]
    metrics_port = free_port()
    args += ["--metrics-base-port", str(metrics_port), "--state-dir", str(state), "--grace", "30"]
    with out.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-c", "from producer.cli import main; main()", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    output = out.read_text
    try:
        wait_for(lambda: "all 2 workers ready" in output() or up.poll() is not None, 150, output)
        assert up.poll() is None, output()
        fleet = json.loads((state / "fleet.json").read_text())
        assert fleet["broker_url"] == f"redis://127.0.0.1:{redis_port}/0"
        assert (state / "redis" / "appendonlydir").is_dir(), "the local Redis runs with AOF"
        # Each worker serves its own metrics, on base port + its index.
        for i in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + i}/metrics", timeout=5) as response:
                assert f'gpu="cpu{i}"' in response.read().decode()

        # When a batch of 16 images (4 tasks) is submitted through that Redis,
        client = Client(
            settings_for({**base_env(tiny_model_dir, f"file://{store}"), "FLUXFLEET_BROKER__URL": fleet["broker_url"]})
        )
        job = client.submit([f"a lighthouse, variant {i}" for i in range(16)], preset="tiny", seed=7)
        status = job.wait(timeout=120)

        # then every item is generated exactly once, and both workers took part.
        assert (status.state, status.done, status.failed) == ("done", 16, 0)
        records = job.results()
        assert sorted(r.index for r in records) == list(range(16))
        assert not any(r.skipped for r in records)
        assert set(Counter(r.gpu for r in records)) == {"cpu0", "cpu1"}

        # When one worker dies, `up` reports it and keeps the other running;
        os.killpg(fleet["workers"][1]["pid"], signal.SIGKILL)
        wait_for(lambda: "worker cpu1 exited" in output(), 15, output)
        assert up.poll() is None

        # and on SIGTERM it stops every process it started, Redis last.
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, output()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert "stopped: cpu0 exit 0" in output()
    assert processes_with(token) == []
    assert not port_in_use(redis_port)
