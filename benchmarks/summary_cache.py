"""The step-caching tables of the summary, from ``benchmarks/step_cache_bench.py``'s files.

Such a file holds ``records`` that each name a cache policy (``cache``): in-process measurements of a preset
per policy (or the sentence saying why the preset ``refused`` it) and jobs through a real worker
(``through_worker``). Rows hold the figures as the file has them; the speed-ups are the benchmark's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from benchmarks.summary_markdown import Row

if TYPE_CHECKING:
    from benchmarks.summarize import Run

IN_PROCESS_FIGURES = (
    "resolution",
    "steps",
    "s_per_image",
    "images_per_hour",
    "speedup_vs_uncached",
    "steps_computed",
    "steps_reused",
    "peak_gib",
    "rel_err_latents_vs_uncached",
    "refused",
)
WORKER_FIGURES = (
    "resolution",
    "steps",
    "images",
    "steps_computed",
    "worker_ready_s",
    "job_wall_s",
    "s_per_image",
    "pipeline_s_per_image",
    "pipeline_s_per_image_median",
    "speedup_vs_uncached",
)


def is_step_cache(data: Any) -> bool:
    """Whether ``data`` is a step_cache_bench file: every record names a cache policy.

    Its first record may be a refusal (no figures), so the policy is the one key every record has.
    """
    records = data.get("records") if isinstance(data, dict) else None
    return isinstance(records, list) and bool(records) and all(isinstance(r, dict) and "cache" in r for r in records)


def step_cache_rows(run: Run, versions: str) -> dict[str, list[Row]]:
    """{"step_cache": in-process rows, "step_cache_workers": through-worker rows} of one run."""
    tables: dict[str, list[Row]] = {"step_cache": [], "step_cache_workers": []}
    for r in run.data["records"]:
        worker = bool(r.get("through_worker"))
        figures = WORKER_FIGURES if worker else IN_PROCESS_FIGURES
        tables["step_cache_workers" if worker else "step_cache"].append(
            {"preset": r.get("preset"), "cache": r.get("cache"), "device": run.name.device, "date": run.name.date}
            | {k: r.get(k) for k in figures}
            | {"versions": versions, "file": run.file}
        )
    return tables
