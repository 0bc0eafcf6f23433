"""A worker refuses to start, saying why, when its settings, storage or model are wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from producer.stack import RedisServer, free_port
from tests.conftest import base_env


def start_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.main", "--preset", "tiny", "--gpu", "0"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_visibility_timeout_must_exceed_the_time_limit(
    tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    env = {
        **base_env(tiny_model_dir, f"file://{tmp_path}"),
        "FLUXFLEET_BROKER__URL": redis_server.url,
        "FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S": "30",
        "FLUXFLEET_WORKER__TASK_TIME_LIMIT_S": "60",
    }
    result = start_worker(env)
    assert result.returncode == 2
    assert (
        "FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S (30) must exceed FLUXFLEET_WORKER__TASK_TIME_LIMIT_S" in result.stderr
    )


def test_missing_model_directory(tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path) -> None:
    env = {
        **base_env(tiny_model_dir, f"file://{tmp_path}"),
        "FLUXFLEET_BROKER__URL": redis_server.url,
        "FLUXFLEET_MODEL_DIR": str(tmp_path / "nowhere"),
    }
    result = start_worker(env)
    assert result.returncode == 2 and "nowhere' has no model_index.json" in result.stderr


def test_missing_bucket(redis_server: RedisServer, tiny_model_dir: Path, s3_endpoint: str) -> None:
    env = {
        **base_env(tiny_model_dir, "s3://no-such-bucket/x"),
        "FLUXFLEET_BROKER__URL": redis_server.url,
        "FLUXFLEET_STORAGE__ENDPOINT_URL": s3_endpoint,
    }
    result = start_worker(env)
    assert result.returncode == 2 and "bucket 'no-such-bucket' is not reachable" in result.stderr


def test_redis_unreachable(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {
        **base_env(tiny_model_dir, f"file://{tmp_path}"),
        "FLUXFLEET_BROKER__URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    result = start_worker(env)
    assert result.returncode == 2 and "Redis is not reachable" in result.stderr
