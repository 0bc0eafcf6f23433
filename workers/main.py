"""``python -m workers.main --preset NAME --gpu N``: one worker process owning one GPU.

``CUDA_VISIBLE_DEVICES`` is set before anything can import torch, and this parent process never
touches CUDA: the pipeline loads in the pool child, which Celery forks. The parent does import torch
before forking (:func:`preload_libraries`), so that a child, the first one or a replacement, starts with
it already imported (~5 s on the GPU hosts).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("workers")

CHATTY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
"""Libraries that log routine steps at INFO (botocore: "Found credentials in environment variables"): a
worker shows their warnings and errors, and the rest only at DEBUG."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fluxfleet worker", description=__doc__)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--gpu", default=None, help="GPU index (or indices, comma-separated) to own")
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--loglevel", default=os.environ.get("FLUXFLEET_LOGLEVEL", "INFO"))
    return parser.parse_args(argv)


def preload_libraries() -> None:
    """Import torch in the parent, leaving the CUDA driver untouched for the child.

    Only torch: importing diffusers' Flux pipeline here left CUDA initialised (seen on an H100): diffusers
    imports bitsandbytes when it is installed, and bitsandbytes asks for the GPU's compute capability at
    import. A forked child could not initialise CUDA again.
    """
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError("the worker parent initialised CUDA before forking; the pool child could not use it")


def warn_if_importing_from_source(packages: tuple[str, ...] = ("torch", "diffusers", "transformers")) -> list[str]:
    """Warn when the heavy libraries have no bytecode cache: every start would then compile them from source.

    On the H100 host (``PYTHONDONTWRITEBYTECODE=1``, packages installed with ``--no-compile``) that made
    ``import torch`` 4.4-5.1 s instead of 2.6 s and diffusers' Flux pipeline 24-26 s instead of 12-14 s
    (benchmarks/results/2026-11-23-H100-import-bytecode.log).
    Returns the packages without bytecode.
    """
    import importlib.util

    missing = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        source = spec.origin if spec is not None else None
        if source and source.endswith(".py") and not os.path.exists(importlib.util.cache_from_source(source)):
            missing.append(package)
    if missing:
        logger.warning(
            "no bytecode cache for %s: each worker start compiles their Python sources (seconds per start)."
            " Install with pip's default bytecode compilation, run `python -m compileall` over site-packages,"
            " or point PYTHONPYCACHEPREFIX at a writable directory and unset PYTHONDONTWRITEBYTECODE",
            ", ".join(missing),
        )
    return missing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    from fluxfleet.errors import FluxfleetError
    from fluxfleet.jobs import JobStore
    from fluxfleet.keys import queue_name
    from fluxfleet.presets import load_preset
    from fluxfleet.settings import Settings, check_time_limits
    from fluxfleet.storage import open_storage
    from fluxfleet.webhooks import start_dispatcher
    from workers.pipeline.loading import check_model_source
    from workers.service.app import build_app, runtime
    from workers.service.identity import worker_name
    from workers.service.metrics import setup_metrics
    from workers.service.pool import FleetTaskPool

    try:
        settings = Settings().with_overrides(worker__gpu=args.gpu, worker__metrics_port=args.metrics_port)
        check_time_limits(settings)
        preset = load_preset(args.preset, settings.presets_dir)
        check_model_source(preset.model_source(settings))
        storage = open_storage(settings.storage)
        storage.check()
        jobs = JobStore.from_settings(settings.broker)
        jobs.ping()
        setup_metrics(settings, preset)  # before Celery forks: the endpoint lives in this parent
    except FluxfleetError as e:
        logger.error("worker refuses to start: %s", e)
        return 2

    warn_if_importing_from_source()
    preload_libraries()
    failure = Path(tempfile.mkstemp(prefix="fluxfleet-worker-", suffix=".failure")[1])
    runtime.failure_file = failure
    # Completion webhooks go out from this parent, never from the child generating: a slow receiver never
    # holds up an image, and a recycled child never cuts a delivery short.
    webhooks = start_dispatcher(settings, jobs, storage)
    try:
        app = build_app(settings, preset)
        worker = app.Worker(
            pool=FleetTaskPool,  # prefork, replacing a pool child lost before Redis first answers
            concurrency=1,
            queues=[queue_name(preset.name)],
            hostname=worker_name(preset, settings.worker.gpu),
            loglevel=args.loglevel.upper(),
            without_gossip=True,
            without_mingle=True,
        )
        worker.start()
        reason = failure.read_text().strip()
        if reason:
            logger.error("worker stopped: %s", reason)
            return 3
        return int(worker.exitcode or 0)
    finally:
        failure.unlink(missing_ok=True)
        if webhooks is not None:
            webhooks.stop(timeout_s=settings.webhook.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
