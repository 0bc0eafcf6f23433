"""``fluxfleet up``: run a whole host's fleet in the foreground until Ctrl-C or SIGTERM.

Registered on the main app by the import at the bottom of ``producer/cli.py``.
"""

from __future__ import annotations

import enum
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.table import Table

from fluxfleet.errors import FluxfleetError
from fluxfleet.jobs import JobStore
from fluxfleet.presets import load_preset
from fluxfleet.redaction import redact
from fluxfleet.settings import Settings, check_time_limits
from producer.cli_common import _fail, _plain, app, console, err
from producer.extras import needs_extra
from producer.up import BROKER_ENV, Fleet, group_gpus, plan_workers, select_gpus, shutdown_grace, tail

POLL_S = 0.5


class Device(enum.StrEnum):
    cuda = "cuda"
    cpu = "cpu"


@app.command()
@needs_extra("worker")
def up(
    preset: Annotated[str, typer.Option(help="worker preset; see `fluxfleet presets`")],
    gpus: Annotated[str, typer.Option(help="'all' (nvidia-smi or CUDA_VISIBLE_DEVICES) or indices: 0,1")] = "all",
    device: Annotated[Device, typer.Option(help="'cpu' runs --workers CPU workers (testing)")] = Device.cuda,
    workers: Annotated[int, typer.Option(help="number of CPU workers (with --device cpu)")] = 1,
    gpus_per_worker: Annotated[int, typer.Option(help="GPUs one worker spreads its pipeline over")] = 1,
    metrics_base_port: Annotated[int, typer.Option(help="worker i serves metrics on base+i; 0 turns off")] = 9400,
    redis_port: Annotated[int, typer.Option(help=f"local Redis port when {BROKER_ENV} is unset; 0 picks one")] = 6379,
    state_dir: Annotated[Path, typer.Option(help="Redis data (AOF), worker logs, fleet.json")] = Path(
        ".cache/fluxfleet-up"
    ),
    grace: Annotated[
        float | None, typer.Option(help="seconds a stopping worker may finish its task; default: time limit + 30")
    ] = None,
    ready_timeout: Annotated[float, typer.Option(help="seconds to wait for every worker's warm-up")] = 3600,
) -> None:
    """Start one worker per GPU (plus a local Redis when no broker is configured); Ctrl-C stops them all."""
    try:
        settings = Settings()
        check_time_limits(settings)
        load_preset(preset, settings.presets_dir)
        if device is Device.cpu:
            specs = plan_workers(gpu_groups=None, cpu_workers=workers, metrics_base_port=metrics_base_port)
        else:
            groups = group_gpus(select_gpus(gpus), gpus_per_worker)
            specs = plan_workers(gpu_groups=groups, metrics_base_port=metrics_base_port)
        if BROKER_ENV in os.environ:
            # A broker that is down or refuses the password: one sentence now, not N workers' log tails.
            JobStore.from_settings(settings.broker).ping()
    except FluxfleetError as e:
        raise _fail(e, 2) from e
    password = settings.broker.password
    fleet = Fleet(
        preset,
        specs,
        state_dir=state_dir,
        redis_port=None if BROKER_ENV in os.environ else redis_port,
        # A password set without a broker URL protects the Redis started here: `requirepass`.
        redis_password=password.get_secret_value() if password else None,
    )
    grace_s = grace or shutdown_grace(settings.worker.task_time_limit_s)
    raise typer.Exit(supervise(fleet, grace=grace_s, ready_timeout=ready_timeout))


def supervise(fleet: Fleet, *, grace: float, ready_timeout: float) -> int:
    """Start the fleet, report readiness and exits, stop everything on the first signal (SIGKILL on the second)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            err.print("second signal: killing workers now")
            fleet.kill_now.set()
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        if fleet.redis_port is not None:
            redis = fleet.start_redis()
            auth = ", password required" if fleet.redis_password else ""
            console.print(_plain(f"redis-server (AOF on{auth}) at {redis.url}; data in {redis.directory}"))
            also = f" (and {BROKER_ENV.replace('URL', 'PASSWORD')})" if fleet.redis_password else ""
            console.print(_plain(f"  producers on this host: export {BROKER_ENV}={redis.url}{also}"))
        else:
            console.print(_plain(f"broker: {fleet.broker_url} (from {BROKER_ENV})"))
        fleet.start_workers()
        console.print(workers_table(fleet))
        code = watch(fleet, stop, ready_timeout)
    except (FluxfleetError, RuntimeError) as e:
        _fail(e)
        code = 1
    finally:
        console.print(f"stopping {len(fleet.workers)} worker(s) (grace {grace:.0f} s; Ctrl-C again kills)")
        codes = fleet.stop(grace)
        console.print(_plain("stopped: " + ", ".join(f"{name} exit {rc}" for name, rc in codes.items())))
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def watch(fleet: Fleet, stop: threading.Event, ready_timeout: float) -> int:
    """Poll until a stop signal; report each worker once when ready and once when it exits."""
    ready: set[str] = set()
    waited = 0.0
    while not stop.wait(POLL_S):
        waited += POLL_S
        for worker in fleet.workers:
            if worker.spec.name not in ready and worker.ready:
                ready.add(worker.spec.name)
                console.print(_plain(f"worker {worker.spec.name} ready"))
                if len(ready) == len(fleet.workers):
                    console.print(f"all {len(ready)} workers ready")
        for worker in fleet.newly_exited():
            err.print(f"[red]worker {_plain(worker.spec.name)} exited with code {worker.returncode}[/red]; log tail:")
            err.print(redact(tail(worker)), markup=False, highlight=False)
        if all(w.returncode is not None for w in fleet.workers):
            err.print("[red]every worker has exited[/red]")
            return 1
        if fleet.redis and fleet.redis.process and fleet.redis.process.poll() is not None:
            err.print(f"[red]redis-server exited[/red]; see {_plain(fleet.redis.directory / 'redis.log')}")
            return 1
        if waited > ready_timeout and len(ready) < len(fleet.workers):
            err.print(f"[yellow]workers not ready after {ready_timeout:.0f} s[/yellow]")
            waited = float("-inf")  # warn once
    return 0


def workers_table(fleet: Fleet) -> Table:
    table = Table("worker", "pinned to", "metrics port", "pid", caption=_plain(f"logs: {fleet.state_dir / 'logs'}"))
    for w in fleet.workers:
        table.add_row(
            _plain(w.spec.name),
            _plain(f"GPU {w.spec.gpu}") if w.spec.gpu is not None else "cpu",
            str(w.spec.metrics_port or "-"),
            str(w.process.pid if w.process else "-"),
        )
    return table
