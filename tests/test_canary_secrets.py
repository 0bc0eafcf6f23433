"""A canary Redis password and a canary S3 secret key go through the whole fleet, run as real processes
(``up`` with its own password-protected Redis, a separate ``worker``, the ``exporter``, ``submit --wait``,
``status``, ``results``, ``cancel``, a failing command); neither appears in any output, log, metrics page,
stored object, or file written under the state and output directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis

from producer.stack import free_port
from tests.conftest import FAST_ENV, s3_env
from tests.faultkit import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REDIS_CANARY = f"canary-redis-{uuid.uuid4().hex[:12]}"
S3_CANARY = f"canary-s3-{uuid.uuid4().hex[:12]}"
CANARIES = (REDIS_CANARY, S3_CANARY)


class Processes:
    """Long-running ``fluxfleet`` commands, each with its output in a file; all stopped at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, env: dict[str, str], *args: str) -> Path:
        log = self.out_dir / f"{name}.out"
        with log.open("wb") as handle:
            self.running.append(
                subprocess.Popen(
                    [sys.executable, "-m", "producer.cli", *args],
                    cwd=ROOT,
                    env=env,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        return log

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    out = tmp_path / "outputs"
    out.mkdir()
    started = Processes(out)
    yield started
    started.stop()


def run(out_dir: Path, name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A short ``fluxfleet`` command; its stdout and stderr are also kept under ``out_dir``."""
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    (out_dir / f"{name}.stdout").write_text(proc.stdout)
    (out_dir / f"{name}.stderr").write_text(proc.stderr)
    return proc


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def assert_no_canary(where: str, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for canary in CANARIES:
        assert canary.encode() not in raw, f"{canary} leaked into {where}"


def test_no_secret_reaches_any_output_log_metrics_page_or_file(
    tmp_path: Path, tiny_model_dir: Path, s3_endpoint: str, s3_bucket: str, processes: Processes
) -> None:
    # Given a password for the broker and a secret key for S3 (moto takes any), and no broker URL,
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLUXFLEET_")}
    env = {
        **clean,
        **FAST_ENV,
        **s3_env(s3_endpoint, secret=S3_CANARY),
        "FLUXFLEET_MODEL_DIR": str(tiny_model_dir),
        "FLUXFLEET_STORAGE__URL": f"s3://{s3_bucket}/out",
        "FLUXFLEET_BROKER__PASSWORD": REDIS_CANARY,
        "FLUXFLEET_WORKER__WARMUP": "false",
    }
    state, out = tmp_path / "state", processes.out_dir
    redis_port, metrics_port, worker_metrics_port, exporter_port = (free_port() for _ in range(4))

    # when `fluxfleet up` starts its own Redis and a CPU worker,
    up_log = processes.start(
        "up",
        env,
        *("up", "--preset", "tiny", "--device", "cpu", "--workers", "1", "--redis-port", str(redis_port)),
        *("--metrics-base-port", str(metrics_port), "--state-dir", str(state), "--grace", "30"),
    )
    wait_for(lambda: "password required" in up_log.read_text(), 60, "up to start its Redis")
    # (that Redis requires the password, which is not on its command line)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=redis_port).ping()
    assert redis.Redis(port=redis_port, password=REDIS_CANARY).ping()

    # a second worker joins with `fluxfleet worker`, the exporter serves queue metrics, and every
    # command below reads the password from the broker URL itself;
    with_url = {k: v for k, v in env.items() if k != "FLUXFLEET_BROKER__PASSWORD"}
    with_url["FLUXFLEET_BROKER__URL"] = f"redis://:{REDIS_CANARY}@127.0.0.1:{redis_port}/0"
    worker_log = processes.start(
        "worker",
        {**with_url, "FLUXFLEET_WORKER__DEVICE": "cpu"},
        *("worker", "--preset", "tiny", "--gpu", "cpu9", "--metrics-port", str(worker_metrics_port)),
    )
    processes.start("exporter", with_url, "exporter", "--port", str(exporter_port))
    wait_for(lambda: "all 1 workers ready" in up_log.read_text(), 180, "up's worker to be ready")
    wait_for(lambda: "worker ready" in worker_log.read_text(), 180, "the second worker to be ready")
    fleet = json.loads((state / "fleet.json").read_text())
    assert "password" not in (Path("/proc") / str(fleet["redis_pid"]) / "cmdline").read_text()
    assert_no_canary("redis-server's command line", (Path("/proc") / str(fleet["redis_pid"]) / "cmdline").read_bytes())

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a lighthouse at dusk, variant {i}\n" for i in range(6)))
    submitted = run(out, "submit", with_url, "submit", str(prompts), "--preset", "tiny", "--job-id", "canary", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    assert "job canary: done — 6 images" in submitted.stdout
    assert run(out, "status", with_url, "status", "canary").stdout.startswith("job canary [done]: 6/6 finished")
    assert json.loads(run(out, "status-json", with_url, "status", "canary", "--json").stdout)["done"] == 6
    results = run(out, "results", with_url, "results", "canary").stdout.splitlines()
    assert len(results) == 6
    assert "already done" in run(out, "cancel", with_url, "cancel", "canary").stdout
    assert run(out, "wait", with_url, "wait", "canary", "--json").returncode == 0
    wrong_env = {**env, "FLUXFLEET_BROKER__URL": f"redis://127.0.0.1:{redis_port}/0"}
    wrong = run(out, "wrong-password", {**wrong_env, "FLUXFLEET_BROKER__PASSWORD": REDIS_CANARY + "-x"}, "status", "x")
    assert wrong.returncode == 1 and "refused the password" in wrong.stderr

    # then no metrics page shows a canary,
    pages = {port: scrape(port) for port in (metrics_port, worker_metrics_port, exporter_port)}
    assert "fluxfleet_" in pages[metrics_port] and "fluxfleet_" in pages[exporter_port]
    for port, page in pages.items():
        assert_no_canary(f"the metrics page on port {port}", page)
    # and once everything has stopped, no output, log, state file or stored object holds one.
    processes.stop()
    written = [p for d in (state, out) for p in d.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"fleet.json", "worker-cpu0.log", "redis.log", "up.out", "worker.out", "exporter.out"} <= names, names
    for path in written:
        assert_no_canary(str(path), path.read_bytes())
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert sum(k.endswith(".png") for k in keys) == 6 and any(k.endswith("manifest.jsonl") for k in keys), keys
    for key in keys:
        assert_no_canary(f"s3://{s3_bucket}/{key}", s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())


def test_up_masks_a_password_in_the_configured_broker_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.up import BROKER_ENV, Fleet, plan_workers

    # Given a broker URL that carries the password (so `up` starts no Redis of its own),
    monkeypatch.setenv(BROKER_ENV, f"redis://:{REDIS_CANARY}@redis.internal:6379/0")
    fleet = Fleet("tiny", plan_workers(gpu_groups=None, cpu_workers=1), state_dir=tmp_path)
    # the URL it prints and the fleet.json it writes show the broker with the password masked.
    assert fleet.broker_url == "redis://:***@redis.internal:6379/0"
    fleet.write_state()
    state = json.loads((tmp_path / "fleet.json").read_text())
    assert state["broker_url"] == "redis://:***@redis.internal:6379/0"
    assert_no_canary("fleet.json", (tmp_path / "fleet.json").read_bytes())
