"""The ``fluxfleet`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fluxfleet.errors import FluxfleetError
from fluxfleet.settings import Settings
from producer.client import Client

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Distributed batch text-to-image generation.")
console = Console()
err = Console(stderr=True)


def _client() -> Client:
    return Client(Settings())


def _fail(e: Exception, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {e}")
    return typer.Exit(code)


def _status_dict(client: Client, job_id: str) -> dict[str, Any]:
    status = client.job(job_id).status()
    return {**status.model_dump(), "finished": status.finished}


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
    job_id: Annotated[str | None, typer.Option(help="a stable id makes resubmission a no-op")] = None,
    resume: Annotated[str | None, typer.Option(help="re-enqueue the missing items of this job")] = None,
    wait: Annotated[bool, typer.Option(help="wait with a progress bar")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Validate a prompts file and enqueue it as one job."""
    client = _client()
    try:
        if resume:
            tasks, items = client.resume_items(resume)
            console.print(f"job {resume}: re-enqueued {items} missing item(s) in {tasks} task(s)")
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
            )
            job_id = job.id
            status = job.status()
            if as_json:
                print(json.dumps({"job_id": job.id, "total": status.total, "already_submitted": job.already_submitted}))
            elif job.already_submitted:
                console.print(
                    f"job {job.id} was already submitted ({status.state}, "
                    f"{status.finished}/{status.total}); nothing enqueued"
                )
            else:
                console.print(f"submitted job {job.id}: {status.total} images in {time.perf_counter() - started:.2f} s")
        if wait:
            final = client.job(job_id).wait(progress=not as_json)
            _print_summary(client, job_id, final.model_dump())
    except FluxfleetError as e:
        raise _fail(e) from e


def _print_summary(client: Client, job_id: str, status: dict[str, Any]) -> None:
    records = client.job(job_id).results()
    elapsed = (status.get("finished_at") or time.time()) - status["created_at"]
    generated = [r for r in records if not r.skipped]
    console.print(
        f"job {job_id}: {status['state']} — {status['done']} images ({status['skipped']} already stored), "
        f"{status['failed']} failed, {status['cancelled']} cancelled"
    )
    if generated and elapsed > 0:
        per_image = sum(r.timings.generate_s for r in generated) / len(generated)
        console.print(
            f"  {len(generated) / elapsed:.2f} images/s over {elapsed:.1f} s; "
            f"{per_image:.3f} s per image in the pipeline"
        )
    console.print(f"  manifest: {client.job(job_id).manifest_location()}")
    if records:
        first = records[0].location
        images_dir = Path(first).parent.parent if first.startswith("/") else first.rsplit("/", 2)[0]
        console.print(f"  images:   {images_dir}")


@app.command()
def status(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Progress of a job, from fluxfleet's own records."""
    try:
        data = _status_dict(_client(), job_id)
    except FluxfleetError as e:
        raise _fail(e) from e
    if as_json:
        print(json.dumps(data))
        return
    console.print(
        f"job {job_id} [{data['state']}]: {data['finished']}/{data['total']} finished — "
        f"{data['done']} done ({data['skipped']} already stored), {data['failed']} failed, "
        f"{data['cancelled']} cancelled"
    )


@app.command()
def wait(job_id: str, timeout: float | None = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Wait for a job with a progress bar; exits 1 if any item failed."""
    client = _client()
    try:
        final = client.job(job_id).wait(progress=not as_json, timeout=timeout)
    except (FluxfleetError, TimeoutError) as e:
        raise _fail(e) from e
    if as_json:
        print(final.model_dump_json())
    else:
        _print_summary(client, job_id, final.model_dump())
    if final.failed:
        raise typer.Exit(1)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job: queued items are not generated; finished ones stay."""
    try:
        status = _client().job(job_id).cancel()
    except FluxfleetError as e:
        raise _fail(e) from e
    console.print(f"job {job_id} cancelled ({status.finished}/{status.total} finished)")


@app.command()
def results(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = True) -> None:
    """The job's manifest lines (one JSON object per stored image) and failures."""
    client = _client()
    job = client.job(job_id)
    for record in job.results():
        print(record.model_dump_json())
    for failure in job.failures():
        err.print(f"failed: item {failure.index} ({failure.key}): {failure.reason}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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
def make_tiny_model(directory: Path) -> None:
    """Build the tiny random-weight FLUX pipeline (for tests and the demo) into DIRECTORY."""
    import subprocess

    code = subprocess.call([sys.executable, "-m", "workers.tiny_model", str(directory)])
    raise typer.Exit(code)


@app.command()
def demo(
    prompts: Path = Path("examples/prompts.txt"),
    output: Path = Path("outputs"),
    model_dir: Path = Path(".cache/tiny-flux"),
) -> None:
    """Run a real batch on this machine: private Redis, one worker, the tiny model, local storage."""
    from producer.demo import run_demo

    raise typer.Exit(run_demo(prompts=prompts, output=output, model_dir=model_dir))


# Command modules register themselves on `app`; imported last because they import `app` from here.
from producer import cli_compare, cli_fleet, cli_models, cli_observe  # noqa: E402, F401


def main() -> None:
    app()


if __name__ == "__main__":
    # Under `python -m producer.cli` this file runs as __main__, a second copy of the module;
    # run the imported one, whose app has every command registered.
    from producer.cli import main as registered_main

    registered_main()
