"""``fluxfleet up``: one worker per GPU on this host, plus a local Redis when no broker is configured.

Decide, then apply: ``select_gpus`` and ``plan_workers`` are pure functions of strings and numbers
(table-tested without a GPU); ``Fleet`` starts, watches and stops the processes they describe.

GPU discovery never initialises CUDA here: it reads ``CUDA_VISIBLE_DEVICES`` or asks ``nvidia-smi``,
because each worker's Celery parent forks its pool child and a CUDA context in a forking parent breaks
the child ("Cannot re-initialize CUDA in forked subprocess").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluxfleet.errors import ConfigurationError
from fluxfleet.redaction import redact, redact_url
from producer.stack import RedisServer, WorkerProcess

logger = logging.getLogger(__name__)

BROKER_ENV = "FLUXFLEET_BROKER__URL"
SHUTDOWN_MARGIN_S = 30.0
"""Seconds added to the task time limit before SIGKILL: the pool child still drains uploads and acks."""


class NoGpuError(ConfigurationError):
    """Raised when ``--gpus all`` finds no GPU (no nvidia-smi, no device, or CUDA_VISIBLE_DEVICES hides all)."""


# -- decide: which GPUs, which workers ---------------------------------------------------------------


def nvidia_smi_indices() -> list[str]:
    """GPU indices as ``nvidia-smi`` lists them; talks to the driver, not to CUDA."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError as e:
        raise NoGpuError(
            "no GPU found: `nvidia-smi` is not installed; name GPUs with --gpus 0,1 or test on the CPU with "
            "--device cpu --workers N"
        ) from e
    if out.returncode != 0:
        raise NoGpuError(f"no GPU found: nvidia-smi failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    indices = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if not indices:
        raise NoGpuError("no GPU found: nvidia-smi lists no device; test on the CPU with --device cpu --workers N")
    return indices


def visible_devices(value: str) -> list[str]:
    """Devices named by a ``CUDA_VISIBLE_DEVICES`` value; CUDA stops at the first invalid (negative) entry."""
    devices: list[str] = []
    for token in (t.strip() for t in value.split(",")):
        if not token or token.startswith("-"):
            break
        devices.append(token)
    return devices


def discover_gpus(environ: Mapping[str, str], query: Callable[[], list[str]] = nvidia_smi_indices) -> list[str]:
    """Every GPU this host lets us use: ``CUDA_VISIBLE_DEVICES`` when set (it already restricts us), else nvidia-smi."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        value = environ["CUDA_VISIBLE_DEVICES"]
        devices = visible_devices(value)
        if not devices:
            raise NoGpuError(f"no GPU found: CUDA_VISIBLE_DEVICES={value!r} hides every GPU")
        return devices
    return query()


def parse_gpu_list(spec: str) -> list[str]:
    """``"0,1, 3"`` -> ``["0", "1", "3"]``: non-negative indices, no repeats."""
    gpus = [t.strip() for t in spec.split(",")]
    if not spec.strip() or any(not t for t in gpus):
        raise ConfigurationError(f"--gpus {spec!r}: expected 'all' or comma-separated indices like 0,1")
    for token in gpus:
        if not token.isdigit():
            raise ConfigurationError(f"--gpus {spec!r}: {token!r} is not a GPU index")
    repeated = sorted({t for t in gpus if gpus.count(t) > 1})
    if repeated:
        raise ConfigurationError(f"--gpus {spec!r}: GPU {','.join(repeated)} named twice (one worker owns a GPU)")
    return gpus


def select_gpus(
    spec: str, environ: Mapping[str, str] | None = None, query: Callable[[], list[str]] = nvidia_smi_indices
) -> list[str]:
    """The GPUs ``--gpus`` names: ``all`` discovers them, anything else is parsed."""
    if spec.strip().lower() == "all":
        return discover_gpus(os.environ if environ is None else environ, query)
    return parse_gpu_list(spec)


def group_gpus(gpus: list[str], per_worker: int) -> list[str]:
    """GPUs per worker, as ``--gpu`` values: ``["0","1","2","3"], 2`` -> ``["0,1", "2,3"]``.

    More than one GPU per worker is for a preset that does not fit one (``device_map="balanced"``).
    """
    if per_worker < 1:
        raise ConfigurationError("--gpus-per-worker must be at least 1")
    if not gpus or len(gpus) % per_worker:
        raise ConfigurationError(f"{len(gpus)} GPU(s) cannot be split into groups of {per_worker}")
    return [",".join(gpus[i : i + per_worker]) for i in range(0, len(gpus), per_worker)]


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process to start: its label, GPU(s) to pin, metrics port and extra environment."""

    name: str
    gpu: str | None
    metrics_port: int | None
    env: dict[str, str] = field(default_factory=dict)


def plan_workers(
    *,
    gpu_groups: list[str] | None,
    cpu_workers: int = 0,
    metrics_base_port: int = 9400,
    cpu_count: int | None = None,
) -> list[WorkerSpec]:
    """One spec per GPU group, or ``cpu_workers`` CPU workers when ``gpu_groups`` is None.

    Metrics ports count up from the base (0 turns the endpoint off). Each worker gets an equal share of
    the cores as torch threads, since N processes each using every core would oversubscribe the CPU.
    """
    labels = [f"gpu{g.replace(',', '_')}" for g in gpu_groups] if gpu_groups is not None else []
    count = len(labels) if gpu_groups is not None else cpu_workers
    if count < 1:
        raise ConfigurationError("nothing to start: no GPU selected and --workers is below 1")
    threads = str(max(1, (cpu_count or os.cpu_count() or 1) // count))
    specs = []
    for i in range(count):
        port = metrics_base_port + i if metrics_base_port else None
        env = {"OMP_NUM_THREADS": threads}
        if gpu_groups is None:
            # A CPU worker sees no GPU at all, and its label stands where the GPU index would (records, metrics).
            env |= {"CUDA_VISIBLE_DEVICES": "", "FLUXFLEET_WORKER__DEVICE": "cpu", "FLUXFLEET_WORKER__GPU": f"cpu{i}"}
            specs.append(WorkerSpec(name=f"cpu{i}", gpu=None, metrics_port=port, env=env))
        else:
            specs.append(WorkerSpec(name=labels[i], gpu=gpu_groups[i], metrics_port=port, env=env))
    return specs


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- apply: start, watch, stop --------------------------------------------------------------------


class FleetWorker(WorkerProcess):
    """A worker started from a ``WorkerSpec``: ``--gpu`` only when pinned, ``--metrics-port`` when set."""

    def __init__(self, preset: str, spec: WorkerSpec, *, env: dict[str, str], log_path: Path, ready_file: Path):
        env = {**env, "FLUXFLEET_WORKER__READY_FILE": str(ready_file)}
        super().__init__(preset, gpu=spec.gpu or "", env=env, log_path=log_path)
        self.spec = spec
        self.ready_file = ready_file
        self.reported = False

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "workers.main", "--preset", self.preset]
        if self.spec.gpu is not None:
            args += ["--gpu", self.spec.gpu]
        if self.spec.metrics_port is not None:
            args += ["--metrics-port", str(self.spec.metrics_port)]
        return args

    def start(self) -> FleetWorker:
        # Started in its own session (WorkerProcess.start): a terminal's Ctrl-C reaches `up` only,
        # which then stops workers in order.
        self.ready_file.unlink(missing_ok=True)
        super().start()
        return self

    @property
    def ready(self) -> bool:
        return self.ready_file.exists()

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()


class Fleet:
    """The processes of ``fluxfleet up``: an optional local Redis and one worker per spec.

    ``state_dir`` holds ``redis/`` (the AOF survives restarts), ``logs/``, ``ready/`` and ``fleet.json``
    (pids and the broker URL, for scripts and tests).
    """

    def __init__(
        self,
        preset: str,
        specs: list[WorkerSpec],
        *,
        state_dir: Path,
        env: dict[str, str] | None = None,
        redis_port: int | None = None,
        redis_password: str | None = None,
    ) -> None:
        """``redis_password``: the local Redis requires it (the workers read it from the environment)."""
        self.preset = preset
        self.specs = specs
        self.state_dir = state_dir.resolve()
        self.env = dict(env or {})
        self.redis_port = redis_port
        self.redis_password = redis_password
        self.redis: RedisServer | None = None
        self.workers: list[FleetWorker] = []
        self.kill_now = threading.Event()

    @property
    def broker_url(self) -> str | None:
        """The broker's URL for messages and ``fleet.json``: a password in it is masked."""
        url = self.redis.url if self.redis else self.env.get(BROKER_ENV, os.environ.get(BROKER_ENV))
        return None if url is None else redact_url(url)

    def start_redis(self) -> RedisServer:
        if self.redis_port and port_in_use(self.redis_port):
            raise ConfigurationError(
                f"port {self.redis_port} is in use (a Redis already running?): set "
                f"{BROKER_ENV}=redis://127.0.0.1:{self.redis_port}/0 to use it, or pass --redis-port"
            )
        self.redis = RedisServer(
            port=self.redis_port or None,
            appendonly=True,
            directory=self.state_dir / "redis",
            password=self.redis_password,
        )
        self.redis.start()
        self.env[BROKER_ENV] = self.redis.url
        return self.redis

    def start_workers(self, specs: list[WorkerSpec] | None = None) -> list[FleetWorker]:
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        started = []
        for spec in specs if specs is not None else self.specs:
            worker = FleetWorker(
                self.preset,
                spec,
                env={**self.env, **spec.env},
                log_path=self.state_dir / "logs" / f"worker-{spec.name}.log",
                ready_file=self.state_dir / "ready" / spec.name,
            )
            self.workers.append(worker.start())
            started.append(worker)
        self.write_state()
        return started

    def write_state(self) -> None:
        state = {
            "preset": self.preset,
            "broker_url": self.broker_url,
            "redis_pid": self.redis.process.pid if self.redis and self.redis.process else None,
            "workers": [
                {**asdict(w.spec), "pid": w.process.pid if w.process else None, "log": str(w.log_path)}
                for w in self.workers
            ],
        }
        # No secret belongs here (the URL is masked); redact catches one that slipped into a path or env.
        (self.state_dir / "fleet.json").write_text(redact(json.dumps(state, indent=2)))

    def wait_ready(self, timeout: float, workers: list[FleetWorker] | None = None) -> None:
        """Until every worker has written its ready file; a worker that exits first is an error."""
        pending = list(workers if workers is not None else self.workers)
        deadline = time.monotonic() + timeout
        while pending:
            for worker in list(pending):
                if worker.ready:
                    pending.remove(worker)
                elif worker.returncode is not None:
                    raise RuntimeError(f"worker {worker.spec.name} exited with {worker.returncode}:\n{tail(worker)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout:.0f} s: {[w.spec.name for w in pending]}")
            time.sleep(0.2)

    def newly_exited(self) -> list[FleetWorker]:
        """Workers that exited since the last call (each is reported once)."""
        exited = [w for w in self.workers if not w.reported and w.returncode is not None]
        for worker in exited:
            worker.reported = True
        return exited

    def stop(self, grace: float) -> dict[str, int | None]:
        """SIGTERM every worker at once (Celery's warm shutdown finishes the running task), wait up to
        ``grace`` seconds in all, SIGKILL the rest, then stop Redis last so acknowledgements still land."""
        for worker in self.workers:
            worker.signal(signal.SIGTERM, whole_group=False)
        deadline = time.monotonic() + grace
        while any(w.returncode is None for w in self.workers):
            if time.monotonic() > deadline or self.kill_now.is_set():
                break
            time.sleep(0.2)
        codes: dict[str, int | None] = {}
        for worker in self.workers:
            if worker.returncode is None:
                logger.warning("worker %s still running after %.0f s: SIGKILL", worker.spec.name, grace)
                worker.signal(signal.SIGKILL)
            if worker.process is not None:
                worker.process.wait()
                # The pool child shares the parent's process group: none may outlive it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
            worker.ready_file.unlink(missing_ok=True)
            codes[worker.spec.name] = worker.returncode
        if self.redis:
            self.redis.stop()
        return codes


def tail(worker: WorkerProcess, chars: int = 2000) -> str:
    return worker.log()[-chars:]


def shutdown_grace(task_time_limit_s: float) -> float:
    """How long a stopping worker may take: its longest task plus the upload drain."""
    return task_time_limit_s + SHUTDOWN_MARGIN_S
