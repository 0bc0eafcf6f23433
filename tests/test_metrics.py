"""Metric names, types and labels; a real worker's endpoint across a pool-child replacement; the queue exporter."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from fluxfleet import metric_names as m
from fluxfleet.settings import Settings
from producer.client import Client
from producer.exporter import QueueCollector, QueueReader, default_queues
from producer.stack import LocalStack, RedisServer, free_port
from tests.conftest import settings_for
from tests.faultkit import pool_child, wait_for

REPO = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^fluxfleet_[a-z][a-z0-9_]*[a-z]$")
NON_BASE_UNITS = ("_ms", "_milliseconds", "_minutes", "_hours", "_kb", "_mb", "_gb", "_kib", "_mib", "_gib", "_percent")


def test_names_types_labels_and_buckets() -> None:
    names = [spec.name for spec in m.ALL_METRICS]
    assert len(names) == len(set(names))
    assert set(m.WORKER_METRICS).isdisjoint(m.EXPORTER_METRICS)
    for spec in m.ALL_METRICS:
        assert NAME.match(spec.name), spec.name
        assert spec.kind in ("counter", "gauge", "histogram")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert not any(unit in spec.name for unit in NON_BASE_UNITS), spec.name
        assert set(spec.labels) <= m.ALLOWED_LABELS, spec.name
        assert spec.help.strip(), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith(("_seconds", "_bytes")), spec.name
            assert list(spec.buckets) == sorted(spec.buckets)
            assert spec.buckets[-1] >= 20 * 60, "histograms must reach 20 minutes"
        else:
            assert not spec.buckets
    for spec in m.WORKER_METRICS:
        assert set(m.WORKER_LABELS) <= set(spec.labels), spec.name
    assert "job_id" not in m.ALLOWED_LABELS and "prompt" not in m.ALLOWED_LABELS


def shipped_expressions() -> list[str]:
    import yaml

    rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for path in (REPO / "deploy/grafana/dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs


def test_dashboards_and_rules_use_only_defined_metrics() -> None:
    known = {spec.name for spec in m.ALL_METRICS}
    for expr in shipped_expressions():
        for name in re.findall(r"\bfluxfleet_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in known, f"{name} in {expr!r} is not in fluxfleet/metric_names.py"


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(f"#type {family.name}", []).append(({"type": family.type}, 0))
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == w for k, w in match.items()))


def run_job(settings: Settings, prompts: list[str]) -> None:
    job = Client(settings).submit(prompts, preset="tiny")
    assert job.wait(timeout=120).state == "done"


@pytest.mark.slow
def test_worker_endpoint_survives_pool_child_replacement(make_stack: Callable[..., LocalStack]) -> None:
    # Given a worker serving metrics from its parent process
    port = free_port()
    stack = make_stack(FLUXFLEET_WORKER__METRICS_PORT=str(port))
    stack.start_redis()
    worker = stack.start_worker("tiny")
    worker.wait_ready(timeout=180)
    settings = settings_for(stack.env)
    run_job(settings, ["a red fox", "a lighthouse", "a bowl of pears"])

    # Then every documented worker metric is exposed with its type and labels, and counts the job
    samples = scrape(port)
    for spec in m.WORKER_METRICS:
        family = spec.base_name
        assert f"#type {family}" in samples, f"{spec.name} missing"
        assert samples[f"#type {family}"][0][0]["type"] == spec.kind
        sample_name = spec.name + ("_count" if spec.kind == "histogram" else "")
        for labels, _ in samples[sample_name]:
            assert set(labels) == set(spec.labels), (spec.name, labels)
    assert value(samples, "fluxfleet_images_total", outcome="generated") == 3
    assert value(samples, "fluxfleet_worker_ready") == 1
    assert value(samples, "fluxfleet_worker_process_starts_total") == 1
    assert value(samples, "fluxfleet_stage_duration_seconds_count", stage="denoising") == 3
    assert value(samples, "fluxfleet_gpu_memory_after_load_bytes") > 0

    # When the pool child is killed (as the OOM killer would) and Celery replaces it
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pool_child(worker))], check=True)
    wait_for(
        lambda: (
            value(scrape(port), "fluxfleet_worker_process_starts_total") == 2
            and value(scrape(port), "fluxfleet_worker_ready") == 1
        ),
        150,
        "a replacement pool child to load the pipeline",
    )

    # Then the counters neither reset nor double, and keep counting
    assert value(scrape(port), "fluxfleet_images_total", outcome="generated") == 3
    run_job(settings, ["a sailing ship", "a snowy owl"])
    samples = scrape(port)
    assert value(samples, "fluxfleet_images_total", outcome="generated") == 5
    assert value(samples, "fluxfleet_stage_duration_seconds_count", stage="denoising") == 5
    assert value(samples, "fluxfleet_worker_ready") == 1


def test_queue_exporter_reads_kombu_keys_from_real_redis(redis_server: RedisServer, tiny_model_dir: Path) -> None:
    from kombu import Queue
    from prometheus_client import CollectorRegistry, generate_latest

    from fluxfleet.celery_config import make_celery
    from fluxfleet.jobs import redis_client

    # Given a job enqueued with no worker running
    settings = Settings().with_overrides(
        broker__url=redis_server.url, storage__url="file:///nonexistent", model_dir=str(tiny_model_dir)
    )
    job = Client(settings).submit([f"prompt {i}" for i in range(10)], preset="tiny")
    tasks = job.status().total // 4 + (1 if job.status().total % 4 else 0)
    reader = QueueReader(redis_client(settings.broker), default_queues(settings))
    tiny = {s.queue: s for s in reader.read()}["fluxfleet.tiny"]
    assert (tiny.messages, tiny.unacked, tiny.oldest_unacked_age_s) == (tasks, 0, 0.0)

    # When a consumer takes one message and does not acknowledge it
    app = make_celery(settings, ["tiny"])
    got: list[object] = []
    with (
        app.connection_for_read() as conn,
        conn.Consumer(
            Queue("fluxfleet.tiny", routing_key="fluxfleet.tiny"), callbacks=[lambda b, msg: got.append(msg)]
        ) as consumer,
    ):
        consumer.qos(prefetch_count=1)
        conn.drain_events(timeout=5)
        time.sleep(1.1)
        stats = {s.queue: s for s in reader.read()}

        # Then it is counted as unacked, with its age, and no longer as waiting
        assert len(got) == 1
        assert stats["fluxfleet.tiny"].messages == tasks - 1
        assert stats["fluxfleet.tiny"].unacked == 1
        assert 1.0 <= stats["fluxfleet.tiny"].oldest_unacked_age_s < 30
        registry = CollectorRegistry()
        registry.register(QueueCollector(reader, 3600))
        text = generate_latest(registry).decode()
    assert 'fluxfleet_queue_unacked_messages{queue="fluxfleet.tiny"} 1.0' in text
    assert f'fluxfleet_queue_messages{{queue="fluxfleet.tiny"}} {float(tasks - 1)}' in text
    assert "fluxfleet_broker_visibility_timeout_seconds 3600.0" in text
    assert 'fluxfleet_queue_messages{queue="fluxfleet.bf16"} 0.0' in text
