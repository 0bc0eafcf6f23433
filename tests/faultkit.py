"""Shared pieces of the fault-injection suite (tests/test_faults_*.py).

Every fault test runs real processes (redis-server, workers, a moto S3 server), injects one fault,
and ends with ``check_end_state``: for every item, exactly one stored object and one manifest line,
or a failed record with its reason; nothing else.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.soak.services import DROP, FORWARD, SLOW_DOWN, Decision, FaultProxy
from fluxfleet.keys import image_key, manifest_key, record_key
from fluxfleet.settings import Settings
from fluxfleet.storage import Storage, open_storage
from producer.client import Client
from producer.stack import LocalStack, RedisServer, WorkerProcess
from tests.conftest import base_env, settings_for

# Seconds, not minutes: a whole-worker kill is recovered after VISIBILITY + about one sweep.
VISIBILITY_S = 12
FAULT_ENV = {
    "FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "FLUXFLEET_WORKER__TASK_TIME_LIMIT_S": "10",
    "FLUXFLEET_WORKER__TASK_SOFT_TIME_LIMIT_S": "9",
    "FLUXFLEET_BROKER__RESTORE_INTERVAL_S": "1",
    "FLUXFLEET_WORKER__MAX_ATTEMPTS": "2",
    "FLUXFLEET_WORKER__WARMUP": "false",
}


@contextmanager
def fault_stack(
    workdir: Path, tiny_model_dir: Path, storage_url: str | None = None, **extra_env: str
) -> Iterator[LocalStack]:
    url = storage_url or f"file://{workdir / 'store'}"
    env = {**base_env(tiny_model_dir, url), **FAULT_ENV, **extra_env}
    with LocalStack(env=env, workdir=workdir) as stack:
        yield stack


def client_for(stack: LocalStack, **overrides: str) -> Client:
    return Client(settings_for({**stack.env, **overrides}))


@dataclass
class Fleet:
    """A running fault stack: its Redis, its tiny workers (all ready) and a client for it."""

    stack: LocalStack
    redis: RedisServer
    workers: list[WorkerProcess]
    client: Client

    @property
    def worker(self) -> WorkerProcess:
        return self.workers[0]


@contextmanager
def running_fleet(
    workdir: Path,
    tiny_model_dir: Path,
    storage_url: str | None = None,
    *,
    gpus: tuple[str, ...] = ("0",),
    worker_env: dict[str, str] | None = None,
    **extra_env: str,
) -> Iterator[Fleet]:
    """``fault_stack`` with Redis (AOF on) and one tiny worker per entry of ``gpus``, ready before the
    test starts. The workers start together so their model loads overlap; ``worker_env`` is theirs only."""
    with fault_stack(workdir, tiny_model_dir, storage_url, **extra_env) as stack:
        redis = stack.start_redis()
        workers = [stack.start_worker("tiny", gpu=gpu, extra_env=worker_env) for gpu in gpus]
        for worker in workers:
            worker.wait_ready(timeout=180)
        yield Fleet(stack, redis, workers, client_for(stack))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pool_child(worker: WorkerProcess) -> int:
    """The pid of the worker's Celery pool child (the process that runs the pipeline)."""
    assert worker.process is not None
    return int(subprocess.check_output(["pgrep", "-P", str(worker.process.pid)]).split()[0])


def prompts(n: int, word: str = "") -> list[str]:
    subjects = ["a red fox", "a lighthouse", "a bowl of pears", "a sailing ship", "a snowy owl", "a stone bridge"]
    return [f"{subjects[i % len(subjects)]} {word} number {i}".replace("  ", " ") for i in range(n)]


def queue_is_idle(settings: Settings, preset: str = "tiny") -> bool:
    from fluxfleet.jobs import redis_client
    from fluxfleet.keys import queue_name

    r = redis_client(settings.broker)
    return r.llen(queue_name(preset)) == 0 and r.hlen("unacked") == 0


def check_end_state(
    client: Client,
    job_id: str,
    *,
    done: int,
    failed: int = 0,
    cancelled: int = 0,
    started_once: bool = True,
    failure_reason: str = "",
) -> dict[str, Any]:
    """Assert the promise for one job and return what was found.

    ``done`` objects and manifest lines, each line pointing at a stored object whose sha256 matches;
    ``failed`` failed records with a reason; with ``started_once``, no item's generation started twice.
    """
    storage: Storage = open_storage(client.settings.storage)
    status = client.job(job_id).status()
    records = client.jobs.records(job_id)
    failures = client.jobs.failures(job_id)
    assert (status.done, status.failed, status.cancelled) == (done, failed, cancelled), status
    assert status.finished == status.total, status
    assert len(records) == done and len({r.key for r in records}) == done
    for record in records:
        data = storage.get(image_key(record.key))
        assert hashlib.sha256(data).hexdigest() == record.sha256, record.key
        assert json.loads(storage.get(record_key(job_id, record.key)))["key"] == record.key
    manifest = storage.get(manifest_key(job_id)).decode().splitlines()
    assert [json.loads(line)["key"] for line in manifest] == [r.key for r in records]
    for failure in failures:
        assert failure.reason, failure
        assert failure_reason in failure.reason, failure.reason
        assert not storage.exists(image_key(failure.key)), "a failed item must leave no object"
    # No partial files (local storage writes temporaries named '.<name>.*' and links them).
    leftovers = [k for k in storage.list("images/") if Path(k).name.startswith(".")]
    assert not leftovers, leftovers
    starts = client.jobs.item_starts(job_id)
    if started_once:
        assert all(count == 1 for count in starts.values()), starts
    return {"status": status, "records": records, "failures": failures, "starts": starts, "manifest": manifest}


def stored_images(storage: Storage) -> list[str]:
    return sorted(k for k in storage.list("images/") if k.endswith(".png"))


class StorageProxy(FaultProxy):
    """A proxy in front of the S3 server that can fail requests: ``mode`` is 'ok', '503' (SlowDown),
    'slow' (``delay`` seconds before forwarding) or 'down' (connection closed, unanswered). Faults apply
    to PUT and HEAD requests under ``images/``; ``stored`` counts successful image PUTs by key."""

    def __init__(self, upstream: str) -> None:
        self.mode = "ok"
        self.delay = 0.0
        self.failed = 0
        super().__init__(upstream, self._decide)

    @property
    def stored(self) -> dict[str, int]:
        return self.image_puts

    def _decide(self, method: str, path: str) -> Decision:
        if method not in ("PUT", "HEAD") or "/images/" not in path or self.mode == "ok":
            return FORWARD
        if self.mode == "slow":
            time.sleep(self.delay)
            return FORWARD
        self.failed += 1
        return DROP if self.mode == "down" else SLOW_DOWN
