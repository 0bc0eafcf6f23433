"""The faults of the soak, drawn from a seed: when each happens, what it does, and how it is healed."""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from benchmarks.soak.fleet import Fleet
from benchmarks.soak.services import ChaosProxy, S3Server, Tmpfs
from producer.stack import RedisServer

logger = logging.getLogger(__name__)

REDIS_DOWN_S = 2.0
"""Seconds between Redis's SIGKILL and its restart from the append-only file."""


def envelope(queue: str, task: str, body: Any, content_type: str = "application/json") -> bytes:
    """A message as kombu's Redis transport stores it, with any task name, body and content type."""
    task_id = str(uuid.uuid4())
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return json.dumps(
        {
            "body": base64.b64encode(raw).decode(),
            "content-encoding": "utf-8" if content_type == "application/json" else "binary",
            "content-type": content_type,
            "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0},
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


def junk_messages(queue: str) -> list[bytes]:
    """Bytes no producer of fluxfleet sends: not JSON, JSON that is no envelope, an envelope without
    properties, and well-formed envelopes with a wrong body, an unknown task, or pickle."""
    return [
        b"not json",
        b"[1,2,3]",
        b"12345",
        b"\xff\xfe\x00 binary",
        b"{}",
        json.dumps({"body": "", "headers": {}}).encode(),
        envelope(queue, "fluxfleet.generate", [[{"job_id": "x"}], {}, {}]),
        envelope(queue, "fluxfleet.generate", [[], {}, {}]),
        envelope(queue, "fluxfleet.no-such-task", [[], {}, {}]),
        envelope(queue, "fluxfleet.generate", b"\x80\x04K\x01.", "application/x-python-serialize"),
    ]


@dataclass
class Event:
    at: float
    kind: str
    duration: float = 0.0
    target: str = ""


BLOCKING = {"s3_outage": 1.0, "redis_restart": REDIS_DOWN_S + 1.0}
"""Faults during which a job is not submitted (the producer's own failures are other tests' subject),
with the seconds of margin after their end."""


@dataclass
class Plan:
    """How many of each fault, inside a window of ``window_s`` seconds after the jobs are submitted."""

    window_s: float
    worker_kills: int = 2
    child_kills: int = 4
    redis_restarts: int = 1
    s3_outages: int = 1
    outage_s: float = 8.0
    bursts_503: int = 2
    burst_s: float = 6.0
    burst_share: float = 0.5
    junk_bursts: int = 2
    disk_full: int = 1
    disk_full_s: float = 8.0

    submit_span: float = 0.6
    """Share of the window over which the jobs are submitted, so work is queued while faults happen."""

    def events(self, rng: random.Random, jobs: list[str] | None = None) -> list[Event]:
        """The faults at random times, and ``jobs`` submitted at even times from 0 s, outside S3 outages and
        Redis restarts; a job named ``disk-…`` 2 s before the first full-disk spell, one named ``cancel-…``
        right after the job before it and cancelled 0.5 s later."""
        faults = self._faults(rng)
        blocked = [(e.at - 1.0, e.at + e.duration + BLOCKING[e.kind]) for e in faults if e.kind in BLOCKING]
        disk = [(e.at - 1.0, e.at + e.duration + 1.0) for e in faults if e.kind == "disk_full"]
        events = list(faults)
        spread = [job for job in jobs or [] if not job.startswith(("disk", "cancel"))]
        step = self.window_s * self.submit_span / max(1, len(spread) - 1)
        at = 0.0
        for job in jobs or []:
            if job.startswith("cancel"):
                at += 0.2  # right behind the previous job: its tasks wait in the queue when it is cancelled
            elif job.startswith("disk"):
                at = max(0.0, disk[0][0] - 2.0) if disk else 0.0  # the first spell meets its writes
            else:
                at = spread.index(job) * step
            for lo, hi in sorted(blocked + (disk[1:] if job.startswith("disk") else [])):
                if lo <= at <= hi:
                    at = hi
            events.append(Event(round(at, 1), "submit", target=job))
            if job.startswith("cancel"):
                events.append(Event(round(at + 0.5, 1), "cancel", target=job))
        return sorted(events, key=lambda e: e.at)

    def _faults(self, rng: random.Random) -> list[Event]:
        w = self.window_s

        def at(lo: float, hi: float) -> float:
            return round(rng.uniform(lo * w, hi * w), 1)

        events = [Event(at(0.05, 0.6), "worker_kill") for _ in range(self.worker_kills)]
        events += [Event(at(0.02, 0.95), "child_kill") for _ in range(self.child_kills)]
        events += [Event(at(0.3, 0.7), "redis_restart") for _ in range(self.redis_restarts)]
        events += [Event(at(0.1, 0.5), "s3_outage", self.outage_s) for _ in range(self.s3_outages)]
        events += [Event(at(0.05, 0.9), "s3_503_burst", self.burst_s) for _ in range(self.bursts_503)]
        events += [Event(at(0.02, 0.9), "junk_messages") for _ in range(self.junk_bursts)]
        events += [Event(at(0.1, 0.3), "disk_full", self.disk_full_s) for _ in range(self.disk_full)]
        return events


@dataclass
class Chaos:
    """Runs a plan's events against the services on a background thread; ``heal`` ends every fault."""

    fleets: list[Fleet]
    redis_server: RedisServer
    s3: S3Server
    proxy: ChaosProxy
    disk: Tmpfs
    queues: list[str]
    rng: random.Random
    burst_share: float = 0.5
    on_job: Callable[[str, str], str] | None = None
    """Called with ("submit" or "cancel", job id); returns what happened."""
    log: list[dict[str, Any]] = field(default_factory=list)
    junk_pushed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _pick_fleet(self) -> Fleet:
        return self.rng.choices(self.fleets, weights=[f.count for f in self.fleets])[0]

    def _actions(self, event: Event) -> list[tuple[float, str, Callable[[], str]]]:
        start, end = event.at, event.at + event.duration
        kind = event.kind
        if kind in ("submit", "cancel"):
            assert self.on_job is not None
            return [(start, kind, lambda: self.on_job(kind, event.target))]  # type: ignore[misc]
        if kind == "worker_kill":
            return [(start, kind, lambda: self._pick_fleet().kill_worker(self.rng))]
        if kind == "child_kill":
            return [(start, kind, lambda: self._pick_fleet().kill_pool_child(self.rng))]
        if kind == "redis_restart":
            return [(start, kind, self.restart_redis)]
        if kind == "s3_outage":
            return [(start, kind, self.s3_down), (end, f"{kind} end", self.s3_up)]
        if kind == "s3_503_burst":
            return [(start, kind, self.burst_start), (end, f"{kind} end", self.burst_end)]
        if kind == "junk_messages":
            return [(start, kind, self.push_junk)]
        if kind == "disk_full":
            return [(start, kind, self.fill_disk), (end, f"{kind} end", self.free_disk)]
        raise ValueError(f"unknown fault kind '{kind}'")

    def restart_redis(self) -> str:
        self.redis_server.kill()
        time.sleep(REDIS_DOWN_S)
        self.redis_server.start()  # same port and directory: it replays its append-only file
        return f"SIGKILL, restarted after {REDIS_DOWN_S} s from the append-only file"

    def s3_down(self) -> str:
        self.s3.stop()
        return "S3 server stopped (connections refused)"

    def s3_up(self) -> str:
        if not self.s3.up:
            self.s3.start()
        return "S3 server serving again"

    def burst_start(self) -> str:
        self.proxy.burst_share = self.burst_share
        return f"{self.burst_share:.0%} of S3 requests answered 503 SlowDown"

    def burst_end(self) -> str:
        self.proxy.burst_share = 0.0
        return f"503s so far: {self.proxy.answered_503}"

    def push_junk(self) -> str:
        client = redis.Redis(port=self.redis_server.port, socket_connect_timeout=2)
        pushed = 0
        for queue in self.queues:
            for n, body in enumerate(junk_messages(queue)):
                # RPUSH: taken next (kombu pops from the right); LPUSH: behind the queued work.
                (client.rpush if n % 2 == 0 else client.lpush)(queue, body)
                pushed += 1
        self.junk_pushed += pushed
        return f"{pushed} junk messages on {', '.join(self.queues)}"

    def fill_disk(self) -> str:
        written = self.disk.fill()
        return f"filler of {written // 1024} KiB; {self.disk.free_bytes()} bytes free"

    def free_disk(self) -> str:
        self.disk.free()
        return f"filler deleted; {self.disk.free_bytes() // 1024} KiB free"

    def heal(self) -> None:
        """End every fault still in effect (also when the run stops early)."""
        self.proxy.burst_share = 0.0
        self.disk.free()
        if not self.s3.up:
            self.s3.start()

    def run(self, events: list[Event], t0: float) -> None:
        actions = sorted((a for e in events for a in self._actions(e)), key=lambda a: a[0])

        def loop() -> None:
            for at, kind, action in actions:
                if self._stop.wait(max(0.0, t0 + at - time.monotonic())):
                    return
                try:
                    detail = action()
                except Exception as e:  # a fault that could not be injected is recorded, not fatal
                    detail = f"not injected: {type(e).__name__}: {e}"
                self.log.append({"t_s": round(time.monotonic() - t0, 1), "fault": kind, "detail": detail})
                logger.info("t=%.1f s %s: %s", time.monotonic() - t0, kind, detail)

        self._thread = threading.Thread(target=loop, name="chaos", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        self.heal()

    def injected(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.log:
            fault, detail = entry["fault"], entry["detail"]
            if (
                fault not in ("submit", "cancel")
                and not fault.endswith(" end")
                and not detail.startswith(("not ", "no "))
            ):
                counts[entry["fault"]] = counts.get(entry["fault"], 0) + 1
        return counts
