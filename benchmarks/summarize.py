"""The summary of ``benchmarks/results/``: every figure the JSON files hold, one table per kind of measurement.

    python benchmarks/summarize.py          # writes benchmarks/results/SUMMARY.md and summary.json
    python benchmarks/summarize.py --check  # exit 1 when the written files differ from what the JSON gives

Reads the files named as ``benchmarks/results_names.py`` says (date, device, what was measured) and tells
their kind by their keys: ``benchmarks/gpu_bench.py`` (``plan`` and ``records``), ``gpu_scaleout.py``
(records with ``images_per_hour``), ``gpu_presets_smoke.py`` (a list of presets with ``ok``),
``import_cost.py``, ``fp8_quant_kernel.py``, ``load_peak_probe.py`` (``stages``), ``step_cache_bench.py``
(records that each name a ``cache`` policy; ``benchmarks/summary_cache.py``) and the CPU benchmarks
(``benchmark``). A figure a run did not measure is "—"; nothing is computed that the files do not hold.
``tests/test_results_summary.py`` keeps the committed summary equal to a fresh one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.results_names import RESULTS_DIR, ResultName, parse
from benchmarks.summary_cache import is_step_cache, step_cache_rows
from benchmarks.summary_markdown import DASH, Row, markdown

# Packages whose versions decide the figures, in the order a versions label lists them.
KEY_PACKAGES = ("torch", "diffusers", "transformers", "torchao", "triton", "bitsandbytes")
ANCHORS = {
    "anchor:bf16": "bf16 eager",
    "anchor:bf16_compile": "bf16 + torch.compile",
    "anchor:fp8_compile": "torchao fp8 row-wise + torch.compile",
}
CACHE = {"cold": "empty compile cache", "warm": "warm shared compile cache"}


@dataclass(frozen=True)
class Run:
    """One JSON file: its name's parts and its content."""

    name: ResultName
    file: str
    data: Any


def load_runs(directory: Path = RESULTS_DIR) -> list[Run]:
    """Every JSON file in ``directory`` named by the scheme, in name order (date first)."""
    runs = []
    for path in sorted(directory.glob("*.json")):
        if (name := parse(path.name)) is not None:
            runs.append(Run(name, path.name, json.loads(path.read_text())))
    return runs


def kind(data: Any) -> str | None:
    """Which benchmark wrote ``data``, by its keys."""
    if isinstance(data, list):
        return "smoke" if all(isinstance(r, dict) and "ok" in r for r in data) else None
    if not isinstance(data, dict):
        return None
    records = data.get("records") or []
    if "stages" in data:
        return "load_peak"
    if "benchmark" in data:
        return "cpu"
    if "plan" in data:
        return "bench"
    if "shape" in data:
        return "kernel"
    # Before scale-out: a step-cache file's records also hold images_per_hour (gpu_bench's worker records
    # name a cache policy too, which is why "plan" is asked first).
    if is_step_cache(data):
        return "step_cache"
    if records and "images_per_hour" in records[0]:
        return "scaleout"
    if records and "case" in records[0]:
        return "import_cost"
    return None


def versions_label(versions: dict[str, str] | None) -> str:
    """``torch 2.11.0, diffusers 0.42.1, …`` of the packages in ``KEY_PACKAGES`` the run recorded."""
    if not versions:
        return DASH
    return ", ".join(f"{p} {versions[p]}" for p in KEY_PACKAGES if p in versions) or DASH


def config_name(label: str) -> str:
    """A readable name for a gpu_bench step: "fast, empty compile cache", "anchor: bf16 eager"."""
    if label in ANCHORS:
        return f"anchor: {ANCHORS[label]}"
    step, _, cache = label.partition(":")
    preset, _, variant = step.partition("@")
    text = f"{preset} + {variant}" if variant else preset
    return f"{text}, {CACHE[cache]}" if cache in CACHE else text


def bench_rows(run: Run) -> list[Row]:
    """One row per configuration of a gpu_bench run (its 28- and 50-step records merged)."""
    by_label: dict[str, list[Row]] = {}
    for r in run.data["records"]:
        if not r.get("through_worker"):
            by_label.setdefault(r["label"], []).append(r)
    anchor_ms = {
        label: next((r.get("ms_per_step") for r in by_label.get(label, []) if r.get("steps") == 28), None)
        for label in ANCHORS
    }
    rows = []
    for label, recs in by_label.items():
        at = {r.get("steps"): r for r in recs}
        first = recs[0]
        rows.append(
            {
                "preset": first.get("preset"),
                "config": config_name(label),
                "anchor": bool(first.get("anchor")),
                "variant": first.get("variant"),
                "device": run.name.device,
                "date": run.name.date,
                "versions": versions_label(run.data.get("versions")),
                "ms_per_step_28": at.get(28, {}).get("ms_per_step"),
                "ms_per_step_50": at.get(50, {}).get("ms_per_step"),
                "s_per_image_28": at.get(28, {}).get("s_per_image"),
                "s_per_image_50": at.get(50, {}).get("s_per_image"),
                "gib_after_load": first.get("mem_after_load_gib"),
                "gib_peak": max((r["peak_gib"] for r in recs if r.get("peak_gib") is not None), default=None),
                "cold_start_s": first.get("cold_start_s"),
                "same_run_anchor_ms_per_step": {ANCHORS[a]: anchor_ms[a] for a in ANCHORS},
                "file": run.file,
            }
        )
    return rows


def worker_rows(run: Run) -> list[Row]:
    """Jobs through a real worker (Redis, Celery, storage) in a gpu_bench run."""
    keys = ("steps", "images", "worker_ready_s", "first_image_after_start_s", "job_wall_s", "s_per_image")
    return [
        {"preset": r.get("preset"), "device": run.name.device, "date": run.name.date}
        | {k: r.get(k) for k in keys}
        | {"pipeline_s_per_image": r.get("pipeline_s_per_image"), "file": run.file}
        | {"versions": versions_label(run.data.get("versions"))}
        for r in run.data["records"]
        if r.get("through_worker")
    ]


def scaleout_rows(run: Run) -> list[Row]:
    keys = ("gpus", "workers", "steps", "images", "elapsed_s", "images_per_hour", "s_per_image")
    return [
        {"preset": r.get("preset"), "device": run.name.device, "date": run.name.date}
        | {k: r.get(k) for k in keys}
        | {"scaling_efficiency": r.get("scaling_efficiency"), "fleet_ready_s": r.get("fleet_ready_s")}
        | {"versions": versions_label(run.data.get("versions")), "file": run.file}
        for r in run.data["records"]
    ]


def smoke_rows(run: Run) -> list[Row]:
    rows = []
    for r in run.data:
        error = str(r.get("error", "")).splitlines()[0][:90] if not r.get("ok") else None
        rows.append(
            {"preset": r.get("preset"), "device": run.name.device, "date": run.name.date, "ok": r.get("ok")}
            | {k: r.get(k) for k in ("after_load_gib", "peak_gib", "load_s", "steps", "s_per_image")}
            | {"error": error, "file": run.file}
        )
    return rows


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Every table of the summary as plain data (what summary.json holds)."""
    out: dict[str, Any] = {
        "generated_by": "benchmarks/summarize.py",
        "presets": [],
        "workers": [],
        "scaleout": [],
        "smoke": [],
        "load_peak": [],
        "import_cost": [],
        "kernels": [],
        "cpu": [],
        "files": [run.file for run in runs],
    }
    cached: dict[str, list[Row]] = {"step_cache": [], "step_cache_workers": []}
    for run in runs:
        k, d, base = kind(run.data), run.data, {"device": run.name.device, "date": run.name.date, "file": run.file}
        if k == "bench":
            out["presets"] += bench_rows(run)
            out["workers"] += worker_rows(run)
        elif k == "scaleout":
            out["scaleout"] += scaleout_rows(run)
        elif k == "smoke":
            out["smoke"] += smoke_rows(run)
        elif k == "load_peak":
            out["load_peak"] += [
                base
                | {"stage": s, "gib_allocated": v.get("alloc_gib"), "gib_peak": v.get("peak_gib")}
                | {"versions": versions_label(d.get("versions"))}
                for s, v in d["stages"].items()
            ]
        elif k == "import_cost":
            out["import_cost"] += [
                base | {f: r.get(f) for f in ("case", "run", "torch_s", "rest_s", "cuda_initialized")}
                for r in d["records"]
            ]
        elif k == "kernel":
            out["kernels"] += [
                base | {f: r.get(f) for f in ("impl", "us", "ms_per_step_x38", "effective_TBps")} for r in d["records"]
            ]
        elif k == "cpu":
            out["cpu"] += [base | {"benchmark": d["benchmark"]} | r for r in d["records"]]
        elif k == "step_cache":
            for table, rows in step_cache_rows(run, versions_label(d.get("versions"))).items():
                cached[table] += rows
    # The step-caching tables only once a run measured it, so a summary without one stays as it was.
    if any(cached.values()):
        files = out.pop("files")
        out |= cached | {"files": files}
    # Grouped by preset, GPU and versions; newest first within a group, then by file (stable sorts).
    for t in ("presets", "workers", "smoke"):
        out[t].sort(key=lambda r: r["file"])
        out[t].sort(key=lambda r: r["date"], reverse=True)
        out[t].sort(key=lambda r: (not r.get("anchor"), r["preset"] or "", r["device"], r.get("versions", "")))
    # The package versions of a run, by a short name each table shows (V1, V2, ...).
    versioned = [t for t in ("presets", "workers", "scaleout", "load_peak", *cached) if t in out]
    labels = sorted({r["versions"] for t in versioned for r in out[t]} - {DASH})
    out["versions"] = {f"V{i}": label for i, label in enumerate(labels, 1)}
    short = {label: name for name, label in out["versions"].items()} | {DASH: DASH}
    for t in versioned:
        for r in out[t]:
            r["versions"] = short[r["versions"]]
    return out


def render(directory: Path = RESULTS_DIR) -> tuple[str, str]:
    """(SUMMARY.md, summary.json) as the JSON files in ``directory`` give them."""
    s = summarize(load_runs(directory))
    return markdown(s), json.dumps(s, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    md, js = render(args.dir)
    targets = {args.dir / "SUMMARY.md": md, args.dir / "summary.json": js}
    if args.check:
        stale = [p.name for p, text in targets.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print(f"{', '.join(stale)} in {args.dir} differ from the JSON files: run python benchmarks/summarize.py")
        return 1 if stale else 0
    for path, text in targets.items():
        path.write_text(text)
    print(f"wrote {', '.join(str(p) for p in targets)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
