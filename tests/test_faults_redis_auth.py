"""A password-protected Redis: workers and producers authenticate with FLUXFLEET_BROKER__PASSWORD;
without it they fail clearly; the password never reaches the logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluxfleet.errors import BrokerUnavailable
from producer.client import Client
from producer.stack import LocalStack, RedisServer
from tests.conftest import base_env, settings_for
from tests.faultkit import check_end_state

pytestmark = pytest.mark.faults

PASSWORD = "s3cret-redis-pass"


def test_password_protected_redis(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {**base_env(tiny_model_dir, f"file://{tmp_path / 'store'}"), "FLUXFLEET_BROKER__PASSWORD": PASSWORD}
    with LocalStack(env=env, workdir=tmp_path) as stack:
        stack.redis = RedisServer(directory=tmp_path / "redis", password=PASSWORD).start()
        stack.env["FLUXFLEET_BROKER__URL"] = stack.redis.url

        # Without the password, a worker refuses to start and a producer fails fast, both saying why.
        anonymous = {**os.environ, **stack.env}
        anonymous.pop("FLUXFLEET_BROKER__PASSWORD")
        refused = subprocess.run(
            [sys.executable, "-m", "workers.main", "--preset", "tiny"],
            env=anonymous,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2 and "Redis is not reachable" in refused.stderr
        assert "AUTH" in refused.stderr  # Redis asks for authentication
        with pytest.raises(BrokerUnavailable):
            Client(settings_for({k: v for k, v in stack.env.items() if k != "FLUXFLEET_BROKER__PASSWORD"})).submit(
                ["a cat"], preset="tiny"
            )

        # With it, the whole path works.
        worker = stack.start_worker("tiny")
        worker.wait_ready(timeout=180)
        client = Client(settings_for(stack.env))
        job = client.submit(["a red cat", "a blue door"], preset="tiny", job_id="auth")
        assert job.wait(timeout=90).state == "done"
        check_end_state(client, job.id, done=2)
        assert PASSWORD not in worker.log()
