"""Job state in Redis: fluxfleet's own record of every job, independent of Celery's result backend.

Celery reports an unknown or expired task id as PENDING, which cannot be told apart from "queued",
so progress and outcomes live here, under ``<prefix>:job:<id>``:

- ``…``            hash: preset, model, total, state, created_at, finished_at, webhook (a URL, optional)
- ``…:tasks``      hash: task id -> task payload (to re-enqueue what went missing)
- ``…:done``       hash: item key -> manifest line (ItemRecord JSON)
- ``…:skipped``    set of the ``…:done`` keys whose stored record is a skipped one (counted without
  reading the manifest lines); written in the same script as ``…:done``
- ``…:failed``     hash: item key -> ItemFailure JSON
- ``…:cancelled``  set of item keys not generated because the job was cancelled
- ``…:starts`` / ``…:ends``  hashes: item key -> generations started / ended with the process alive;
  their difference counts worker deaths during that item, which caps a poison input
- ``…:webhook``    hash: the completion webhook's deliveries (``fluxfleet.webhooks``); ``<prefix>:webhooks``
  is the sorted set of jobs whose webhook is due, scored by the time of its next attempt

``<prefix>:rejected`` (hash: reason -> count) counts messages a worker refused to run; the newest are kept
in ``<prefix>:deadletter`` (``fluxfleet.deadletter``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from fluxfleet import deadletter
from fluxfleet.errors import BrokerUnavailable, FluxfleetError, UnknownJobError
from fluxfleet.schema import ItemFailure, ItemRecord, JobState, JobStatus, TaskPayload
from fluxfleet.settings import BrokerSettings

ATTEMPTS_TTL_S = 7 * 24 * 3600


# HSETNX the manifest line and, only if it won (the first record of the item), mark it skipped: one
# script, so a crash cannot leave the skipped count out of step with the done hash, and a redelivered
# duplicate (which loses the HSETNX) never changes it.
# KEYS: done hash, skipped set. ARGV: item key, record JSON, "1" if the record is skipped else "".
RECORD_DONE_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) end
return 1
"""

# Cancel only a job that exists and is still running, in one script: a HSET on an unknown id would create a
# half-written record, and one on a finished job would rewrite its outcome.
# KEYS: job hash. ARGV: now. Returns the state before (cancelled only if 'submitting' or 'running'),
# '' for a record without a state, nil for no job.
CANCEL_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'submitting' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
end
return state or ''
"""

# Delete every key of a job, only if its state is 'aborted' (a submit that failed half-way), in one
# script so a job that another submit has meanwhile recorded is never touched.
# KEYS: the job hash, then its other parts.
CLEAR_ABORTED_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'aborted' then return 0 end
redis.call('DEL', unpack(KEYS))
return 1
"""

# Mark a finished job completed, and only the one time that wins, queue its webhook (if it has one) for
# delivery now: one script, so a crash between the two can neither lose the notification nor send it twice.
# KEYS: job hash, its webhook hash, the pending webhooks. ARGV: job id, now.
COMPLETE_LUA = """
if redis.call('HSETNX', KEYS[1], 'completed', 1) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'queued_at', ARGV[2], 'attempts', 0)
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
end
return 1
"""

JOB_PARTS = ("", "tasks", "done", "skipped", "failed", "cancelled", "starts", "ends", "webhook")
"""Suffixes of a job's keys (see the module docstring)."""

JOB_FIELDS = ("preset", "state", "total", "created_at")
"""Fields every complete job record has (``create`` writes them in one transaction)."""

PATIENT_RETRIES = 12
"""Reconnection attempts of a worker's Redis client (exponential backoff capped at 5 s: about 45 s)."""


def redis_client(broker: BrokerSettings, *, patient: bool = False) -> redis.Redis:
    """A client for the broker's Redis with short timeouts, so an outage fails fast.

    ``patient`` (workers): reconnect with backoff through a short outage (a Redis restart) instead of
    failing the task in flight.
    """
    extra: dict[str, object] = {}
    if patient:
        extra = {
            "retry": Retry(ExponentialBackoff(cap=5.0, base=0.2), PATIENT_RETRIES),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        }
    return redis.Redis.from_url(
        broker.url_with_password(),
        socket_connect_timeout=broker.connect_timeout_s,
        socket_timeout=max(broker.connect_timeout_s, 10.0),
        decode_responses=True,
        retry_on_timeout=False,
        **broker.tls_options(),
        **extra,  # type: ignore[arg-type]
    )


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "fluxfleet") -> None:
        self.r = client
        self.prefix = prefix
        self._record_done = client.register_script(RECORD_DONE_LUA)
        self._cancel = client.register_script(CANCEL_LUA)

    @classmethod
    def from_settings(cls, broker: BrokerSettings, *, patient: bool = False) -> JobStore:
        return cls(redis_client(broker, patient=patient), broker.key_prefix)

    def _k(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{job_id}" + (f":{part}" if part else "")

    def ping(self) -> None:
        """Raise ``BrokerUnavailable`` unless Redis answers."""
        try:
            self.r.ping()
        except redis.RedisError as e:
            raise BrokerUnavailable(f"Redis is not reachable: {e}") from e

    # -- producer side -------------------------------------------------------------------------
    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self._k(job_id)))

    def create(
        self,
        *,
        job_id: str,
        preset: str,
        model: str,
        tasks: list[TaskPayload],
        encoded: dict[str, str] | None = None,
        webhook: str | None = None,
    ) -> None:
        """Record a job as 'submitting' with all its tasks, in one round trip.

        ``encoded``: each task's JSON by task id where the caller already has it (submit checks its size).
        ``webhook``: a URL (checked by ``fluxfleet.webhooks.check_webhook_url``) told when the job ends.
        """
        encoded = encoded or {}
        total = sum(len(t.items) for t in tasks)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            self._k(job_id),
            mapping={
                "preset": preset,
                "model": model,
                "total": total,
                "tasks": len(tasks),
                "state": "submitting",
                "created_at": time.time(),
                **({"webhook": webhook} if webhook else {}),
            },
        )
        for chunk_start in range(0, len(tasks), 1000):
            chunk = tasks[chunk_start : chunk_start + 1000]
            pipe.hset(
                self._k(job_id, "tasks"),
                mapping={t.task_id: encoded.get(t.task_id) or t.model_dump_json() for t in chunk},
            )
        pipe.zadd(f"{self.prefix}:jobs", {job_id: time.time()})
        pipe.execute()

    def set_state(self, job_id: str, state: JobState) -> None:
        self.r.hset(self._k(job_id), "state", state)

    def reopen(self, job_id: str) -> None:
        """Back to 'running' with its completion undone, so the next finisher completes it again."""
        pipe = self.r.pipeline()
        pipe.hset(self._k(job_id), "state", "running")
        pipe.hdel(self._k(job_id), "completed", "finished_at")
        pipe.execute()

    def restore(self, records: Iterable[ItemRecord], failures: Iterable[ItemFailure]) -> None:
        """``record_done`` and ``record_failed`` of many stored outcomes in one round trip (a job rebuilt
        from storage)."""
        pipe = self.r.pipeline(transaction=False)
        for record in records:
            # EVAL, not the registered script: a pipeline of those first checks SCRIPT EXISTS, a
            # second round trip. The body is small next to the manifest line sent with it.
            pipe.eval(RECORD_DONE_LUA, 2, *self._record_done_args(record))
        for failure in failures:
            pipe.hsetnx(self._k(failure.job_id, "failed"), failure.key, failure.model_dump_json())
        pipe.execute()

    def cancel(self, job_id: str) -> str:
        """Cancel a submitting or running job; returns its state before (a finished job is left as it is).

        Raises ``UnknownJobError`` for an id with no job, and writes nothing then.
        """
        before = self._cancel(keys=[self._k(job_id)], args=[time.time()])
        if before is None:
            raise UnknownJobError(job_id, "nothing to cancel (check the id with `fluxfleet status`)")
        if not before:
            raise FluxfleetError(self._incomplete(job_id, ["state"]))
        return cast(str, before)

    def task_payloads(self, job_id: str) -> list[TaskPayload]:
        raw = cast(dict[str, str], self.r.hgetall(self._k(job_id, "tasks")))
        return [TaskPayload.model_validate_json(v) for v in raw.values()]

    def task_payload(self, job_id: str, task_id: str) -> TaskPayload | None:
        """The task as submitted under its job, or None if the job holds no task of that id."""
        raw = cast(str | None, self.r.hget(self._k(job_id, "tasks"), task_id))
        return TaskPayload.model_validate_json(raw) if raw else None

    # -- worker side ---------------------------------------------------------------------------
    def state(self, job_id: str) -> str | None:
        return cast(str | None, self.r.hget(self._k(job_id), "state"))

    def start_attempt(self, task_id: str) -> int:
        """Count one more start of a task; the count caps retries of a poison input."""
        key = f"{self.prefix}:attempts:{task_id}"
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, ATTEMPTS_TTL_S)
        return int(pipe.execute()[0])

    def item_deaths(self, job_id: str, item_keys: list[str]) -> list[int]:
        """For each item, how many generations of it started and never ended (the process died)."""
        if not item_keys:
            return []
        pipe = self.r.pipeline()
        pipe.hmget(self._k(job_id, "starts"), item_keys)
        pipe.hmget(self._k(job_id, "ends"), item_keys)
        starts, ends = pipe.execute()
        return [int(s or 0) - int(e or 0) for s, e in zip(starts, ends, strict=True)]

    def item_starts(self, job_id: str) -> dict[str, int]:
        """Item key -> times its generation started (tests check that nothing started twice)."""
        return {k: int(v) for k, v in cast(dict[str, str], self.r.hgetall(self._k(job_id, "starts"))).items()}

    def _count_items(self, job_id: str, part: str, item_keys: list[str]) -> None:
        pipe = self.r.pipeline()
        for key in item_keys:
            pipe.hincrby(self._k(job_id, part), key, 1)
        pipe.expire(self._k(job_id, part), ATTEMPTS_TTL_S)
        pipe.execute()

    def start_items(self, job_id: str, item_keys: list[str]) -> None:
        """Count a generation of these items as started (before the pipeline call)."""
        self._count_items(job_id, "starts", item_keys)

    def end_items(self, job_id: str, item_keys: list[str]) -> None:
        """Count a generation of these items as ended with the process alive (success or exception)."""
        self._count_items(job_id, "ends", item_keys)

    def count_rejected(self, reason: str, *, queue: str = "", raw: bytes | str = b"", detail: str = "") -> None:
        """Count a message a worker refused and keep it in the dead-letter list (``fluxfleet.deadletter``)."""
        deadletter.refuse(self.r, self.prefix, reason=reason, queue=queue, raw=raw, detail=detail)

    def rejected(self) -> dict[str, int]:
        return {k: int(v) for k, v in cast(dict[str, str], self.r.hgetall(f"{self.prefix}:rejected")).items()}

    def is_finished(self, job_id: str, item_key: str) -> bool:
        return self.are_finished(job_id, [item_key])[0]

    def are_finished(self, job_id: str, item_keys: list[str]) -> list[bool]:
        """For each item, whether it has an outcome (done, failed or cancelled), in one round trip."""
        if not item_keys:
            return []
        # HEXISTS rather than HMGET: the done hash holds whole manifest lines, not worth fetching.
        # SISMEMBER rather than SMISMEMBER: the same single round trip, and no Redis >= 6.2 needed.
        pipe = self.r.pipeline(transaction=False)
        for key in item_keys:
            pipe.hexists(self._k(job_id, "done"), key)
            pipe.hexists(self._k(job_id, "failed"), key)
            pipe.sismember(self._k(job_id, "cancelled"), key)
        flags = pipe.execute()
        return [any(flags[i : i + 3]) for i in range(0, len(flags), 3)]

    def _record_done_args(self, record: ItemRecord) -> list[str]:
        """KEYS then ARGV of ``RECORD_DONE_LUA`` for one record."""
        done, skipped = self._k(record.job_id, "done"), self._k(record.job_id, "skipped")
        return [done, skipped, record.key, record.model_dump_json(), "1" if record.skipped else ""]

    def record_done(self, record: ItemRecord) -> bool:
        """Store a manifest line once; False if this item was already recorded."""
        args = self._record_done_args(record)
        return bool(self._record_done(keys=args[:2], args=args[2:]))

    def record_failed(self, failure: ItemFailure) -> None:
        self.record_failures([failure])

    def record_failures(self, failures: Iterable[ItemFailure]) -> None:
        """Record failed items in one round trip; an item's first failure stays (HSETNX)."""
        pipe = self.r.pipeline(transaction=False)
        for failure in failures:
            pipe.hsetnx(self._k(failure.job_id, "failed"), failure.key, failure.model_dump_json())
        pipe.execute()

    def clear_aborted(self, job_id: str) -> bool:
        """Delete an aborted job's records so its id can be submitted again; False (and nothing
        deleted) unless the job's state is 'aborted'."""
        keys = [self._k(job_id, part) for part in JOB_PARTS]
        return bool(self.r.eval(CLEAR_ABORTED_LUA, len(keys), *keys))

    def record_cancelled(self, job_id: str, item_keys: Iterable[str]) -> None:
        keys = list(item_keys)
        if keys:
            self.r.sadd(self._k(job_id, "cancelled"), *keys)

    def finish_if_complete(self, job_id: str) -> bool:
        """Mark the job done once every item has an outcome; True the first time that happens.

        A cancelled job stays 'cancelled', but still completes once its running items have ended, so
        its manifest lists the images that were made.
        """
        status = self.status(job_id)
        if status is None or status.finished < status.total:
            return False
        if status.state in ("running", "submitting"):
            state: JobState = "failed" if status.failed == status.total else "done"
            pipe = self.r.pipeline()
            pipe.hsetnx(self._k(job_id), "finished_at", time.time())
            pipe.hset(self._k(job_id), "state", state)
            pipe.eval(COMPLETE_LUA, 3, *self.webhook_keys(job_id), job_id, time.time())
            return bool(pipe.execute()[2])
        if status.state == "cancelled":
            return bool(self.r.eval(COMPLETE_LUA, 3, *self.webhook_keys(job_id), job_id, time.time()))
        return False

    def webhook_keys(self, job_id: str) -> tuple[str, str, str]:
        """The job's hash, its webhook deliveries' hash, and the sorted set of due webhooks (all jobs')."""
        return self._k(job_id), self._k(job_id, "webhook"), f"{self.prefix}:webhooks"

    # -- both ----------------------------------------------------------------------------------
    def records(self, job_id: str) -> list[ItemRecord]:
        raw = cast(dict[str, str], self.r.hgetall(self._k(job_id, "done")))
        return sorted((ItemRecord.model_validate_json(v) for v in raw.values()), key=lambda r: r.index)

    def failures(self, job_id: str) -> list[ItemFailure]:
        raw = cast(dict[str, str], self.r.hgetall(self._k(job_id, "failed")))
        return sorted((ItemFailure.model_validate_json(v) for v in raw.values()), key=lambda f: f.index)

    def status(self, job_id: str) -> JobStatus | None:
        return self.statuses([job_id])[0]

    def statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        """``status`` of each job, in one round trip."""
        pipe = self.r.pipeline()
        for job_id in job_ids:
            pipe.hgetall(self._k(job_id))
            # Counts only: the done hash holds whole manifest lines (megabytes for a large job).
            pipe.hlen(self._k(job_id, "done"))
            pipe.scard(self._k(job_id, "skipped"))
            pipe.hlen(self._k(job_id, "failed"))
            pipe.scard(self._k(job_id, "cancelled"))
        replies = pipe.execute()
        return [self._status(job_id, *replies[5 * n : 5 * n + 5]) for n, job_id in enumerate(job_ids)]

    def _incomplete(self, job_id: str, missing: list[str]) -> str:
        return (
            f"job '{job_id}' has an incomplete record in Redis ({self._k(job_id)} lacks "
            f"{', '.join(repr(f) for f in missing)}): it was never fully submitted; delete that key, "
            "or submit under another --job-id"
        )

    def _status(
        self, job_id: str, meta: dict[str, str], done: int, skipped: int, failed: int, cancelled: int
    ) -> JobStatus | None:
        """Raises ``FluxfleetError`` for a record without the fields ``create`` writes (never KeyError)."""
        if not meta:
            return None
        missing = [f for f in JOB_FIELDS if f not in meta]
        if missing:
            raise FluxfleetError(self._incomplete(job_id, missing))
        finished_at = meta.get("finished_at")
        return JobStatus(
            job_id=job_id,
            preset=meta["preset"],
            state=meta["state"],
            total=int(meta["total"]),
            done=int(done),
            skipped=int(skipped),
            failed=int(failed),
            cancelled=int(cancelled),
            created_at=float(meta["created_at"]),
            finished_at=float(finished_at) if finished_at else None,
        )
