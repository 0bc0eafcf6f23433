"""``make demo``: a real batch through a private Redis, one Celery worker and local storage."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from fluxfleet.settings import Settings
from producer.client import Client
from producer.stack import LocalStack

# soft_wrap: paths and URLs stay on one line whatever the width, so they can be copied.
console = Console(soft_wrap=True)


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so the ``with`` blocks stop every process we started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_demo(*, prompts: Path, output: Path, model_dir: Path, preset: str = "tiny") -> int:
    if not (model_dir / "model_index.json").is_file():
        console.print(f"building the tiny FLUX pipeline in {model_dir} …")
        subprocess.run([sys.executable, "-m", "workers.tools.tiny_model", str(model_dir)], check=True)
    _stop_on_sigterm()
    output = output.resolve()
    env = {
        "FLUXFLEET_MODEL_DIR": str(model_dir.resolve()),
        "FLUXFLEET_STORAGE__URL": f"file://{output}",
        "FLUXFLEET_WORKER__DEVICE": "cpu",
    }
    with LocalStack(env=env) as stack:
        redis = stack.start_redis()
        console.print(f"redis-server on {redis.url}")
        worker = stack.start_worker(preset)
        started = time.perf_counter()
        worker.wait_ready()
        console.print(f"worker ready in {time.perf_counter() - started:.1f} s (log: {worker.log_path})")
        settings = Settings().with_overrides(
            broker__url=redis.url, storage__url=env["FLUXFLEET_STORAGE__URL"], model_dir=env["FLUXFLEET_MODEL_DIR"]
        )
        client = Client(settings)
        job = client.submit(prompts, preset=preset)
        console.print(f"submitted job {job.id}: {job.status().total} images from {prompts}")
        status = job.wait(progress=True, timeout=600)
        records = job.results()
        elapsed = (status.finished_at or time.time()) - status.created_at
        generated = [r for r in records if not r.skipped]
        console.print(
            f"[bold]{status.state}[/bold]: {status.done} images ({len(generated)} generated, "
            f"{status.skipped} already stored), {status.failed} failed"
        )
        if status.skipped:
            console.print("  (the same prompts and seeds map to the same keys: stored images are not made again)")
        if generated:
            per_image = elapsed / len(generated)
            console.print(f"  {len(generated) / elapsed:.2f} images/s, {per_image:.3f} s per image end to end")
        console.print(f"  images:   {output / 'images'}")
        console.print(f"  manifest: {job.manifest_location()}")
        return 0 if status.failed == 0 and status.state == "done" else 1
