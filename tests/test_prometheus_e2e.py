"""A real Prometheus scrapes a real worker and the queue exporter during a tiny-pipeline batch.

Every PromQL expression in the shipped dashboards and alert rules is evaluated through Prometheus's
HTTP API: each must parse, every dashboard panel must return data, every rule must evaluate healthy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.client import Client
from producer.stack import LocalStack, free_port
from tests.conftest import settings_for

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "deploy/prometheus"
DASHBOARDS = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
FLUXFLEET = str(Path(sys.executable).with_name("fluxfleet"))
INSTALL = "install Prometheus: `apt-get install -y prometheus` (or `make venv`)"

needs_prometheus = pytest.mark.skipif(not shutil.which("prometheus") or not shutil.which("promtool"), reason=INSTALL)
pytestmark = [needs_prometheus, pytest.mark.slow]


def test_promtool_accepts_config_and_rules() -> None:
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"]):
        result = subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables the way the dashboard does with 'All' selected."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
    return re.sub(r"\$\{?(preset|gpu|worker)\}?", ".*", expr)


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                queries.append((f"{path.name}: {panel['title']}", grafana_to_promql(target["expr"])))
        for var in dashboard.get("templating", {}).get("list", []):
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert selector, f"{path.name}: variable {var['name']} query {query!r}"
            queries.append((f"{path.name}: variable {var['name']}", grafana_to_promql(selector.group(1))))
    return queries


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in rules["groups"] for r in g["rules"]]


def local_config(worker_port: int, exporter_port: int) -> dict[str, Any]:
    """The shipped config with its job names, pointed at local processes and scraping every second."""
    shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {"fluxfleet-workers": f"127.0.0.1:{worker_port}", "fluxfleet-exporter": f"127.0.0.1:{exporter_port}"}
    jobs = [
        {"job_name": job["job_name"], "static_configs": [{"targets": [targets[job["job_name"]]]}]}
        for job in shipped["scrape_configs"]
        if job["job_name"] in targets
    ]
    assert len(jobs) == 2, "prometheus.yml must keep the fluxfleet-workers and fluxfleet-exporter jobs"
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / f) for f in shipped["rule_files"]],
        "scrape_configs": jobs,
    }


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        assert body["status"] == "success", f"{path} {params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, AssertionError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def observed(make_stack: Callable[..., LocalStack], tmp_path: Path) -> Iterator[tuple[Prometheus, LocalStack]]:
    worker_port, exporter_port, prometheus_port = free_port(), free_port(), free_port()
    stack = make_stack(FLUXFLEET_WORKER__METRICS_PORT=str(worker_port))
    stack.start_redis()
    stack.start_worker("tiny")
    env = {**os.environ, **stack.env}
    processes = [
        subprocess.Popen(
            [FLUXFLEET, "exporter", "--port", str(exporter_port), "--address", "127.0.0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "exporter.log").open("wb"),
        )
    ]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(local_config(worker_port, exporter_port)))
    processes.append(
        subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
    )
    try:
        yield Prometheus(prometheus_port), stack
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def test_every_dashboard_and_rule_expression_against_real_prometheus(
    observed: tuple[Prometheus, LocalStack],
) -> None:
    prometheus, stack = observed
    stack.workers[0].wait_ready(timeout=180)
    wait_for(lambda: len(prometheus.query('up{job=~"fluxfleet-.*"} == 1')) == 2, 30, "both targets up")

    # Given a batch of 12 images through the tiny pipeline, scraped every second
    client = Client(settings_for(stack.env))
    job = client.submit([f"test image {i}: a lighthouse at dusk" for i in range(12)], preset="tiny")
    assert job.wait(timeout=180).state == "done"
    wait_for(
        lambda: prometheus.query('sum(fluxfleet_images_total{outcome="generated"})')[0]["value"][1] == "12",
        30,
        "Prometheus to scrape the finished batch",
    )
    time.sleep(2)  # a couple more scrapes, so rate() windows hold the whole batch

    # Then every dashboard query parses and returns data
    empty = [(where, expr) for where, expr in dashboard_queries() if not prometheus.query(expr)]
    assert not empty, f"dashboard queries without data: {empty}"

    # And every alert rule parses, evaluates, and is healthy in Prometheus's rule manager
    for _name, expr in rule_expressions():
        prometheus.query(expr)
    wait_for(
        lambda: all(r.get("lastEvaluation", "").startswith("20") for r in all_rules(prometheus)), 20, "rule evaluation"
    )
    unhealthy = [(r["name"], r.get("lastError")) for r in all_rules(prometheus) if r["health"] != "ok"]
    assert not unhealthy
    assert {r["name"] for r in all_rules(prometheus)} == {name for name, _ in rule_expressions()}
    assert prometheus.query("ALERTS") == [], "no alert should fire on a healthy batch"

    # And `fluxfleet top` sees the same worker and queues without Prometheus
    env = {**os.environ, **stack.env}
    result = subprocess.run([FLUXFLEET, "top", "--json", "--interval", "0.5"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    (worker,) = snapshot["workers"]
    assert (worker["state"], worker["preset"], worker["generated"]) == ("ready", "tiny", 12.0)
    assert {q["queue"] for q in snapshot["queues"]} >= {"fluxfleet.tiny"}
    assert snapshot["jobs"][0]["job_id"] == job.id and snapshot["jobs"][0]["finished"] == 12


def all_rules(prometheus: Prometheus) -> list[dict[str, Any]]:
    return [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
