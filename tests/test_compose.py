"""docker-compose.yml is valid Compose (every profile) and keeps the settings the fleet relies on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose missing: apt-get install docker-compose"
)
def test_compose_file_is_valid_with_every_profile() -> None:
    result = subprocess.run(
        ["docker-compose", "--profile", "dcgm", "--profile", "flower", "-f", "docker-compose.yml", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_compose_redis_workers_and_grace() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    workers = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert len(workers) >= 2
    device_ids = set()
    for service in workers.values():
        device_ids.update(service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > 1800  # above the default task time limit
    assert len(device_ids) == len(workers)  # one GPU per worker
