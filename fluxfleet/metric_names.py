"""Every Prometheus metric fluxfleet exports: name, type, help, labels and buckets, in one place.

Names follow ``fluxfleet_<noun>_<unit>`` in base units (seconds, bytes); counters end in ``_total``.
Labels are low-cardinality only (see ``ALLOWED_LABELS``): never a job id or a prompt.

Worker metrics are written by the pool child and served by the worker's parent process
(``workers/service/metrics.py``); queue metrics are read from Redis by ``fluxfleet exporter``.
Pure data: importing this module imports neither prometheus_client nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

ALLOWED_LABELS = frozenset({"preset", "gpu", "worker", "outcome", "stage", "queue", "reason"})
WORKER_LABELS = ("preset", "gpu", "worker")

STAGES = ("queue_wait", "text_encoding", "denoising", "vae_decode", "png_encode", "upload")
"""Stages the engine times; all but ``queue_wait`` share a batched call's time among its images."""

OUTCOMES = ("generated", "skipped", "failed")
FAILURE_REASONS = ("invalid", "attempts", "oom", "timeout", "storage", "error")
RETRY_REASONS = ("storage", "oom", "transient", "timeout")
"""Reasons pre-initialised at zero so dashboards and alerts see a series before the first event."""

SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
    60.0, 90.0, 120.0, 180.0, 300.0, 450.0, 600.0, 900.0, 1200.0,
)  # fmt: skip
"""From 5 ms (PNG encode of a tiny image) to 20 minutes (a long queue wait or a slow offloaded preset)."""

GaugeMode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent"
]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    gauge_mode: GaugeMode = "livemostrecent"
    """How the multiprocess collector merges a gauge across pool children (``live*`` drops dead ones)."""

    @property
    def base_name(self) -> str:
        """The name prometheus_client takes (it appends ``_total`` to counters itself)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


# -- worker: work done ----------------------------------------------------------------------------
IMAGES = MetricSpec(
    "fluxfleet_images_total",
    "counter",
    "Items finished, by outcome: generated, skipped (already stored) or failed.",
    (*WORKER_LABELS, "outcome"),
)
IMAGE_SECONDS = MetricSpec(
    "fluxfleet_image_duration_seconds",
    "histogram",
    "Seconds from enqueue to stored record for one generated image (queue wait + generation + encode + upload).",
    WORKER_LABELS,
    SECONDS_BUCKETS,
)
STAGE_SECONDS = MetricSpec(
    "fluxfleet_stage_duration_seconds",
    "histogram",
    "Seconds per image in one stage; a batched call's time is divided among its images (queue_wait is not).",
    (*WORKER_LABELS, "stage"),
    SECONDS_BUCKETS,
)
DENOISING_STEPS = MetricSpec(
    "fluxfleet_denoising_steps_total",
    "counter",
    "Denoising steps run, summed over the images of each batch.",
    WORKER_LABELS,
)
REUSED_STEPS = MetricSpec(
    "fluxfleet_denoising_steps_reused_total",
    "counter",
    "Denoising steps an item's cache policy reused instead of running the transformer's blocks (also counted in "
    "fluxfleet_denoising_steps_total).",
    WORKER_LABELS,
)
DENOISING_RATE = MetricSpec(
    "fluxfleet_denoising_steps_per_second",
    "gauge",
    "Denoising steps per second (summed over the batch) in the most recent pipeline call.",
    WORKER_LABELS,
)
ITEM_FAILURES = MetricSpec(
    "fluxfleet_item_failures_total",
    "counter",
    "Items that failed for good, by reason (invalid input, too many attempts, ...).",
    (*WORKER_LABELS, "reason"),
)
TASK_RETRIES = MetricSpec(
    "fluxfleet_task_retries_total",
    "counter",
    "Tasks sent back for a retry, by reason (storage, oom, ...).",
    (*WORKER_LABELS, "reason"),
)

# -- worker: lifecycle ----------------------------------------------------------------------------
LOAD_SECONDS = MetricSpec(
    "fluxfleet_pipeline_load_seconds",
    "gauge",
    "Seconds the most recent pipeline load took (from_pretrained, quantization, placement).",
    WORKER_LABELS,
    gauge_mode="mostrecent",
)
WARMUP_SECONDS = MetricSpec(
    "fluxfleet_pipeline_warmup_seconds",
    "gauge",
    "Seconds the most recent warm-up (compilation included) took.",
    WORKER_LABELS,
    gauge_mode="mostrecent",
)
WORKER_READY = MetricSpec(
    "fluxfleet_worker_ready",
    "gauge",
    "1 while a pool child holds a loaded, warmed-up pipeline and takes tasks, else 0.",
    WORKER_LABELS,
    gauge_mode="livemax",
)
WORKER_STARTS = MetricSpec(
    "fluxfleet_worker_process_starts_total",
    "counter",
    "Pool children that started loading the pipeline (more than one means a child was replaced).",
    WORKER_LABELS,
)

# -- worker: device memory (torch.cuda on GPU; process resident memory on a CPU worker) -------------
MEMORY_AFTER_LOAD = MetricSpec(
    "fluxfleet_gpu_memory_after_load_bytes",
    "gauge",
    "Device memory allocated once the pipeline is loaded and warmed up.",
    WORKER_LABELS,
)
MEMORY_ALLOCATED = MetricSpec(
    "fluxfleet_gpu_memory_allocated_bytes",
    "gauge",
    "Device memory allocated by tensors after the most recent pipeline call.",
    WORKER_LABELS,
)
MEMORY_RESERVED = MetricSpec(
    "fluxfleet_gpu_memory_reserved_bytes",
    "gauge",
    "Device memory held by the caching allocator after the most recent pipeline call.",
    WORKER_LABELS,
)
MEMORY_PEAK = MetricSpec(
    "fluxfleet_gpu_memory_peak_bytes",
    "gauge",
    "Peak device memory allocated during the most recent pipeline call.",
    WORKER_LABELS,
)

# -- queue exporter (one process reads Redis for the whole fleet) ---------------------------------
QUEUE_MESSAGES = MetricSpec(
    "fluxfleet_queue_messages",
    "gauge",
    "Messages waiting in the queue (not yet delivered to a worker).",
    ("queue",),
)
QUEUE_UNACKED = MetricSpec(
    "fluxfleet_queue_unacked_messages",
    "gauge",
    "Messages delivered to a worker and not yet acknowledged (running or reserved tasks).",
    ("queue",),
)
QUEUE_OLDEST_UNACKED = MetricSpec(
    "fluxfleet_queue_oldest_unacked_age_seconds",
    "gauge",
    "Age of the oldest unacknowledged message; Redis re-delivers it once this passes the visibility timeout.",
    ("queue",),
)
VISIBILITY_TIMEOUT = MetricSpec(
    "fluxfleet_broker_visibility_timeout_seconds",
    "gauge",
    "The broker visibility timeout the exporter was configured with (for alert thresholds).",
)
EXPORTER_ERRORS = MetricSpec(
    "fluxfleet_exporter_errors_total",
    "counter",
    "Scrapes of the queue exporter that could not read Redis.",
)

WORKER_METRICS: tuple[MetricSpec, ...] = (
    IMAGES,
    IMAGE_SECONDS,
    STAGE_SECONDS,
    DENOISING_STEPS,
    REUSED_STEPS,
    DENOISING_RATE,
    ITEM_FAILURES,
    TASK_RETRIES,
    LOAD_SECONDS,
    WARMUP_SECONDS,
    WORKER_READY,
    WORKER_STARTS,
    MEMORY_AFTER_LOAD,
    MEMORY_ALLOCATED,
    MEMORY_RESERVED,
    MEMORY_PEAK,
)
EXPORTER_METRICS: tuple[MetricSpec, ...] = (
    QUEUE_MESSAGES,
    QUEUE_UNACKED,
    QUEUE_OLDEST_UNACKED,
    VISIBILITY_TIMEOUT,
    EXPORTER_ERRORS,
)
ALL_METRICS: tuple[MetricSpec, ...] = WORKER_METRICS + EXPORTER_METRICS


def endpoints_key(prefix: str) -> str:
    """Redis hash where each worker advertises its metrics URL (worker name -> URL) for ``fluxfleet top``."""
    return f"{prefix}:metrics_endpoints"


# -- documentation: `python -m fluxfleet.metric_names --markdown` prints the README's table ------------
README_BEGIN = "<!-- metric-names:begin (python -m fluxfleet.metric_names --update README.md) -->"
README_END = "<!-- metric-names:end -->"
UNITS_BY_SUFFIX = (("_seconds", "seconds"), ("_bytes", "bytes"), ("_per_second", "steps per second"))
UNITS = {
    "fluxfleet_images_total": "images",
    "fluxfleet_denoising_steps_total": "steps",
    "fluxfleet_denoising_steps_reused_total": "steps",
    "fluxfleet_item_failures_total": "items",
    "fluxfleet_task_retries_total": "retries",
    "fluxfleet_worker_process_starts_total": "process starts",
    "fluxfleet_exporter_errors_total": "failed scrapes",
    "fluxfleet_worker_ready": "0 or 1",
    "fluxfleet_queue_messages": "messages",
    "fluxfleet_queue_unacked_messages": "messages",
}
"""Units of the counters (what they count) and of the metrics whose name does not end in a unit."""


def unit(spec: MetricSpec) -> str:
    """The unit of a metric's value: from ``UNITS``, else from its name (``…_seconds``, ``…_bytes``)."""
    if spec.name in UNITS:
        return UNITS[spec.name]
    name = spec.name.removesuffix("_total")
    for suffix, label in UNITS_BY_SUFFIX:
        if name.endswith(suffix):
            return label
    raise ValueError(f"metric {spec.name} has no unit: add it to UNITS in fluxfleet/metric_names.py")


def markdown_table() -> str:
    """Every metric as a Markdown table: name, type, unit, labels, meaning (the README's table)."""
    lines = ["| metric | type | unit | labels | meaning |", "|---|---|---|---|---|"]
    for spec in ALL_METRICS:
        kind = spec.kind + (" (`_bucket`, `_sum`, `_count`)" if spec.kind == "histogram" else "")
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        meaning = spec.help.replace("|", "\\|")
        lines.append(f"| `{spec.name}` | {kind} | {unit(spec)} | {labels} | {meaning} |")
    return "\n".join(lines) + "\n"


def replace_readme_table(text: str) -> str:
    """``text`` (a README) with the table between its markers regenerated."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"no '{README_BEGIN}' ... '{README_END}' markers in the README")
    return text[: start + len(README_BEGIN)] + "\n" + markdown_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m fluxfleet.metric_names", description="Document the metrics.")
    parser.add_argument("--markdown", action="store_true", help="print the metrics as a Markdown table")
    parser.add_argument("--update", type=Path, metavar="README", help="rewrite the table between the README's markers")
    args = parser.parse_args(argv)
    if args.update:
        args.update.write_text(replace_readme_table(args.update.read_text(encoding="utf-8")), encoding="utf-8")
    if args.markdown or not args.update:
        print(markdown_table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
