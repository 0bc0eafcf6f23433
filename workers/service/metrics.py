"""A worker's Prometheus metrics: written by the pool child, served over HTTP by the parent.

Celery's prefork pool forks a child that loads the pipeline, and replaces it when it dies (an OOM
kill, a hard time limit). prometheus_client's multiprocess mode gives every process its own files
in a directory private to this worker (``PROMETHEUS_MULTIPROC_DIR``); the parent's endpoint sums
them, so a replaced child's counters neither reset nor count twice. ``setup_metrics`` runs in the
parent before Celery forks and never imports torch; device memory is read in the child only.

Names, types, labels and buckets live in ``fluxfleet.metric_names``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import resource
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxfleet import metric_names as m
from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset
from fluxfleet.settings import Settings
from workers.service.identity import worker_name
from workers.tasks.observer import Observer

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def build_metric(spec: m.MetricSpec, registry: Any = None) -> Any:
    """The prometheus_client object for ``spec`` (unregistered: multiprocess files carry the values)."""
    import prometheus_client as pc

    common: dict[str, Any] = {"labelnames": spec.labels, "registry": registry}
    if spec.kind == "counter":
        return pc.Counter(spec.base_name, spec.help, **common)
    if spec.kind == "histogram":
        return pc.Histogram(spec.name, spec.help, buckets=spec.buckets, **common)
    return pc.Gauge(spec.name, spec.help, multiprocess_mode=spec.gauge_mode, **common)


@dataclass
class WorkerMetrics:
    """One worker's metric children, bound to its preset/gpu/worker labels."""

    labels: dict[str, str]

    def __post_init__(self) -> None:
        self.families = {spec.name: build_metric(spec) for spec in m.WORKER_METRICS}

    def get(self, spec: m.MetricSpec, **extra: str) -> Any:
        return self.families[spec.name].labels(**self.labels, **extra)


_metrics: WorkerMetrics | None = None
"""Built in the parent by ``setup_metrics`` and inherited by the forked child."""


def worker_metrics(labels: dict[str, str]) -> WorkerMetrics:
    global _metrics
    if _metrics is None or _metrics.labels != labels:
        _metrics = WorkerMetrics(labels)
    return _metrics


def worker_labels(settings: Settings, preset: Preset) -> dict[str, str]:
    return {"preset": preset.name, "gpu": settings.worker.gpu, "worker": worker_name(preset, settings.worker.gpu)}


# -- the parent: endpoint ------------------------------------------------------------------------
class LiveCollector:
    """MultiProcessCollector that first drops ``live*`` gauges of pool children that have died."""

    def __init__(self, directory: Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self.inner = MultiProcessCollector(None, path=str(directory))

    def collect(self) -> Any:
        from prometheus_client.multiprocess import mark_process_dead

        for path in glob.glob(str(self.directory / "gauge_live*_*.db")):
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
            if not _alive(pid):
                mark_process_dead(pid, str(self.directory))
        return self.inner.collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _use_multiprocess_values(directory: Path) -> None:
    os.environ[MULTIPROC_ENV] = str(directory)
    from prometheus_client import values

    # prometheus_client picks its value class at import; re-pick in case it was imported earlier.
    values.ValueClass = values.get_value_class()


DIR_PREFIX = "fluxfleet-metrics-"


def _remove_stale_directories() -> None:
    """Remove multiprocess directories left by workers that were killed (no atexit ran)."""
    for path in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*-*-*"):
        pid = path.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class MetricsEndpoint:
    url: str
    directory: Path
    server: Any
    pid: int

    def close(self) -> None:
        self.server.shutdown()
        shutil.rmtree(self.directory, ignore_errors=True)


def advertised_url(address: str, port: int) -> str:
    host = socket.gethostname() if address in ("0.0.0.0", "::", "") else address
    return f"http://{host}:{port}/metrics"


def setup_metrics(settings: Settings, preset: Preset) -> MetricsEndpoint | None:
    """Serve this worker's metrics from the current (parent) process; call before Celery forks.

    Does nothing when ``worker.metrics_port`` is 0. Raises ``ConfigurationError`` if the port is taken.
    """
    port = settings.worker.metrics_port
    if not port:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    labels = worker_labels(settings, preset)
    safe = f"{preset.name}-gpu{settings.worker.gpu.replace(',', '_')}"
    _remove_stale_directories()
    directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{safe}-{os.getpid()}-"))
    _use_multiprocess_values(directory)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(LiveCollector(directory))
    try:
        server, _thread = start_http_server(port, settings.worker.metrics_address, registry=registry)
    except OSError as e:
        shutil.rmtree(directory, ignore_errors=True)
        raise ConfigurationError(
            f"cannot serve metrics on {settings.worker.metrics_address}:{port} ({e}); "
            "set FLUXFLEET_WORKER__METRICS_PORT (or --metrics-port) to a free port, or 0 to turn metrics off"
        ) from e
    # The parent's own 0 keeps the series present while no child is ready (livemax over processes).
    worker_metrics(labels).get(m.WORKER_READY).set(0)
    url = advertised_url(settings.worker.metrics_address, port)
    endpoint = MetricsEndpoint(url, directory, server, os.getpid())
    _register_endpoint(settings, labels["worker"], endpoint.url)
    atexit.register(_teardown, settings, labels["worker"], endpoint)
    logger.info("metrics on %s (multiprocess files in %s)", endpoint.url, directory)
    return endpoint


def _register_endpoint(settings: Settings, worker: str, url: str) -> None:
    """Advertise the endpoint in Redis so ``fluxfleet top`` finds workers without configuration."""
    from fluxfleet.jobs import redis_client

    with contextlib.suppress(Exception):
        redis_client(settings.broker).hset(m.endpoints_key(settings.broker.key_prefix), worker, url)


def _teardown(settings: Settings, worker: str, endpoint: MetricsEndpoint) -> None:
    from fluxfleet.jobs import redis_client

    if os.getpid() != endpoint.pid:  # a forked child inherits atexit handlers
        return
    with contextlib.suppress(Exception):
        redis_client(settings.broker).hdel(m.endpoints_key(settings.broker.key_prefix), worker)
    endpoint.close()


# -- the child: observer -------------------------------------------------------------------------
class PrometheusObserver(Observer):
    """Counts what the engine reports; reads device memory after each pipeline call."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.device = "cpu"
        for outcome in m.OUTCOMES:
            metrics.get(m.IMAGES, outcome=outcome)
        for reason in m.FAILURE_REASONS:
            metrics.get(m.ITEM_FAILURES, reason=reason)
        for reason in m.RETRY_REASONS:
            metrics.get(m.TASK_RETRIES, reason=reason)
        for stage in m.STAGES:
            metrics.get(m.STAGE_SECONDS, stage=stage)
        metrics.get(m.REUSED_STEPS)
        metrics.get(m.WORKER_READY).set(0)
        metrics.get(m.WORKER_STARTS).inc()

    def pipeline_ready(self, loaded: Any) -> None:
        """The pipeline is loaded (and warmed up): record how long that took and the memory it holds."""
        self.device = str(loaded.device)
        self.metrics.get(m.LOAD_SECONDS).set(loaded.load_s)
        self.metrics.get(m.WARMUP_SECONDS).set(loaded.warmup_s)
        allocated, _reserved, _peak = read_memory(self.device)
        self.metrics.get(m.MEMORY_AFTER_LOAD).set(allocated)
        self.generation_memory()
        self.metrics.get(m.WORKER_READY).set(1)

    def stage(self, stage: str, seconds: float, images: int = 1) -> None:
        per_image = seconds if stage == "queue_wait" else seconds / max(images, 1)
        histogram = self.metrics.get(m.STAGE_SECONDS, stage=stage)
        for _ in range(max(images, 1)):
            histogram.observe(per_image)

    def denoising_steps(self, steps: int, seconds: float) -> None:
        self.metrics.get(m.DENOISING_STEPS).inc(steps)
        if seconds > 0:
            self.metrics.get(m.DENOISING_RATE).set(steps / seconds)

    def steps_reused(self, steps: int) -> None:
        self.metrics.get(m.REUSED_STEPS).inc(steps)

    def item_done(self, seconds_end_to_end: float, skipped: bool) -> None:
        self.metrics.get(m.IMAGES, outcome="skipped" if skipped else "generated").inc()
        if not skipped:
            self.metrics.get(m.IMAGE_SECONDS).observe(seconds_end_to_end)

    def item_failed(self, reason: str) -> None:
        self.metrics.get(m.IMAGES, outcome="failed").inc()
        self.metrics.get(m.ITEM_FAILURES, reason=reason).inc()

    def task_retry(self, reason: str) -> None:
        self.metrics.get(m.TASK_RETRIES, reason=reason).inc()

    def generation_memory(self) -> None:
        allocated, reserved, peak = read_memory(self.device, reset_peak=True)
        self.metrics.get(m.MEMORY_ALLOCATED).set(allocated)
        self.metrics.get(m.MEMORY_RESERVED).set(reserved)
        self.metrics.get(m.MEMORY_PEAK).set(peak)


def child_observer(settings: Settings, preset: Preset) -> PrometheusObserver:
    """The observer of a pool child that is about to load the pipeline (counts one child start)."""
    return PrometheusObserver(worker_metrics(worker_labels(settings, preset)))


# -- device memory (child only) ------------------------------------------------------------------
def read_memory(device: str, reset_peak: bool = False) -> tuple[int, int, int]:
    """(allocated, reserved, peak) bytes: torch.cuda summed over visible GPUs, else this process's RSS."""
    if device.startswith("cuda"):
        import torch

        devices = range(torch.cuda.device_count())
        allocated = sum(torch.cuda.memory_allocated(d) for d in devices)
        reserved = sum(torch.cuda.memory_reserved(d) for d in devices)
        peak = sum(torch.cuda.max_memory_allocated(d) for d in devices)
        if reset_peak:
            for d in devices:
                torch.cuda.reset_peak_memory_stats(d)
        return allocated, reserved, peak
    rss = _resident_bytes()
    peak = max(rss, _peak_resident_bytes())
    if reset_peak:
        # Linux resets VmHWM (the peak RSS) when "5" is written here; elsewhere the peak is lifelong.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    return rss, rss, peak


def _resident_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return _peak_resident_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def retry_reason(error: BaseException) -> str:
    """The ``reason`` label of a task retry: 'oom', 'storage', 'timeout' or 'transient'."""
    from fluxfleet.errors import StorageError

    name = type(error).__name__.lower()
    if "outofmemory" in name or "out of memory" in str(error).lower():
        return "oom"
    if isinstance(error, StorageError):
        return "storage"
    if "timeout" in name:
        return "timeout"
    return "transient"
