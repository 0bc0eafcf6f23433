"""A worker refuses to start, saying why, when its settings, storage or model are wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert result.returncode == 2 and "bucket 'no-such-bucket' does not exist" in result.stderr


def test_redis_unreachable(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {
        **base_env(tiny_model_dir, f"file://{tmp_path}"),
        "FLUXFLEET_BROKER__URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    result = start_worker(env)
    assert result.returncode == 2 and "Redis is not reachable" in result.stderr


def test_worker_warns_when_a_library_would_be_compiled_from_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import py_compile

    from workers.main import warn_if_importing_from_source

    # Given an installed package without bytecode (as a --no-compile install leaves it),
    package = tmp_path / "heavylib"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # then the worker names it in a warning that says how to fix it,
    with caplog.at_level("WARNING", logger="workers"):
        assert warn_if_importing_from_source(("heavylib",)) == ["heavylib"]
    assert "no bytecode cache for heavylib" in caplog.text and "compileall" in caplog.text
    # and once its bytecode is compiled, nothing is reported.
    py_compile.compile(str(package / "__init__.py"), doraise=True)
    assert warn_if_importing_from_source(("heavylib",)) == []
