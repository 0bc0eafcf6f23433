"""SUMMARY.md from the tables ``benchmarks/summarize.py`` reads out of the result files.

One section per kind of measurement: a line on how its figures were measured, then a table whose columns
say which field of the JSON each figure comes from (``col``). "—" marks a figure a run did not measure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DASH = "—"
Row = dict[str, Any]


def fmt(value: Any, digits: int = 3) -> str:
    """A figure as the table shows it: "—" when absent, floats rounded to ``digits``."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{round(value, digits):g}" if abs(value) < 1e6 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


Column = tuple[str, Callable[[Row], str]]


def section(title: str, intro: str, columns: list[Column], rows: list[Row], level: int = 2) -> list[str]:
    """A heading, a paragraph on how the figures were measured, and a table with one line per row."""
    heading = "#" * level + " " + title
    lines = [heading, "", intro, "", "| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows] + [""]


def col(header: str, key: str, digits: int = 3) -> Column:
    return header, lambda r: fmt(r[key], digits)


RUN: Column = ("run", lambda r: f"`{r['file'].removesuffix('.json')}`")
PRESET_COLUMNS: list[Column] = [
    ("preset, configuration", lambda r: r["config"]),
    ("GPU", lambda r: r["device"]),
    ("versions", lambda r: r["versions"]),
    ("ms/step 28 / 50", lambda r: f"{fmt(r['ms_per_step_28'])} / {fmt(r['ms_per_step_50'])}"),
    col("s per 28-step image", "s_per_image_28"),
    col("s per 50-step image", "s_per_image_50"),
    col("GiB after load", "gib_after_load"),
    col("GiB peak", "gib_peak"),
    col("cold start s", "cold_start_s"),
    ("anchors, same run", lambda r: " / ".join(fmt(v) for v in r["same_run_anchor_ms_per_step"].values())),
    RUN,
]
WORKER_COLUMNS: list[Column] = [
    ("preset", lambda r: r["preset"]),
    ("GPU", lambda r: r["device"]),
    col("steps", "steps"),
    col("images", "images"),
    col("ready s", "worker_ready_s"),
    col("first image s", "first_image_after_start_s"),
    col("job s", "job_wall_s"),
    col("s/image", "s_per_image"),
    col("pipeline s/image", "pipeline_s_per_image"),
    ("versions", lambda r: r["versions"]),
    RUN,
]
SCALEOUT_COLUMNS: list[Column] = [
    ("preset", lambda r: r["preset"]),
    ("host", lambda r: r["device"]),
    col("GPUs", "gpus"),
    col("steps", "steps"),
    col("images", "images"),
    col("elapsed s", "elapsed_s"),
    col("images/hour", "images_per_hour", 1),
    col("s/image", "s_per_image"),
    col("efficiency", "scaling_efficiency"),
    col("fleet ready s", "fleet_ready_s", 1),
    ("versions", lambda r: r["versions"]),
    RUN,
]
SMOKE_COLUMNS: list[Column] = [
    ("preset", lambda r: r["preset"]),
    ("GPU", lambda r: r["device"]),
    ("result", lambda r: "ok" if r["ok"] else f"failed: {fmt(r['error'])}"),
    col("GiB after load", "after_load_gib", 2),
    col("GiB peak", "peak_gib", 2),
    col("load s", "load_s", 1),
    col("steps", "steps"),
    col("s/image", "s_per_image"),
    RUN,
]
LOAD_PEAK_COLUMNS: list[Column] = [
    ("step", lambda r: r["stage"]),
    ("GPU", lambda r: r["device"]),
    col("GiB allocated", "gib_allocated", 2),
    col("GiB peak", "gib_peak", 2),
    ("versions", lambda r: r["versions"]),
    RUN,
]
IMPORT_COLUMNS: list[Column] = [
    ("imports", lambda r: r["case"]),
    ("GPU host", lambda r: r["device"]),
    col("attempt", "run"),
    col("torch s", "torch_s", 2),
    col("rest s", "rest_s", 2),
    col("CUDA initialised", "cuda_initialized"),
    RUN,
]
KERNEL_COLUMNS: list[Column] = [
    ("implementation", lambda r: r["impl"]),
    ("GPU", lambda r: r["device"]),
    col("us per call", "us", 1),
    col("ms per step (x38)", "ms_per_step_x38", 2),
    col("TB/s", "effective_TBps", 2),
    RUN,
]
STEP_CACHE_CONFIG: list[Column] = [
    ("preset", lambda r: r["preset"]),
    ("cache policy", lambda r: fmt(r["cache"])),
    ("GPU", lambda r: r["device"]),
    ("resolution", lambda r: fmt(r["resolution"])),
    col("steps", "steps"),
]
"""What a step-cache row measured: the same first columns in process and through a worker."""
STEP_CACHE_COLUMNS: list[Column] = [
    *STEP_CACHE_CONFIG,
    col("s/image", "s_per_image"),
    col("images/hour", "images_per_hour", 1),
    col("× uncached", "speedup_vs_uncached", 2),
    ("steps computed / reused", lambda r: f"{fmt(r['steps_computed'])} / {fmt(r['steps_reused'])}"),
    col("GiB peak", "peak_gib", 2),
    col("latent rel. error vs uncached", "rel_err_latents_vs_uncached", 4),
    col("refused", "refused"),
    ("versions", lambda r: r["versions"]),
    RUN,
]
STEP_CACHE_WORKER_COLUMNS: list[Column] = [
    *STEP_CACHE_CONFIG,
    col("images", "images"),
    ("steps computed per image", lambda r: ", ".join(map(fmt, r["steps_computed"] or [None]))),
    col("ready s", "worker_ready_s"),
    col("job s", "job_wall_s"),
    col("s/image", "s_per_image"),
    (
        "pipeline s/image mean / median",
        lambda r: f"{fmt(r['pipeline_s_per_image'])} / {fmt(r['pipeline_s_per_image_median'])}",
    ),
    col("× uncached", "speedup_vs_uncached", 2),
    ("versions", lambda r: r["versions"]),
    RUN,
]
CPU_SKIP = {"device", "date", "file", "benchmark"}
CPU_COLUMNS: list[Column] = [
    ("benchmark", lambda r: r["benchmark"]),
    ("figures", lambda r: ", ".join(f"{k} {fmt(v, 3)}" for k, v in r.items() if k not in CPU_SKIP)),
    RUN,
]


def markdown(s: dict[str, Any]) -> str:
    """SUMMARY.md: the tables of ``summarize``, each with a line on how its figures were measured."""
    md = [
        "# Benchmark summary",
        "",
        "Generated by `python benchmarks/summarize.py` from the JSON files in this folder; do not edit by hand.",
        "How each kind of file is produced and what the anchors are: [README.md](README.md); how the figures",
        'were reached: [notes/](notes/). "—": the run did not measure it. 1024x1024, batch 1 unless a table says.',
        "",
        "Package versions of the runs (*versions* in the tables):",
        "",
        "| versions | packages |",
        "|---|---|",
        *(f"| {name} | {label} |" for name, label in s["versions"].items()),
        "",
    ]
    md += section(
        "Presets and anchors (`benchmarks/gpu_bench.py`)",
        "Whole pipeline, one image per figure. *ms/step*: the denoising stage over its steps, at 28 / 50 steps;\n"
        "*s per image*: text encoding + denoising + VAE decode; *GiB*: `torch.cuda.memory_allocated` after\n"
        "loading and the maximum from then to the end; *cold start*: process start to the end of the first\n"
        "28-step image (imports, load, compile, warm-up). *Anchors, same run*: ms/step at 28 steps of the seed's\n"
        "recipes in the same run: bf16 eager / bf16 + torch.compile / torchao fp8 row-wise + torch.compile.\n"
        "Grouped by preset, GPU and versions, newest first.",
        PRESET_COLUMNS,
        s["presets"],
    )
    md += section(
        "Through a real worker (`benchmarks/gpu_bench.py`, `worker:` steps)",
        "`python -m workers.main` behind Redis and Celery with local file storage, one job of *images* prompts.\n"
        "*ready*: process start to taking tasks; *first image*: process start to the first stored image;\n"
        "*s/image*: the job's wall time over its images; *pipeline*: the same inside the worker.",
        WORKER_COLUMNS,
        s["workers"],
    )
    if "step_cache" in s:
        md += step_cache_sections(s)
    md += section(
        "Scale-out (`benchmarks/gpu_scaleout.py`)",
        "A fleet started by `fluxfleet up`'s code, one worker per GPU, an unmeasured task per worker first;\n"
        "*efficiency*: images/hour over GPUs x the one-GPU figure of the same run.",
        SCALEOUT_COLUMNS,
        s["scaleout"],
    )
    md += section(
        "Presets that load and generate (`benchmarks/gpu_presets_smoke.py`)",
        "Each preset in its own process, eager, a few steps: the memory and whether it runs. The times are\n"
        "not speed figures.",
        SMOKE_COLUMNS,
        s["smoke"],
    )
    md += section(
        "Memory while loading the fast preset (`benchmarks/load_peak_probe.py`)",
        "GiB allocated after each step of the fast preset's load path, and the peak during that step.",
        LOAD_PEAK_COLUMNS,
        s["load_peak"],
    )
    md += section(
        "Import cost (`benchmarks/import_cost.py`)",
        "Seconds in a fresh interpreter: `import torch`, then the rest; whether the imports initialised CUDA.",
        IMPORT_COLUMNS,
        s["import_cost"],
    )
    md += section(
        "Kernels (`benchmarks/fp8_quant_kernel.py`)",
        "The fp8 quantization of a single block's `proj_out` input (4608 x 15360): per call and per step.",
        KERNEL_COLUMNS,
        s["kernels"],
    )
    md += section(
        "CPU (`benchmarks/submit_throughput.py`, `benchmarks/worker_overhead.py`, `benchmarks/chaos_soak.py`)",
        "Each record as the file holds it.",
        CPU_COLUMNS,
        s["cpu"],
    )
    return "\n".join(md).rstrip("\n") + "\n"


def step_cache_sections(s: dict[str, Any]) -> list[str]:
    """ "Step caching": the in-process table per policy, then the jobs through a real worker."""
    md = section(
        "Step caching (`benchmarks/step_cache_bench.py`)",
        "The latent error is measured on random weights, which do not change between steps as a trained\n"
        "model's do: only a rough signal of what a policy costs in quality.\n\n"
        "One process per preset runs the worker's own generate function per cache policy (median of its\n"
        "repeats). *× uncached*: s/image of the uncached run at the same steps over this one's; *steps computed\n"
        "/ reused*: transformer steps the policy ran and the ones it reused; *latent rel. error*:\n"
        "‖latents − uncached‖/‖uncached‖ from the same seed; *refused*: why the preset cannot run the policy.",
        STEP_CACHE_COLUMNS,
        s["step_cache"],
    )
    return md + section(
        "Step caching through a real worker",
        "`python -m workers.main` behind Redis and Celery, one job uncached and one with the policy.\n"
        "*s/image*: the job's wall time over its images; *pipeline*: the generate time inside the worker,\n"
        "whose median leaves out a first image that captured new graphs; *× uncached*: the uncached job's\n"
        "pipeline median over this one's.",
        STEP_CACHE_WORKER_COLUMNS,
        s["step_cache_workers"],
        level=3,
    )
