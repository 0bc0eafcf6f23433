"""The ``fluxfleet`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fluxfleet.errors import FluxfleetError
from fluxfleet.input_images import DEFAULT_STRENGTH
from fluxfleet.settings import Settings
from fluxfleet.webhooks import delivery_summary, describe_delivery
from producer.cli_common import _fail, _plain, app, console, err
from producer.client import Client
from producer.extras import needs_extra


def _client() -> Client:
    return Client(Settings())


class _Failures:
    """``with _Failures():`` turns an expected failure (fluxfleet's errors, a timeout, Redis unreachable or
    refusing the password) into ``_fail``'s sentence and exit 1; anything else is a bug and keeps its traceback."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings

    def __enter__(self) -> _Failures:
        return self

    def __exit__(self, _type: type[BaseException] | None, e: BaseException | None, _tb: object) -> None:
        from fluxfleet.broker import is_broker_failure

        if isinstance(e, FluxfleetError | TimeoutError) or (isinstance(e, Exception) and is_broker_failure(e)):
            raise _fail(e, settings=self.settings) from e


PATIENCE_HELP = "seconds a wait keeps retrying through a Redis outage (a restart) before it gives up"


def _status_dict(client: Client, job_id: str) -> dict[str, Any]:
    status = client.job(job_id).status()
    webhook = delivery_summary(client.jobs, job_id) if status.state != "lost" else None
    return {**status.model_dump(), "finished": status.finished, "webhook": webhook}


@app.command()
def submit(
    prompts: Annotated[Path | None, typer.Argument(help=".txt (one prompt a line), .jsonl or .csv")] = None,
    preset: Annotated[str | None, typer.Option(help="worker preset; see `fluxfleet presets`")] = None,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: Annotated[int, typer.Option(help="job seed; items without a seed derive theirs from it")] = 0,
    images_per_prompt: int = 1,
    max_sequence_length: int | None = None,
    cache: Annotated[
        str | None,
        typer.Option(help="step caching for items without their own: none, magcache[:THRESHOLD], fbcache, taylorseer"),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="LoRA adapter SOURCE[@SCALE] for items without their own (repeatable, up to 4)"),
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="image-to-image input for items without their own: a path, s3:// or http(s) URL")
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(help=f"image-to-image strength (0 < s <= 1) for items with an image; default {DEFAULT_STRENGTH}"),
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="a stable id makes resubmission a no-op")] = None,
    resume: Annotated[str | None, typer.Option(help="re-enqueue the missing items of this job")] = None,
    wait: Annotated[bool, typer.Option(help="wait with a progress bar")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    broker_patience: Annotated[float, typer.Option(help=PATIENCE_HELP)] = 60.0,
    webhook: Annotated[
        str | None, typer.Option(help="http(s) URL that gets one signed JSON POST when the job ends")
    ] = None,
) -> None:
    """Validate a prompts file and enqueue it as one job."""
    with _Failures():
        client = _client()
        if resume:
            tasks, items = client.resume_items(resume)
            console.print(_plain(f"job {resume}: re-enqueued {items} missing item(s) in {tasks} task(s)"))
            job_id = resume
        else:
            if prompts is None or preset is None:
                raise FluxfleetError("submit needs a prompts file and --preset (or --resume JOB)")
            started = time.perf_counter()
            job = client.submit(
                prompts,
                preset=preset,
                job_id=job_id,
                seed=seed,
                images_per_prompt=images_per_prompt,
                width=width,
                height=height,
                steps=steps,
                guidance=guidance,
                max_sequence_length=max_sequence_length,
                cache=cache,
                image=image,
                strength=strength,
                adapters=adapter or None,
                webhook=webhook,
            )
            job_id = job.id
            status = job.status()
            if as_json:
                print(json.dumps({"job_id": job.id, "total": status.total, "already_submitted": job.already_submitted}))
            elif job.already_submitted:
                console.print(
                    _plain(
                        f"job {job.id} was already submitted ({status.state}, "
                        f"{status.finished}/{status.total}); nothing enqueued"
                    )
                )
            else:
                took = time.perf_counter() - started
                console.print(_plain(f"submitted job {job.id}: {status.total} images in {took:.2f} s"))
        if wait:
            # Waits out a Redis restart (the workers survive one too) for a bounded time; see Job.wait.
            final = client.job(job_id).wait(progress=not as_json, patience_s=broker_patience)
            _print_summary(client, job_id, final.model_dump())


def _print_summary(client: Client, job_id: str, status: dict[str, Any]) -> None:
    records = client.job(job_id).results()
    elapsed = (status.get("finished_at") or time.time()) - status["created_at"]
    generated = [r for r in records if not r.skipped]
    console.print(
        _plain(
            f"job {job_id}: {status['state']} — {status['done']} images ({status['skipped']} already stored), "
            f"{status['failed']} failed, {status['cancelled']} cancelled"
        )
    )
    if generated and elapsed > 0:
        per_image = sum(r.timings.generate_s for r in generated) / len(generated)
        console.print(
            f"  {len(generated) / elapsed:.2f} images/s over {elapsed:.1f} s; "
            f"{per_image:.3f} s per image in the pipeline"
        )
    console.print(f"  manifest: {_plain(client.job(job_id).manifest_location())}")
    if records:
        first = records[0].location
        images_dir = Path(first).parent.parent if first.startswith("/") else first.rsplit("/", 2)[0]
        console.print(f"  images:   {_plain(images_dir)}")


@app.command()
def status(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Progress of a job, from fluxfleet's own records."""
    with _Failures():
        data = _status_dict(_client(), job_id)
    if as_json:
        print(json.dumps(data))
        return
    missing = f", {data['missing']} missing" if data.get("missing") else ""
    console.print(
        _plain(
            f"job {job_id} [{data['state']}]: {data['finished']}/{data['total']} finished — "
            f"{data['done']} done ({data['skipped']} already stored), {data['failed']} failed, "
            f"{data['cancelled']} cancelled{missing}"
        )
    )
    if data["webhook"]:
        console.print(_plain(describe_delivery(data["webhook"])))


@app.command()
def wait(
    job_id: str,
    timeout: float | None = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    broker_patience: Annotated[float, typer.Option(help=PATIENCE_HELP)] = 60.0,
) -> None:
    """Wait for a job with a progress bar; exits 1 if any item failed."""
    with _Failures():
        client = _client()
        final = client.job(job_id).wait(progress=not as_json, timeout=timeout, patience_s=broker_patience)
        if as_json:
            print(final.model_dump_json())
        else:
            _print_summary(client, job_id, final.model_dump())
    if final.failed:
        raise typer.Exit(1)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job: queued items are not generated; finished ones stay. A finished job is left as it is."""
    with _Failures():
        status = _client().job(job_id).cancel()
    progress = f"{status.finished}/{status.total} finished"
    if status.state == "cancelled":
        console.print(_plain(f"job {job_id} cancelled ({progress})"))
    else:
        console.print(_plain(f"job {job_id} is already {status.state} ({progress}); nothing to cancel"))


@app.command()
def results(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = True) -> None:
    """The job's manifest lines (one JSON object per stored image) and failures."""
    with _Failures():
        job = _client().job(job_id)
        records, failures = job.results(), job.failures()  # an unknown job is an error, not empty output
    for record in records:
        print(record.model_dump_json())
    for failure in failures:
        err.print(_plain(f"failed: item {failure.index} ({failure.key}): {failure.reason}"), highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@needs_extra("worker")
def worker(
    preset: Annotated[str, typer.Option()],
    gpu: Annotated[str, typer.Option(help="GPU index (pinned via CUDA_VISIBLE_DEVICES before torch loads)")] = "0",
    metrics_port: int | None = None,
) -> None:
    """Run one worker process that owns one GPU (replaces this process)."""
    args = [sys.executable, "-m", "workers.main", "--preset", preset, "--gpu", gpu]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.execv(sys.executable, args)


@app.command("make-tiny-model")
@needs_extra("worker")
def make_tiny_model(directory: Path) -> None:
    """Build the tiny random-weight FLUX pipeline (for tests and the demo) into DIRECTORY."""
    import subprocess

    code = subprocess.call([sys.executable, "-m", "workers.tools.tiny_model", str(directory)])
    raise typer.Exit(code)


@app.command()
@needs_extra("worker")
def demo(
    prompts: Path = Path("examples/prompts.txt"),
    output: Path = Path("outputs"),
    model_dir: Path = Path(".cache/tiny-flux"),
) -> None:
    """Run a real batch on this machine: private Redis, one worker, the tiny model, local storage."""
    from producer.demo import run_demo

    raise typer.Exit(run_demo(prompts=prompts, output=output, model_dir=model_dir))


# Command modules register themselves on `app` (producer.cli_common).
from producer import cli_compare, cli_fleet, cli_models, cli_observe  # noqa: E402, F401


def main() -> None:
    try:
        app()
    except FluxfleetError as e:
        # What a command did not catch itself (settings that do not load, most often): one sentence, no
        # traceback. Exit 2, like click's usage errors: the command never ran.
        raise SystemExit(_fail(e, code=2).exit_code) from None


if __name__ == "__main__":
    # Under `python -m producer.cli` this file runs as __main__, a second copy of the module;
    # run the imported one, whose app has every command registered.
    from producer.cli import main as registered_main

    registered_main()
