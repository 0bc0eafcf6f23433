"""``fluxfleet top``: a live view of the fleet from the workers' metrics endpoints and Redis.

No Prometheus needed: workers advertise their endpoint in Redis (``workers/service/metrics.py``), queues
are read the way ``fluxfleet exporter`` reads them, jobs from fluxfleet's own records. Rates
(images per minute, seconds per image) are differences between two successive refreshes.

Whoever can write to Redis chooses what ``top`` fetches, so it reads only http(s) URLs, without
following redirects, within a time and size bound, and shows numbers from them, never their text.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from fluxfleet import metric_names as m
from fluxfleet.jobs import JobStore
from fluxfleet.settings import Settings
from producer.exporter import QueueReader, QueueStats, default_queues

SCRAPE_TIMEOUT_S = 2.0
"""Seconds for one endpoint, connection and whole body together."""
MAX_METRICS_BYTES = 2 * 2**20
"""Largest metrics page read. A worker's page is tens of kilobytes (histograms per stage included)."""
ALLOWED_SCHEMES = ("http", "https")
GENERATION_STAGES = ("text_encoding", "denoising", "vae_decode")
"""The pipeline's own work per image: what ``gen s/img`` adds up (no queue wait, PNG encode or upload)."""
LEGEND = (
    "gen s/img: text encoding + denoising + VAE decode per generated image; "
    "e2e s/img: enqueue to stored record, queue wait included"
)

Samples = dict[str, list[tuple[dict[str, str], float]]]


class ScrapeError(Exception):
    """Raised when an endpoint is not read: refused URL, no answer, too large, not a metrics page."""


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
    generation_s_per_image: float | None = None
    end_to_end_s_per_image: float | None = None
    memory_bytes: float | None = None
    peak_bytes: float | None = None
    error: str = ""
    _generation_sum: float = field(default=0.0, repr=False)
    _end_to_end_sum: float = field(default=0.0, repr=False)


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


def printable(text: str, limit: int = 120) -> str:
    """``text`` safe for a terminal: control characters (escape sequences included) replaced, length capped."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def refusal(url: str) -> str | None:
    """Why ``url`` is not fetched, or None when it is an http(s) URL ``top`` may read."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "not fetched: not a valid URL"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"not fetched: only http and https metrics URLs are read, not '{printable(parts.scheme, 20)}:'"
    if not parts.hostname:
        return "not fetched: the URL names no host"
    if parts.username is not None or parts.password is not None:
        return "not fetched: the URL carries credentials"
    return None


def display_url(url: str) -> str:
    """The URL as shown: any credentials replaced, control characters removed."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.username is not None or parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            url = urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))
    except ValueError:
        pass
    return printable(url, 80)


# Only plain HTTP(S): no file:, ftp: or data: handlers, and no redirect handler, so a 3xx is an error.
_OPENER = urllib.request.OpenerDirector()
for _handler in (
    urllib.request.ProxyHandler(),
    urllib.request.HTTPHandler(),
    urllib.request.HTTPSHandler(),
    urllib.request.HTTPDefaultErrorHandler(),
    urllib.request.HTTPErrorProcessor(),
):
    _OPENER.add_handler(_handler)


def fetch(url: str, *, timeout_s: float = SCRAPE_TIMEOUT_S, max_bytes: int = MAX_METRICS_BYTES) -> str:
    """The body of an http(s) ``url``, read within ``timeout_s`` in all and at most ``max_bytes``."""
    if why := refusal(url):
        raise ScrapeError(why)
    deadline = time.monotonic() + timeout_s
    try:
        with _OPENER.open(url, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ScrapeError(f"metrics page of {int(declared)} bytes is over the {max_bytes}-byte bound")
            body = bytearray()
            while chunk := response.read1(65536):  # read1: one receive at a time, so the deadline holds
                body += chunk
                if len(body) > max_bytes:
                    raise ScrapeError(f"metrics page is over the {max_bytes}-byte bound")
                if time.monotonic() > deadline:
                    raise ScrapeError(f"metrics page not read within {timeout_s:g} s")
    except urllib.error.HTTPError as e:
        raise ScrapeError(f"HTTP {e.code} {printable(str(e.reason), 40)}") from e
    except urllib.error.URLError as e:
        raise ScrapeError(printable(str(e.reason), 80)) from e
    except TimeoutError as e:
        raise ScrapeError(f"no answer within {timeout_s:g} s") from e
    except OSError as e:
        raise ScrapeError(printable(str(e), 80)) from e
    return body.decode("utf-8", errors="replace")


def scrape(url: str) -> Samples:
    """Samples by name from a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = fetch(url)
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((s.labels, s.value))
    except (ValueError, TypeError, IndexError) as e:
        # The parser quotes the offending line: whatever the URL served stays off the screen.
        raise ScrapeError("not a Prometheus metrics page") from e
    return samples


def _total(samples: Samples, name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == w for k, w in match.items()))


def _per_image(total_s: float, previous_s: float, done: float, last: float | None) -> float | None:
    return (total_s - previous_s) / done if done > 0 else last


def read_worker(url: str, previous: WorkerView | None, elapsed_s: float) -> WorkerView:
    view = WorkerView(url=display_url(url))
    if why := refusal(url):
        view.state, view.error = "skipped", why
        return view
    try:
        samples = scrape(url)
    except ScrapeError as e:
        view.error = str(e)
        return view
    ready = samples.get(m.WORKER_READY.name, [])
    if ready:
        labels = ready[0][0]
        view.worker, view.preset, view.gpu = (printable(labels.get(k, "?"), 80) for k in ("worker", "preset", "gpu"))
        view.state = "ready" if max(v for _, v in ready) >= 1 else "loading"
    view.generated = _total(samples, m.IMAGES.name, outcome="generated")
    view.failed = _total(samples, m.IMAGES.name, outcome="failed")
    view.retries = _total(samples, m.TASK_RETRIES.name)
    view._end_to_end_sum = _total(samples, m.IMAGE_SECONDS.name + "_sum")
    view._generation_sum = sum(_total(samples, m.STAGE_SECONDS.name + "_sum", stage=s) for s in GENERATION_STAGES)
    view.memory_bytes = _total(samples, m.MEMORY_ALLOCATED.name) or None
    view.peak_bytes = _total(samples, m.MEMORY_PEAK.name) or None
    if previous is not None and elapsed_s > 0:
        done = view.generated - previous.generated
        view.images_per_min = max(done, 0.0) * 60 / elapsed_s
        view.generation_s_per_image = _per_image(
            view._generation_sum, previous._generation_sum, done, previous.generation_s_per_image
        )
        view.end_to_end_s_per_image = _per_image(
            view._end_to_end_sum, previous._end_to_end_sum, done, previous.end_to_end_s_per_image
        )
    elif view.generated:
        view.generation_s_per_image = view._generation_sum / view.generated
        view.end_to_end_s_per_image = view._end_to_end_sum / view.generated
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
        urls = self.endpoints()
        # In parallel: one endpoint that does not answer costs its timeout once, not once per worker after it.
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls)))) as pool:
            workers = list(pool.map(lambda url: read_worker(url, self.previous.get(url), elapsed), urls))
        self.previous = {w.url: w for w in workers}
        self.previous_at = now
        return Snapshot(time.time(), workers, self.reader.read(), self.recent_jobs())


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _table(title: str) -> Table:
    # No vertical rules and two spaces between columns: at 80 columns names and ids stay whole.
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                 padding=(0, 1, 0, 0))  # fmt: skip


COLOURS = {"ready": "green", "loading": "yellow", "down": "red", "skipped": "red"}
NUMBER_HEADERS = ("img/min", "gen s/img", "e2e s/img", "images", "failed", "mem GiB", "peak GiB")


def _numbers(w: WorkerView) -> list[str]:
    return [
        _num(w.images_per_min, ".1f"),
        _num(w.generation_s_per_image, ".2f"),
        _num(w.end_to_end_s_per_image, ".2f"),
        f"{w.generated:.0f}",
        f"{w.failed:.0f}",
        _gib(w.memory_bytes),
        _gib(w.peak_bytes),
    ]


def _name(w: WorkerView) -> str:
    return w.worker if w.worker != "?" else w.url


class WorkersView:
    """The workers as a table where their names fit whole beside the numbers, else one block per worker."""

    def __init__(self, workers: list[WorkerView]) -> None:
        self.workers = workers

    def rows(self) -> list[list[str]]:
        return [[_name(w), w.state, *_numbers(w)] for w in self.workers]

    def column_widths(self, wrap_headers: bool) -> list[int]:
        """Each column's width with names and numbers whole, headers whole or wrapped at their spaces."""
        headers = ("worker", "state", *NUMBER_HEADERS)
        rows = self.rows()
        return [
            max([len(word) for word in (h.split() if wrap_headers else [h])] + [len(row[i]) for row in rows])
            for i, h in enumerate(headers)
        ]

    def table(self, widths: list[int] | None = None) -> Table:
        """The table; ``widths`` fixes the numbers' columns (their headers then wrap)."""
        table = _table("workers")
        table.add_column("worker", no_wrap=True)
        table.add_column("state", no_wrap=True)
        for i, header in enumerate(NUMBER_HEADERS, start=2):
            table.add_column(header, justify="right", width=widths[i] if widths else None)
        for w, row in zip(self.workers, self.rows(), strict=True):
            table.add_row(Text(row[0]), Text(row[1], style=COLOURS.get(w.state, "")), *row[2:])
        return table

    def blocks(self) -> Group:
        lines: list[Text] = [Text("workers")]
        for w in self.workers:
            lines.append(Text.assemble((_name(w), "bold"), "  ", (w.state, COLOURS.get(w.state, ""))))
            if w.error:
                lines.append(Text(f"  {w.error}"))
                continue
            values = zip(NUMBER_HEADERS, _numbers(w), strict=True)
            pairs = [f"{v} {h}" if h in ("images", "failed") else f"{h} {v}" for h, v in values]
            lines.append(Text("  " + "   ".join(pairs[:3])))
            lines.append(Text("  " + "   ".join(pairs[3:])))
        return Group(*lines)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        def fits(widths: list[int]) -> bool:
            return sum(widths) + 2 * (len(widths) - 1) <= options.max_width  # two spaces between columns

        if fits(self.column_widths(wrap_headers=False)):
            yield self.table()
        elif fits(narrow := self.column_widths(wrap_headers=True)):
            yield self.table(narrow)
        else:
            yield self.blocks()  # the errors are in the blocks
        if fits(self.column_widths(wrap_headers=True)):
            yield from (Text(f"{w.url}: {w.error}") for w in self.workers if w.error)
        yield Text(LEGEND, style="dim")


def render(snapshot: Snapshot) -> Group:
    """The snapshot as tables; every text from Redis or an endpoint goes in as plain text, never markup."""
    queues = _table("queues")
    for header in ("queue", "waiting", "unacked", "oldest unacked"):
        queues.add_column(header, no_wrap=header == "queue", justify="left" if header == "queue" else "right")
    for q in snapshot.queues:
        age = f"{q.oldest_unacked_age_s:.0f} s" if q.unacked else "-"
        queues.add_row(Text(q.queue), str(q.messages), str(q.unacked), age)
    jobs = _table("recent jobs")
    jobs.add_column("job", no_wrap=True)
    jobs.add_column("preset", no_wrap=True)
    jobs.add_column("state")
    jobs.add_column("done", justify="right")
    jobs.add_column("failed", justify="right")
    for j in snapshot.jobs:
        jobs.add_row(Text(j.job_id), Text(j.preset), Text(j.state), f"{j.finished}/{j.total}", str(j.failed))
    return Group(WorkersView(snapshot.workers), Text(""), queues, Text(""), jobs)
