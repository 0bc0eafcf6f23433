"""``fluxfleet exporter``, ``fluxfleet top`` and ``fluxfleet report``: watching a fleet and its jobs.

Registered on the main app by the import at the bottom of ``producer/cli.py``.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.live import Live

from fluxfleet.errors import FluxfleetError
from fluxfleet.keys import manifest_key
from fluxfleet.schema import ItemRecord
from fluxfleet.settings import Settings
from fluxfleet.storage import open_storage
from producer.cli_common import app, console, err
from producer.extras import needs_extra


@app.command()
def exporter(
    port: Annotated[int, typer.Option(help="port for /metrics")] = 9808,
    address: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    queue: Annotated[list[str] | None, typer.Option(help="extra queue to report (presets' queues always are)")] = None,
) -> None:
    """Serve queue depth and oldest-unacknowledged age per queue, read from Redis on each scrape."""
    from producer.exporter import serve_exporter

    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = serve_exporter(Settings(), port=port, address=address, queues=queue or [])
    except OSError as e:
        err.print(f"[red]error:[/red] cannot listen on {address}:{port}: {e}")
        raise typer.Exit(2) from e
    console.print(f"queue exporter on http://{address}:{port}/metrics")
    stop.wait()
    server.shutdown()


@app.command()
def top(
    worker: Annotated[list[str] | None, typer.Option(help="metrics URL of a worker not advertised in Redis")] = None,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0,
    jobs: Annotated[int, typer.Option(help="recent jobs to show")] = 5,
    once: Annotated[bool, typer.Option(help="print one snapshot and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON snapshot (rates need two reads)")] = False,
) -> None:
    """Live view of workers, queues and jobs, from the workers' metrics endpoints and Redis.

    Without a terminal (piped, or in a log) it prints a plain snapshot every INTERVAL seconds instead.
    """
    from producer.top import Fleet, render

    fleet = Fleet(Settings(), extra_urls=worker or [], jobs=jobs)
    try:
        if once or as_json:
            snapshot = fleet.snapshot()
            if once and as_json is False:
                console.print(render(snapshot))
                return
            time.sleep(min(interval, 1.0))
            snapshot = fleet.snapshot()
            print(json.dumps(snapshot.as_dict()))
            return
        if not console.is_terminal:
            # A Live display draws nothing until it stops when there is no terminal: print snapshots.
            while True:
                snapshot = fleet.snapshot()
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.at))
                console.print(f"fluxfleet top {stamp}", markup=False, highlight=False)
                console.print(render(snapshot))
                console.print()
                console.file.flush()
                time.sleep(interval)
        with Live(render(fleet.snapshot()), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(fleet.snapshot()))
    except KeyboardInterrupt:
        return
    except FluxfleetError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e


def _records(settings: Settings, job_id: str) -> tuple[list[ItemRecord], float | None]:
    """The job's manifest lines from storage, else its records in Redis; and its submit time if known."""
    from fluxfleet.jobs import JobStore

    storage = open_storage(settings.storage)
    created: float | None = None
    try:
        text = storage.get(manifest_key(job_id)).decode()
        # Lines end at \n only: JSON keeps U+2028 or U+0085 of a prompt raw, and splitlines() would cut there.
        records = [ItemRecord.model_validate_json(line) for line in text.split("\n") if line.strip()]
    except KeyError:
        records = []
    try:
        store = JobStore.from_settings(settings.broker)
        status = store.status(job_id)
        created = status.created_at if status else None
        if not records:
            records = store.records(job_id)
    except Exception:  # Redis down or the job unknown there: the manifest alone is enough
        if not records:
            raise
    return records, created


@app.command()
@needs_extra("report")
def report(
    job_id: str,
    out: Annotated[Path, typer.Option(help="directory for the PNGs")] = Path("report"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Contact sheet (seed and prompt start under each image) and timing plots of a job."""
    from producer.report import write_report

    settings = Settings()
    try:
        records, created = _records(settings, job_id)
    except Exception as e:
        err.print(f"[red]error:[/red] cannot read job {job_id}: {e}")
        raise typer.Exit(1) from e
    if not records:
        err.print(f"[red]error:[/red] job {job_id} has no stored images (unknown job, or nothing finished yet)")
        raise typer.Exit(1)
    try:
        result = write_report(records, open_storage(settings.storage), out, started_at=created)
    except RuntimeError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    console.print(f"report for job {job_id} ({result.images} images):")
    for path in (result.contact_sheet, result.throughput, result.seconds_per_image):
        console.print(f"  {path}")
