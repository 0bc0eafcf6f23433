"""A machine that only submits jobs: ``pip install fluxfleet`` with no extras, in a fresh virtualenv.

The project is installed from a copy of its sources (as from a wheel: not editable, run away from the
checkout), then used as a producer against a real redis-server: --help, presets, submit, status. Commands
that need an extra end with the pip command instead of a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from producer.stack import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "fluxfleet", "producer", "workers", "config/presets")

pytestmark = pytest.mark.slow  # a virtualenv and a pip install: about 30 s with pip's cache


class ProducerVenv:
    def __init__(self, directory: Path, workdir: Path) -> None:
        self.bin = directory / "bin"
        self.workdir = workdir

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess[str]:
        """``args[0]`` from the virtualenv's bin, in a directory outside the checkout, without PYTHONPATH."""
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("FLUXFLEET_")}
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.workdir,
            env={**clean, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def producer_venv(tmp_path_factory: pytest.TempPathFactory) -> ProducerVenv:
    root = tmp_path_factory.mktemp("producer-install")
    source = root / "src"
    for name in SOURCES:  # a copy: building in the checkout would leave build/ in it
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    workdir = root / "work"
    workdir.mkdir()
    return ProducerVenv(venv, workdir)


def test_the_base_install_has_no_extras_and_imports_from_the_virtualenv(producer_venv: ProducerVenv) -> None:
    probe = producer_venv.run(
        "python",
        "-c",
        "import importlib.util as u, fluxfleet, producer.cli; print(fluxfleet.__file__); "
        "print([m for m in ('numpy', 'PIL', 'torch', 'matplotlib') if u.find_spec(m)])",
    )
    assert probe.returncode == 0, probe.stderr
    location, present = probe.stdout.splitlines()
    assert location.startswith(str(producer_venv.bin.parent)), location
    assert present == "[]"


def test_help_and_presets_run_without_extras(producer_venv: ProducerVenv) -> None:
    help_ = producer_venv.run("fluxfleet", "--help")
    assert help_.returncode == 0, help_.stderr
    for command in ("submit", "status", "wait", "results", "cancel", "top", "exporter", "presets", "plan", "compare"):
        assert command in help_.stdout
    presets = producer_venv.run("fluxfleet", "presets", "--json")
    assert presets.returncode == 0, presets.stderr
    names = {p["name"] for p in json.loads(presets.stdout)}
    assert {"tiny", "bf16", "fast", "lean"} <= names  # the presets travel with the package
    plan = producer_venv.run("fluxfleet", "plan", "--preset", "bf16", "--gpu-memory", "80GiB")
    assert plan.returncode == 0, plan.stderr


def test_submit_and_status_against_a_real_redis(
    producer_venv: ProducerVenv, redis_server: RedisServer, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in fresh snow\na lighthouse at dusk\n")
    env = {"FLUXFLEET_BROKER__URL": redis_server.url, "FLUXFLEET_STORAGE__URL": f"file://{tmp_path / 'store'}"}

    submitted = producer_venv.run("fluxfleet", "submit", str(prompts), "--preset", "tiny", "--json", env=env)

    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout.strip().splitlines()[-1])
    assert job["total"] == 2
    status = producer_venv.run("fluxfleet", "status", job["job_id"], "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["total"] == 2
    client = redis.Redis(port=redis_server.port)
    assert client.llen("fluxfleet.tiny") >= 1, "no task in the tiny preset's queue"
    assert any(job["job_id"] in key.decode() for key in client.scan_iter("fluxfleet:*"))

    # The rest of the producer's commands run too: the fleet view, the (empty) results, cancelling.
    top = producer_venv.run("fluxfleet", "top", "--once", env=env)
    assert top.returncode == 0, top.stderr
    assert "tiny" in top.stdout
    results = producer_venv.run("fluxfleet", "results", job["job_id"], env=env)
    assert results.returncode == 0 and results.stdout == "", results.stderr
    cancelled = producer_venv.run("fluxfleet", "cancel", job["job_id"], env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    waited = producer_venv.run("fluxfleet", "wait", job["job_id"], "--json", env=env)
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["state"] == "cancelled"


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("compare", "a", "b"), "report"),
        (("report", "some-job", "--out", "out"), "report"),
        (("worker", "--preset", "tiny"), "worker"),
        (("quantize", "--preset", "tiny", "--out", "out"), "worker"),
        (("demo",), "worker"),
    ],
)
def test_commands_that_need_an_extra_name_the_install_command(
    producer_venv: ProducerVenv, args: tuple[str, ...], extra: str
) -> None:
    result = producer_venv.run("fluxfleet", *args)
    assert result.returncode != 0
    assert f"pip install 'fluxfleet[{extra}]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one sentence
    assert "Traceback" not in result.stdout + result.stderr


def test_the_command_line_starts_without_the_extras_packages() -> None:
    # `fluxfleet --help` and every base command import no extra's package (numpy came in through compare).
    code = (
        "import sys; sys.argv = ['fluxfleet', '--help']\n"
        "from producer.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('numpy', 'PIL', 'matplotlib', 'torch', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
