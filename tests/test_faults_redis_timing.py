"""Redis killed and restarted at two awkward moments: while a worker starts, and while a task publishes its
retry. Neither may stop the worker or lose the task.

1. Celery checks, when its consumer first reaches the broker, that no pool process has exited since the
   pool started, and stops the worker with exit code 1 ("Could not start worker processes") if one has. A
   worker that starts while Redis restarts retries that first connection for seconds; a pool child lost
   meanwhile (the OOM killer, a crash while the model loads) must be replaced, as at any later time.
2. A task that hits a transient storage error publishes its retry; when Redis is down at that moment,
   Celery rejects the task without requeueing it, and the worker acknowledges it once Redis is back: the
   task is gone and its items never get an outcome. It must go back to the queue instead.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from benchmarks.soak.services import FORWARD, SLOW_DOWN, Decision, FaultProxy
from producer.stack import RedisServer, WorkerProcess
from tests.conftest import s3_env
from tests.faultkit import (
    VISIBILITY_S,
    check_end_state,
    client_for,
    fault_stack,
    pool_child,
    prompts,
    running_fleet,
    wait_for,
)

pytestmark = pytest.mark.faults


def pings(client: redis.Redis) -> int:
    """PING commands Redis has answered (the worker's start-up check is one)."""
    return int(client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))


def start_then_kill_redis(redis_server: RedisServer, start: Callable[[], WorkerProcess]) -> WorkerProcess:
    """Start a worker and SIGKILL Redis as soon as it has answered the worker's start-up check, seconds
    before the worker (importing torch meanwhile) starts Celery."""
    watcher = redis.Redis(port=redis_server.port)
    before = pings(watcher)
    worker = start()
    wait_for(lambda: pings(watcher) > before, 60, "the worker's start-up check of Redis", 0.01)
    redis_server.kill()
    return worker


def alive(worker: WorkerProcess) -> WorkerProcess:
    assert worker.process is not None
    code = worker.process.poll()
    assert code is None, f"the worker exited with {code}:\n{worker.log()[-3000:]}"
    return worker


def new_pool_child(worker: WorkerProcess, lost: int, ready_lines: int) -> bool:
    """Whether another pool child than ``lost`` has loaded the pipeline."""
    if alive(worker).log().count("worker ready") <= ready_lines:
        return False
    return pool_child(worker) != lost


def test_pool_child_lost_before_the_first_broker_connection_is_replaced(tmp_path: Path, tiny_model_dir: Path) -> None:
    with fault_stack(tmp_path, tiny_model_dir) as stack:
        redis_server = stack.start_redis()
        # Given a worker whose start-up check found Redis up, and Redis down when Celery connects,
        worker = start_then_kill_redis(redis_server, lambda: stack.start_worker("tiny"))
        wait_for(lambda: "Cannot connect to" in alive(worker).log(), 60, "Celery to retry its first connection")
        # when its pool child is SIGKILLed (the OOM killer) while Celery still waits for Redis,
        lost = pool_child(worker)
        ready_lines = worker.log().count("worker ready")
        os.kill(lost, signal.SIGKILL)
        redis_server.start()  # same port, same directory
        # then the worker reaches Redis, starts another pool child and serves a job.
        wait_for(lambda: new_pool_child(worker, lost, ready_lines), 120, "a new pool child")
        client = client_for(stack)
        job = client.submit(prompts(4), preset="tiny", job_id="after-lost-child")
        assert job.wait(timeout=90).state == "done", worker.log()[-3000:]
        check_end_state(client, job.id, done=4)
        assert "Could not start worker processes" not in alive(worker).log()
        assert worker.stop() == 0


class FailingUploads(FaultProxy):
    """A proxy in front of the S3 server that holds the first image upload until ``release`` and then
    answers 503 SlowDown to every image upload until ``recover``; everything else is forwarded."""

    def __init__(self, upstream: str) -> None:
        self.first_upload = threading.Event()
        self._released = threading.Event()
        self.failing = True
        super().__init__(upstream, self._decide)

    def _decide(self, method: str, path: str) -> Decision:
        if method != "PUT" or "/images/" not in path or not self.failing:
            return FORWARD
        if not self.first_upload.is_set():
            self.first_upload.set()
            self._released.wait(60)
        return SLOW_DOWN

    def release(self) -> None:
        self._released.set()

    def recover(self) -> None:
        self.failing = False

    def close(self) -> None:
        self._released.set()
        super().close()


@pytest.fixture
def failing_uploads(s3_endpoint: str) -> Iterator[FailingUploads]:
    proxy = FailingUploads(s3_endpoint)
    yield proxy
    proxy.close()


def test_retry_published_while_redis_is_down_is_not_lost(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: str, failing_uploads: FailingUploads
) -> None:
    storage = {**s3_env(failing_uploads.url), "FLUXFLEET_STORAGE__MAX_ATTEMPTS": "1"}  # fail fast
    with running_fleet(tmp_path, tiny_model_dir, f"s3://{s3_bucket}/fleet", **storage) as fleet:
        # Given a task whose uploads fail with 503 SlowDown while Redis is down, so that its retry
        # cannot be published,
        job = fleet.client.submit(prompts(4), preset="tiny", job_id="unpublished-retry")
        assert failing_uploads.first_upload.wait(60), fleet.worker.log()[-3000:]
        fleet.redis.kill()
        failing_uploads.release()
        wait_for(lambda: "reject requeue" in fleet.worker.log(), 30, "the task to give up its retry")
        # when Redis comes back (from its append-only file) and storage recovers,
        fleet.redis.start()
        failing_uploads.recover()
        # then the task runs again and its job completes, each item stored once.
        status = job.wait(timeout=VISIBILITY_S + 60)
        assert status.state == "done", (status, fleet.worker.log()[-3000:])
        check_end_state(fleet.client, job.id, done=4, started_once=False)
        assert alive(fleet.worker).stop() == 0
