"""Local processes for the demo, the tests and single-host fleets: a private Redis and workers.

Everything started here is stopped by ``close()`` (also on Ctrl-C and on errors, through ``with``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

READY_LINE = "worker ready"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not found:
        raise RuntimeError("redis-server is not installed: run `apt-get install redis-server` (or `make venv`)")
    return found


def config_string(value: str) -> str:
    """``value`` as a double-quoted redis.conf argument, every byte hex-escaped (any password survives)."""
    return '"' + "".join(f"\\x{b:02x}" for b in value.encode()) + '"'


class RedisServer:
    """A private redis-server on a free loopback port; ``appendonly`` keeps queued work across restarts."""

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = True,
        directory: Path | None = None,
        password: str | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        """``tls_dir`` holds server.crt, server.key and ca.crt: serve TLS only (``rediss://``)."""
        self.tls_dir = tls_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.directory = directory or Path(tempfile.mkdtemp(prefix="fluxfleet-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls_dir else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            str(self.directory),
        ]
        if self.password:
            # The password goes in through stdin ('-': read config from stdin), never on the command line,
            # where `ps` shows it to every user of the host, nor in a config file left in the data dir.
            args.insert(1, "-")
        tls: dict[str, Any] = {}
        if self.tls_dir:
            args[args.index("--port") + 1] = "0"
            args += ["--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(self.tls_dir / "server.crt")]
            args += ["--tls-key-file", str(self.tls_dir / "server.key")]
            args += ["--tls-ca-cert-file", str(self.tls_dir / "ca.crt")]
            tls = {"ssl_ca_certs": str(self.tls_dir / "ca.crt")}
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if self.password else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.password and self.process.stdin is not None:
            self.process.stdin.write(f"requirepass {config_string(self.password)}\n".encode())
            self.process.stdin.close()
        client = redis.Redis(
            port=self.port, password=self.password, socket_connect_timeout=0.5, ssl=bool(self.tls_dir), **tls
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return self
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.directory / 'redis.log'}")
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 10 s")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class WorkerProcess:
    """``python -m workers.main`` in its own process group, its log in a file."""

    def __init__(self, preset: str, *, gpu: str = "0", env: dict[str, str], log_path: Path) -> None:
        self.preset = preset
        self.gpu = gpu
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "workers.main", "--preset", self.preset, "--gpu", self.gpu]

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            self.command(),
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.log():
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log()[-3000:]}")

    def signal(self, sig: int, whole_group: bool = True) -> None:
        if self.process and self.process.poll() is None:
            if whole_group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)

    def stop(self, grace: float = 30) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM, whole_group=False)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        # Make sure no pool child outlives its parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode


class LocalStack:
    """A Redis and N workers on this host; ``with LocalStack(...) as stack:`` stops them all."""

    def __init__(self, *, env: dict[str, str] | None = None, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fluxfleet-stack-"))
        self.env = dict(env or {})
        self.redis: RedisServer | None = None
        self.workers: list[WorkerProcess] = []

    def start_redis(self, appendonly: bool = True) -> RedisServer:
        self.redis = RedisServer(appendonly=appendonly, directory=self.workdir / "redis").start()
        self.env["FLUXFLEET_BROKER__URL"] = self.redis.url
        return self.redis

    def start_worker(self, preset: str, gpu: str = "0", extra_env: dict[str, str] | None = None) -> WorkerProcess:
        name = f"worker-{preset}-{gpu}-{len(self.workers)}.log"
        worker = WorkerProcess(preset, gpu=gpu, env={**self.env, **(extra_env or {})}, log_path=self.workdir / name)
        self.workers.append(worker.start())
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.redis:
            self.redis.stop()

    def __enter__(self) -> LocalStack:
        (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
