"""Job state on a real redis-server: batched outcome checks and writes agree with the per-item ones."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import redis

from fluxfleet.jobs import JobStore, redis_client
from fluxfleet.schema import GenerationParams, ItemFailure, ItemRecord, Timings
from fluxfleet.settings import BrokerSettings
from producer.stack import RedisServer

PARAMS = GenerationParams(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=256)


def record(job_id: str, key: str, *, skipped: bool = False, index: int = 0) -> ItemRecord:
    return ItemRecord(
        job_id=job_id,
        index=index,
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
        skipped=skipped,
        finished_at=time.time(),
    )


def make_job(jobs: JobStore, job_id: str, total: int) -> None:
    jobs.create(job_id=job_id, preset="tiny", model="m", tasks=[])
    jobs.r.hset(jobs._k(job_id), "total", total)


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


def test_skipped_count_follows_the_stored_record(redis_server: RedisServer) -> None:
    jobs = JobStore(redis_client(BrokerSettings(url=redis_server.url)))
    make_job(jobs, "j", 2)

    assert jobs.record_done(record("j", "a", skipped=True)) is True
    assert jobs.record_done(record("j", "a", skipped=False)) is False  # a redelivery: the first wins
    assert jobs.record_done(record("j", "b", skipped=False)) is True
    assert jobs.record_done(record("j", "b", skipped=True)) is False

    status = jobs.status("j")
    assert status is not None
    assert (status.done, status.skipped) == (2, 1)
    stored = {r.key: r.skipped for r in jobs.records("j")}
    assert stored == {"a": True, "b": False}


def test_restore_counts_skipped_like_record_done(redis_server: RedisServer) -> None:
    jobs = JobStore(redis_client(BrokerSettings(url=redis_server.url)))
    make_job(jobs, "j", 4)
    jobs.record_done(record("j", "a", skipped=False))  # already recorded: restore must not change it

    jobs.restore(
        [
            record("j", "a", skipped=True),
            record("j", "b", skipped=True),
            record("j", "b", skipped=False),
            record("j", "c", skipped=False),
            record("j", "d", skipped=True),
        ],
        [],
    )
    jobs.restore([record("j", "b", skipped=False), record("j", "c", skipped=True)], [])  # rebuilt twice

    status = jobs.status("j")
    assert status is not None
    assert (status.done, status.skipped) == (4, 2)
    assert {r.key for r in jobs.records("j") if r.skipped} == {"b", "d"}


def test_restore_is_one_round_trip(redis_server: RedisServer) -> None:
    jobs = JobStore(redis.Redis.from_url(redis_server.url, decode_responses=True, connection_class=CountingConnection))
    failure = ItemFailure(job_id="j", index=9, key="f", reason="r", finished_at=time.time())
    jobs.ping()  # connect first: a new connection sends its own handshake commands
    CountingConnection.writes = 0

    jobs.restore([record("j", f"k{i}", skipped=i % 2 == 0) for i in range(50)], [failure])

    assert CountingConnection.writes == 1
    assert jobs.r.scard(jobs._k("j", "skipped")) == 25


class RecordingConnection(redis.Connection):
    """A real connection that keeps the bytes it sends."""

    sent: ClassVar[list[bytes]] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, (bytes, str)) else command
        RecordingConnection.sent.extend(bytes(c, "utf-8") if isinstance(c, str) else bytes(c) for c in chunks)
        super().send_packed_command(command, check_health)


def test_status_counts_without_reading_the_manifest_lines(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True, connection_class=RecordingConnection)
    jobs = JobStore(client)
    make_job(jobs, "big", 600)
    records = [record("big", f"k{i}", index=i, skipped=i < 123) for i in range(500)]
    jobs.restore(records[:250], [])
    for r in records[250:]:
        jobs.record_done(r)
    jobs.restore(records, [])  # duplicates change nothing
    RecordingConnection.sent = []

    [status, missing] = jobs.statuses(["big", "no-such-job"])

    assert missing is None
    assert status is not None
    assert (status.total, status.done, status.skipped, status.failed) == (600, 500, 123, 0)
    sent = b"".join(RecordingConnection.sent).upper()
    assert b"HVALS" not in sent and b"HGETALL" in sent and b"SCARD" in sent
