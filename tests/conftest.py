"""Real services for the tests: redis-server processes, an S3 server (moto over HTTP), Celery workers.

Fixtures:
- ``tiny_model_dir``: the tiny random-weight FLUX pipeline, built once per session.
- ``redis_server``: a fresh redis-server on a free loopback port for one test (tests may kill it).
- ``s3_endpoint``: moto's ThreadedMotoServer, one per session; ``s3_bucket`` makes a fresh bucket.
- ``make_stack``: a factory for a LocalStack (Redis + workers) whose processes stop after the test.
- ``shared_stack``: one Redis and one tiny worker on local storage, shared by the round-trip tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fluxfleet.settings import Settings
from producer.client import Client
from producer.stack import LocalStack, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter at the project root; returns its last line of output.

    For what must not share this process's imports or torch state; fails the test with its stderr.
    """
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


# Short timeouts so fault tests finish in seconds; workers read them from the environment.
FAST_ENV = {
    "FLUXFLEET_WORKER__DEVICE": "cpu",
    "FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S": "120",
    "FLUXFLEET_WORKER__TASK_TIME_LIMIT_S": "60",
    "FLUXFLEET_WORKER__TASK_SOFT_TIME_LIMIT_S": "50",
    "FLUXFLEET_BROKER__RESTORE_INTERVAL_S": "1",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tools.tiny_model import build_tiny_pipeline

    cached = Path(os.environ.get("FLUXFLEET_TEST_MODEL_CACHE", ".cache/tiny-flux"))
    if (cached / "model_index.json").is_file():
        return cached.resolve()
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux")).resolve()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory=tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"fluxfleet-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def s3_env(endpoint_url: str, secret: str = "testing") -> dict[str, str]:
    """Storage settings for the S3 server at ``endpoint_url`` (moto takes any credentials)."""
    return {
        "FLUXFLEET_STORAGE__ENDPOINT_URL": endpoint_url,
        "FLUXFLEET_STORAGE__ACCESS_KEY_ID": "testing",
        "FLUXFLEET_STORAGE__SECRET_ACCESS_KEY": secret,
    }


def settings_for(env: dict[str, str]) -> Settings:
    """Settings as a process started with ``env`` would read them."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def base_env(tiny_model_dir: Path, storage_url: str) -> dict[str, str]:
    return {**FAST_ENV, "FLUXFLEET_MODEL_DIR": str(tiny_model_dir), "FLUXFLEET_STORAGE__URL": storage_url}


@pytest.fixture
def make_stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Callable[..., LocalStack]]:
    stacks: list[LocalStack] = []

    def factory(storage_url: str | None = None, **extra_env: str) -> LocalStack:
        url = storage_url or f"file://{tmp_path / 'store'}"
        stack = LocalStack(env={**base_env(tiny_model_dir, url), **extra_env}, workdir=tmp_path / f"stack{len(stacks)}")
        stack.__enter__()
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.close()


class SharedStack:
    def __init__(self, stack: LocalStack, storage_root: Path) -> None:
        self.stack = stack
        self.storage_root = storage_root
        self.settings = settings_for(stack.env)

    def client(self) -> Client:
        return Client(self.settings)


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[SharedStack]:
    root = tmp_path_factory.mktemp("shared")
    with LocalStack(env=base_env(tiny_model_dir, f"file://{root / 'store'}"), workdir=root) as stack:
        stack.start_redis()
        stack.start_worker("tiny").wait_ready(timeout=180)
        yield SharedStack(stack, root / "store")
