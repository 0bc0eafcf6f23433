"""``fluxfleet top``: what it fetches (only http(s), bounded) and what a person reads (80 columns, no terminal).

Real services: a redis-server, and an HTTP server on loopback in a thread serving metrics pages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fluxfleet import metric_names as m
from fluxfleet.jobs import redis_client
from fluxfleet.settings import Settings
from producer.client import Client
from producer.stack import RedisServer
from producer.top import LEGEND, SCRAPE_TIMEOUT_S, Fleet, ScrapeError, fetch
from tests.conftest import ROOT

FLUXFLEET = str(Path(sys.executable).parent / "fluxfleet")
LONG_PRESET = "fp8-layerwise-group-offload"  # the longest preset name
WORKER = f"{LONG_PRESET}-gpu0@node-17"
CANARY = "CANARY-2b7e151628aed2a6"


class MetricsPages:
    """What the loopback server serves; tests change the counters between reads."""

    def __init__(self) -> None:
        self.generated = 12.0
        self.denoising_s = 6.0
        self.end_to_end_s = 60.0

    def metrics(self) -> str:
        labels = f'preset="{LONG_PRESET}",gpu="0",worker="{WORKER}"'
        return (
            f"# TYPE {m.WORKER_READY.name} gauge\n{m.WORKER_READY.name}{{{labels}}} 1\n"
            f"# TYPE fluxfleet_images counter\n"
            f'{m.IMAGES.name}{{{labels},outcome="generated"}} {self.generated}\n'
            f'{m.IMAGES.name}{{{labels},outcome="failed"}} 1\n'
            f"# TYPE fluxfleet_stage_duration_seconds summary\n"
            f'{m.STAGE_SECONDS.name}_sum{{{labels},stage="text_encoding"}} 0.5\n'
            f'{m.STAGE_SECONDS.name}_sum{{{labels},stage="denoising"}} {self.denoising_s}\n'
            f'{m.STAGE_SECONDS.name}_sum{{{labels},stage="vae_decode"}} 0.5\n'
            f'{m.STAGE_SECONDS.name}_sum{{{labels},stage="queue_wait"}} 50\n'
            f'{m.STAGE_SECONDS.name}_sum{{{labels},stage="upload"}} 3\n'
            f"# TYPE fluxfleet_image_duration_seconds summary\n"
            f"{m.IMAGE_SECONDS.name}_sum{{{labels}}} {self.end_to_end_s}\n"
            f"# TYPE {m.MEMORY_PEAK.name} gauge\n{m.MEMORY_PEAK.name}{{{labels}}} {14.5 * 2**30}\n"
        )


@pytest.fixture
def pages() -> Iterator[tuple[str, MetricsPages]]:
    state = MetricsPages()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self.reply(200, state.metrics().encode())
            elif self.path == "/secret":
                self.reply(200, f"{CANARY} is not a metrics line\n".encode())
            elif self.path == "/big":
                self.reply(200, b"# filler\n" * 20_000)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "file:///etc/hostname")
                self.end_headers()
            elif self.path.startswith("/slow"):
                self.send_response(200)
                self.end_headers()
                for _ in range(40):  # one byte every 0.1 s: each receive is quick, the whole page is not
                    self.wfile.write(b"#")
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self.reply(404, b"")

        def reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_fetch_reads_http_and_refuses_everything_else(pages: tuple[str, MetricsPages], tmp_path: Path) -> None:
    base, _ = pages
    canary_file = tmp_path / "canary.txt"
    canary_file.write_text(CANARY)
    # Given a real metrics page, it is read
    assert "fluxfleet_worker_ready" in fetch(f"{base}/metrics")
    # And any other scheme is refused before anything is opened
    for url in (f"file://{canary_file}", "ftp://127.0.0.1/x", f"data:text/plain,{CANARY}", "gopher://127.0.0.1/"):
        with pytest.raises(ScrapeError, match="only http and https"):
            fetch(url)
    with pytest.raises(ScrapeError, match="credentials"):
        fetch(base.replace("http://", "http://user:pw@") + "/metrics")
    # And a redirect is not followed (here to a file: URL)
    with pytest.raises(ScrapeError, match="HTTP 302"):
        fetch(f"{base}/redirect")
    # And the size and the time of one page are bounded
    with pytest.raises(ScrapeError, match="byte bound"):
        fetch(f"{base}/big", max_bytes=10_000)
    started = time.monotonic()
    with pytest.raises(ScrapeError, match="not read within"):
        fetch(f"{base}/slow", timeout_s=0.5)
    assert time.monotonic() - started < 2


@pytest.fixture
def fleet_env(redis_server: RedisServer, tmp_path: Path, pages: tuple[str, MetricsPages]) -> dict[str, str]:
    """A Redis with a job of the longest preset and, besides the real endpoint, hostile URLs advertised."""
    base, _ = pages
    canary_file = tmp_path / "canary.txt"
    canary_file.write_text(CANARY)
    (tmp_path / "store").mkdir()
    env = {"FLUXFLEET_BROKER__URL": redis_server.url, "FLUXFLEET_STORAGE__URL": f"file://{tmp_path / 'store'}"}
    settings = Settings().with_overrides(
        broker__url=env["FLUXFLEET_BROKER__URL"], storage__url=env["FLUXFLEET_STORAGE__URL"]
    )
    Client(settings).submit([f"a lighthouse {i}" for i in range(12)], preset=LONG_PRESET)
    redis_client(settings.broker).hset(
        m.endpoints_key(settings.broker.key_prefix),
        mapping={
            WORKER: f"{base}/metrics",
            "evil-file": f"file://{canary_file}",
            "evil-ftp": "ftp://127.0.0.1:1/pub",
            "evil-secret": f"{base}/secret",
            "evil-redirect": f"{base}/redirect",
        },
    )
    return env


def run_top(env: dict[str, str], *args: str) -> str:
    full = {**os.environ, **env, "COLUMNS": "80"}
    proc = subprocess.run([FLUXFLEET, "top", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_top_once_fits_80_columns_and_fetches_only_http(fleet_env: dict[str, str]) -> None:
    output = run_top(fleet_env, "--once")
    lines = output.splitlines()
    # The worker, the long preset and the job id are whole; nothing is cut or wider than 80 columns
    assert any(line.startswith(WORKER + " ") for line in lines), output
    assert any(LONG_PRESET + " " in line and line.startswith("20") for line in lines), output
    assert "…" not in output and max(len(line) for line in lines) <= 80, output
    # The seconds-per-image columns say what they measure
    assert "gen s/img 0.58" in output and "e2e s/img 5.00" in output
    assert " ".join(LEGEND.split()) in " ".join(output.split())
    # Other schemes are skipped with a note, redirects are not followed, no fetched text is shown
    assert CANARY not in output
    assert f"file://{Path(fleet_env['FLUXFLEET_STORAGE__URL'][7:]).parent / 'canary.txt'}" in output
    assert output.count("only http and https metrics URLs are read") == 2, output
    assert "HTTP 302" in output and "not a Prometheus metrics page" in output


def test_top_json_separates_generation_from_end_to_end(
    fleet_env: dict[str, str], pages: tuple[str, MetricsPages]
) -> None:
    # Given a worker that made 12 images: 7 s of pipeline stages, 60 s enqueue-to-stored
    settings = Settings().with_overrides(broker__url=fleet_env["FLUXFLEET_BROKER__URL"])
    _, state = pages
    fleet = Fleet(settings)
    first = {w.worker: w for w in fleet.snapshot().workers}[WORKER]
    assert first.generation_s_per_image == pytest.approx(7 / 12)
    assert first.end_to_end_s_per_image == pytest.approx(60 / 12)
    # When 4 more images take 2 s of denoising and 40 s end to end (a long queue wait)
    state.generated += 4
    state.denoising_s += 2
    state.end_to_end_s += 40
    workers = fleet.snapshot().workers
    second = {w.worker: w for w in workers}
    # Then the rates are those of the 4 new images, and the hostile URLs are skipped, never read
    assert second[WORKER].generation_s_per_image == pytest.approx(0.5)
    assert second[WORKER].end_to_end_s_per_image == pytest.approx(10.0)
    skipped = [w for w in workers if w.state == "skipped"]
    assert len(skipped) == 2 and all("only http and https" in w.error for w in skipped)


def test_top_without_a_terminal_prints_a_snapshot_each_interval(fleet_env: dict[str, str]) -> None:
    full = {**os.environ, **fleet_env, "COLUMNS": "80"}
    proc = subprocess.Popen(
        [FLUXFLEET, "top", "--interval", "0.3"], cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        time.sleep(4)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    text = stdout.decode()
    assert proc.returncode == 0, stderr.decode()
    assert text.count("fluxfleet top ") >= 2, text
    assert text.count(WORKER) >= 2 and "\x1b" not in text, text


def test_the_workers_table_keeps_names_and_numbers_whole_at_80_columns() -> None:
    from rich.console import Console

    from producer.top import Snapshot, WorkerView, render

    def shown(worker: str) -> str:
        view = WorkerView(url="http://127.0.0.1:9400/metrics", worker=worker, state="ready", generated=1234,
                          images_per_min=98.5, generation_s_per_image=0.61, end_to_end_s_per_image=12.25,
                          memory_bytes=16.15 * 2**30, peak_bytes=18.53 * 2**30)  # fmt: skip
        console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the console
        console.print(render(Snapshot(0.0, [view], [], [])))
        return console.export_text()

    # A short name: one table row, headers wrapped at their spaces, every number whole
    short = shown("tiny-gpu0@vm")
    row = next(line for line in short.splitlines() if line.startswith("tiny-gpu0@vm "))
    assert row.split() == ["tiny-gpu0@vm", "ready", "98.5", "0.61", "12.25", "1234", "0", "16.15", "18.53"]
    assert "…" not in short and max(len(line) for line in short.splitlines()) <= 80
    # A name too long for a row beside the numbers: a block per worker, the name on its own line
    long = shown(WORKER)
    assert f"{WORKER}  ready" in long.splitlines()
    assert "gen s/img 0.61" in long and "e2e s/img 12.25" in long and "1234 images" in long
    assert "…" not in long and max(len(line) for line in long.splitlines()) <= 80


def test_slow_endpoints_cost_one_timeout_per_refresh_not_one_each(
    redis_server: RedisServer, pages: tuple[str, MetricsPages]
) -> None:
    # Given three advertised endpoints that trickle their pages too slowly to be read
    base, _ = pages
    settings = Settings().with_overrides(broker__url=redis_server.url)
    key = m.endpoints_key(settings.broker.key_prefix)
    redis_client(settings.broker).hset(key, mapping={f"slow-{i}": f"{base}/slow?{i}" for i in range(3)})
    # When top takes a snapshot
    started = time.monotonic()
    workers = Fleet(settings).snapshot().workers
    elapsed = time.monotonic() - started
    # Then each is reported as too slow, and they were read side by side (one 2 s bound, not three)
    assert [w.state for w in workers] == ["down"] * 3
    assert all("not read within 2 s" in w.error for w in workers), [w.error for w in workers]
    assert elapsed < 2 * SCRAPE_TIMEOUT_S, elapsed
