"""A password-protected Redis: workers and producers authenticate with FLUXFLEET_BROKER__PASSWORD;
without it they fail clearly; the password never reaches the logs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fluxfleet.errors import BrokerUnavailable
from producer.client import Client
from producer.stack import LocalStack, RedisServer, WorkerProcess
from tests.conftest import base_env, settings_for
from tests.faultkit import check_end_state

pytestmark = pytest.mark.faults

PASSWORD = "s3cret-redis-pass"


def serve_a_job(stack: LocalStack, job_id: str) -> WorkerProcess:
    """Start a worker with the stack's broker settings and run a two-image job through it to the end."""
    worker = stack.start_worker("tiny")
    worker.wait_ready(timeout=180)
    client = Client(settings_for(stack.env))
    job = client.submit(["a red cat", "a blue door"], preset="tiny", job_id=job_id)
    assert job.wait(timeout=90).state == "done"
    check_end_state(client, job.id, done=2)
    return worker


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
        worker = serve_a_job(stack, "auth")
        assert PASSWORD not in worker.log()


def make_certificates(directory: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=fluxfleet-test-ca",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"
    )
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return directory


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_tls_redis(tmp_path: Path, tiny_model_dir: Path) -> None:
    certificates = make_certificates(tmp_path / "tls")
    env = {**base_env(tiny_model_dir, f"file://{tmp_path / 'store'}")}
    with LocalStack(env=env, workdir=tmp_path) as stack:
        stack.redis = RedisServer(directory=tmp_path / "redis", tls_dir=certificates).start()
        stack.env["FLUXFLEET_BROKER__URL"] = stack.redis.url
        assert stack.redis.url.startswith("rediss://")

        # Without the CA the server's certificate is not trusted: the producer refuses to talk to it.
        with pytest.raises(BrokerUnavailable):
            Client(settings_for(stack.env)).submit(["a cat"], preset="tiny")

        # With it, the whole path runs over TLS: producer, Celery broker connection, job state.
        stack.env["FLUXFLEET_BROKER__TLS_CA_FILE"] = str(certificates / "ca.crt")
        serve_a_job(stack, "tls")
