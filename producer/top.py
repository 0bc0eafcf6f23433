"""``fluxfleet top``: a live view of the fleet from the workers' metrics endpoints and Redis.

No Prometheus needed: workers advertise their endpoint in Redis (``workers/metrics.py``), queues
are read the way ``fluxfleet exporter`` reads them, jobs from fluxfleet's own records. Rates
(images per minute, seconds per image) are differences between two successive refreshes.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from rich.console import Group
from rich.table import Table

from fluxfleet import metric_names as m
from fluxfleet.jobs import JobStore
from fluxfleet.settings import Settings
from producer.exporter import QueueReader, QueueStats, default_queues

SCRAPE_TIMEOUT_S = 2.0


@dataclass
class WorkerView:
    url: str
    worker: str = "?"
    state: str = "down"
    preset: str = "?"
    gpu: str = "?"
    generated: float = 0.0
    failed: float = 0.0
    retries: float = 0.0
    images_per_min: float | None = None
    last_s_per_image: float | None = None
    memory_bytes: float | None = None
    peak_bytes: float | None = None
    error: str = ""
    _seconds_sum: float = field(default=0.0, repr=False)


@dataclass
class JobView:
    job_id: str
    preset: str
    state: str
    finished: int
    total: int
    failed: int


@dataclass
class Snapshot:
    at: float
    workers: list[WorkerView]
    queues: list[QueueStats]
    jobs: list[JobView]

    def as_dict(self) -> dict[str, Any]:
        workers = [{k: v for k, v in asdict(w).items() if not k.startswith("_")} for w in self.workers]
        return {"at": self.at, "workers": workers, "queues": [asdict(q) for q in self.queues],
                "jobs": [asdict(j) for j in self.jobs]}  # fmt: skip


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name from a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == w for k, w in match.items()))


def read_worker(url: str, previous: WorkerView | None, elapsed_s: float) -> WorkerView:
    view = WorkerView(url=url)
    try:
        samples = scrape(url)
    except (OSError, ValueError) as e:
        view.error = str(getattr(e, "reason", e))
        return view
    ready = samples.get(m.WORKER_READY.name, [])
    if ready:
        labels = ready[0][0]
        view.worker, view.preset, view.gpu = (
            labels.get("worker", "?"),
            labels.get("preset", "?"),
            labels.get("gpu", "?"),
        )
        view.state = "ready" if max(v for _, v in ready) >= 1 else "loading"
    view.generated = _total(samples, m.IMAGES.name, outcome="generated")
    view.failed = _total(samples, m.IMAGES.name, outcome="failed")
    view.retries = _total(samples, m.TASK_RETRIES.name)
    view._seconds_sum = _total(samples, m.IMAGE_SECONDS.name + "_sum")
    view.memory_bytes = _total(samples, m.MEMORY_ALLOCATED.name) or None
    view.peak_bytes = _total(samples, m.MEMORY_PEAK.name) or None
    if previous is not None and elapsed_s > 0:
        done = view.generated - previous.generated
        view.images_per_min = max(done, 0.0) * 60 / elapsed_s
        if done > 0:
            view.last_s_per_image = (view._seconds_sum - previous._seconds_sum) / done
        else:
            view.last_s_per_image = previous.last_s_per_image
    elif view.generated:
        view.last_s_per_image = view._seconds_sum / view.generated
    return view


class Fleet:
    """Reads snapshots; keeps the previous one to turn counters into rates."""

    def __init__(self, settings: Settings, extra_urls: list[str] | None = None, jobs: int = 5) -> None:
        self.store = JobStore.from_settings(settings.broker)
        self.reader = QueueReader(self.store.r, default_queues(settings))
        self.prefix = settings.broker.key_prefix
        self.extra_urls = extra_urls or []
        self.job_count = jobs
        self.previous: dict[str, WorkerView] = {}
        self.previous_at = 0.0

    def endpoints(self) -> list[str]:
        advertised = cast(dict[str, str], self.store.r.hgetall(m.endpoints_key(self.prefix)))
        return sorted(set(advertised.values()) | set(self.extra_urls))

    def recent_jobs(self) -> list[JobView]:
        ids = cast(list[str], self.store.r.zrevrange(f"{self.prefix}:jobs", 0, self.job_count - 1))
        return [
            JobView(s.job_id, s.preset, s.state, s.finished, s.total, s.failed)
            for s in self.store.statuses(ids)  # one round trip for every job
            if s is not None
        ]

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        elapsed = now - self.previous_at if self.previous_at else 0.0
        workers = [read_worker(url, self.previous.get(url), elapsed) for url in self.endpoints()]
        self.previous = {w.url: w for w in workers}
        self.previous_at = now
        return Snapshot(time.time(), workers, self.reader.read(), self.recent_jobs())


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(snapshot: Snapshot) -> Group:
    workers = Table("worker", "state", "preset", "gpu", "img/min", "s/img", "images", "failed", "memory", "peak",
                    title="workers", title_justify="left", expand=True)  # fmt: skip
    colour = {"ready": "green", "loading": "yellow", "down": "red"}
    for w in snapshot.workers:
        workers.add_row(
            w.worker if w.worker != "?" else w.url,
            f"[{colour[w.state]}]{w.state}[/]" + (f" ({w.error})" if w.error else ""),
            w.preset,
            w.gpu,
            _num(w.images_per_min, ".1f"),
            _num(w.last_s_per_image, ".2f"),
            f"{w.generated:.0f}",
            f"{w.failed:.0f}",
            _bytes(w.memory_bytes),
            _bytes(w.peak_bytes),
        )
    queues = Table("queue", "waiting", "unacked", "oldest unacked", title="queues", title_justify="left", expand=True)
    for q in snapshot.queues:
        queues.add_row(
            q.queue, str(q.messages), str(q.unacked), f"{q.oldest_unacked_age_s:.0f} s" if q.unacked else "-"
        )
    jobs = Table("job", "preset", "state", "progress", "failed", title="recent jobs", title_justify="left", expand=True)
    for j in snapshot.jobs:
        pct = 100 * j.finished / j.total if j.total else 100.0
        jobs.add_row(j.job_id, j.preset, j.state, f"{j.finished}/{j.total} ({pct:.0f}%)", str(j.failed))
    return Group(workers, queues, jobs)
