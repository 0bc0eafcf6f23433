"""Tiny workers under a supervisor: a killed worker is started again (as a container runtime would), and
a worker that exits without having been killed is counted, with its exit code and the end of its log."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from producer.stack import READY_LINE, WorkerProcess

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
"""Seconds between a worker's death and its replacement's start."""

START_REFUSED = 2
START_REFUSED_LINE = "worker refuses to start"
"""Exit code and log line of a worker that refused to start (``workers.main``)."""


@dataclass
class Slot:
    """One worker position; ``incarnations`` counts how often it was started."""

    label: str
    worker: WorkerProcess | None = None
    killed: bool = False
    incarnations: int = 0
    died_at: float | None = None


@dataclass
class Fleet:
    """``count`` workers of ``preset``; ``supervise`` restarts the dead ones until ``close``."""

    preset: str
    count: int
    env: dict[str, str]
    workdir: Path
    slots: list[Slot] = field(default_factory=list)
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    start_refusals: list[dict[str, Any]] = field(default_factory=list)
    worker_kills: int = 0
    child_kills: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _start(self, slot: Slot) -> None:
        slot.incarnations += 1
        log = self.workdir / f"worker-{self.preset}-{slot.label}-{slot.incarnations}.log"
        slot.worker = WorkerProcess(self.preset, gpu=slot.label, env=self.env, log_path=log).start()
        slot.killed, slot.died_at = False, None

    def launch(self) -> Fleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.slots = [Slot(label=str(n)) for n in range(self.count)]
        for slot in self.slots:
            self._start(slot)
        return self

    def wait_ready(self, ready_timeout: float = 300) -> Fleet:
        """Wait until every worker has loaded its pipeline, then supervise them."""
        for slot in self.slots:
            assert slot.worker is not None
            slot.worker.wait_ready(timeout=ready_timeout)
        self._thread = threading.Thread(target=self._supervise, name=f"supervise-{self.preset}", daemon=True)
        self._thread.start()
        return self

    def _supervise(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                for slot in self.slots:
                    process = slot.worker.process if slot.worker else None
                    if process is None or process.poll() is None:
                        continue
                    if slot.died_at is None:
                        slot.died_at = time.monotonic()
                        if not slot.killed:
                            self._count_unexpected(slot)
                    if time.monotonic() - slot.died_at >= RESTART_DELAY_S:
                        self._reap(slot)
                        self._start(slot)

    def _count_unexpected(self, slot: Slot) -> None:
        assert slot.worker is not None and slot.worker.process is not None
        tail = slot.worker.log().strip().splitlines()[-12:]
        exit = {"worker": f"{self.preset}/{slot.label}", "exit_code": slot.worker.process.returncode, "log_tail": tail}
        if exit["exit_code"] == START_REFUSED and any(START_REFUSED_LINE in line for line in tail):
            # Its documented refusal (storage or Redis down while it starts): the supervisor tries again.
            self.start_refusals.append({**exit, "log_tail": tail[-1:]})
            return
        logger.warning("worker %s/%s exited on its own with %s", self.preset, slot.label, exit["exit_code"])
        self.unexpected_exits.append(exit)

    @staticmethod
    def _reap(slot: Slot) -> None:
        """No process of a dead worker's group may outlive it (its pool child, orphaned)."""
        if slot.worker and slot.worker.process:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(slot.worker.process.pid, signal.SIGKILL)

    def _live(self) -> list[Slot]:
        return [s for s in self.slots if s.worker and s.worker.process and s.worker.process.poll() is None]

    def kill_worker(self, rng: random.Random) -> str:
        """SIGKILL a random live worker with its pool child (the whole process group), as a lost host."""
        with self._lock:
            live = self._live()
            if not live:
                return "no live worker"
            slot = rng.choice(live)
            assert slot.worker is not None and slot.worker.process is not None
            slot.killed = True
            pid = slot.worker.process.pid
            os.killpg(pid, signal.SIGKILL)
            self.worker_kills += 1
            return f"worker {self.preset}/{slot.label} (pid {pid})"

    def kill_pool_child(self, rng: random.Random) -> str:
        """SIGKILL the pool child of a random live worker (the OOM killer's way); Celery replaces it.
        Children are found from the pids started here, never by name."""
        with self._lock:
            candidates = []
            for slot in self._live():
                assert slot.worker is not None and slot.worker.process is not None
                with contextlib.suppress(psutil.Error):
                    children = psutil.Process(slot.worker.process.pid).children()
                    candidates += [(slot, child.pid) for child in children]
            if not candidates:
                return "no pool child"
            slot, pid = rng.choice(candidates)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.child_kills += 1
            return f"pool child of {self.preset}/{slot.label} (pid {pid})"

    def pool_starts(self) -> int:
        """Pool children that loaded the pipeline, over every incarnation (from the workers' logs)."""
        return sum(
            p.read_text(errors="replace").count(READY_LINE) for p in self.workdir.glob(f"worker-{self.preset}-*")
        )

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            for slot in self.slots:  # all at once: each finishes its task while the others do
                if slot.worker:
                    slot.worker.signal(signal.SIGTERM, whole_group=False)
            for slot in self.slots:
                if slot.worker:
                    slot.worker.stop(grace=20)
