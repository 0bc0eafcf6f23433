"""Job state on a real redis-server: the batched outcome check agrees with the per-item one."""

from __future__ import annotations

import time
from typing import Any

import redis

from fluxfleet.jobs import JobStore, redis_client
from fluxfleet.schema import GenerationParams, ItemFailure, ItemRecord, Timings
from fluxfleet.settings import BrokerSettings
from producer.stack import RedisServer

PARAMS = GenerationParams(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=256)


def record(job_id: str, key: str) -> ItemRecord:
    return ItemRecord(
        job_id=job_id,
        index=0,
        key=key,
        image_key=f"images/{key[:2]}/{key}.png",
        location="/nowhere",
        prompt="a cat",
        seed=1,
        params=PARAMS,
        preset="tiny",
        model="m",
        worker="w",
        gpu="0",
        timings=Timings(),
        sha256="0" * 64,
        finished_at=time.time(),
    )


def test_are_finished_matches_is_finished_per_item(redis_server: RedisServer) -> None:
    jobs = JobStore(redis_client(BrokerSettings(url=redis_server.url)))
    jobs.record_done(record("j", "done"))
    jobs.record_failed(ItemFailure(job_id="j", index=1, key="failed", reason="r", finished_at=time.time()))
    jobs.record_cancelled("j", ["cancelled"])
    keys = ["done", "unknown", "failed", "cancelled", "also-unknown", "done"]

    finished = jobs.are_finished("j", keys)

    assert finished == [True, False, True, True, False, True]
    assert finished == [jobs.is_finished("j", k) for k in keys]
    assert jobs.are_finished("j", []) == []
    assert jobs.are_finished("no-such-job", ["done"]) == [False]


class CountingConnection(redis.Connection):
    """A real connection that counts its writes to the socket (a pipeline packs all its commands)."""

    writes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        super().send_packed_command(command, check_health)


def test_are_finished_is_one_round_trip(redis_server: RedisServer) -> None:
    jobs = JobStore(redis.Redis.from_url(redis_server.url, decode_responses=True, connection_class=CountingConnection))
    jobs.record_done(record("j", "done"))
    keys = [f"k{i}" for i in range(50)] + ["done"]
    CountingConnection.writes = 0

    assert jobs.are_finished("j", keys) == [False] * 50 + [True]
    assert CountingConnection.writes == 1
