"""Running one task through a worker's ``Engine`` in the test process, without Celery."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fluxfleet.schema import TaskPayload
    from workers.tasks.engine import TaskOutcome


def run_task(task: TaskPayload, **engine_args: Any) -> TaskOutcome:
    """Run ``task`` on an ``Engine`` built from ``engine_args`` (generate, preset, model, settings, storage,
    jobs) and stop its upload threads afterwards, whatever happened."""
    from workers.tasks.engine import Engine

    engine = Engine(worker_name="test-worker", gpu="0", **engine_args)
    try:
        return engine.run(task)
    finally:
        engine.uploads.shutdown()
