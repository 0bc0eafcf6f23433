"""A step_cache_bench file gets its own kind and the "Step caching" section of SUMMARY.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.results_names import RESULTS_DIR
from benchmarks.summarize import kind, load_runs, main, render, summarize
from benchmarks.summary_markdown import markdown

REFUSAL = (
    "cache policy fbcache cannot run on preset 'fast': its hooks run the transformer blocks outside [compile] "
    "and cuda_graph, which would lose more speed than the cache gains; use magcache, or a preset without them"
)


def in_process(cache: str, **figures: Any) -> dict[str, Any]:
    return {"label": f"fast cache={cache}", "preset": "fast", "cache": cache, "resolution": "1024x1024"} | {
        "batch": 1,
        "steps": 28,
        "through_worker": False,
        **figures,
    }


def through_worker(cache: str, computed: list[int], **figures: Any) -> dict[str, Any]:
    return {"label": f"worker:fast cache={cache}", "preset": "fast", "cache": cache, "through_worker": True} | {
        "resolution": "1024x1024",
        "steps": 28,
        "images": 4,
        "steps_computed": computed,
        "worker_ready_s": 21.3,
        **figures,
    }


def step_cache_data() -> dict[str, Any]:
    # A refusal first (no figures at all), as the benchmark writes it when the preset cannot run a policy.
    records = [
        in_process("fbcache:threshold=0.05", refused=REFUSAL),
        in_process("none", s_per_image=2.818, images_per_hour=1277, ms_per_step=92.7, steps_computed=28)
        | {"steps_reused": 0, "peak_gib": 18.53, "rel_err_latents_vs_uncached": 0.0, "speedup_vs_uncached": 1.0},
        in_process("magcache:threshold=0.06,max_skip=3,retention=0.2", s_per_image=1.552, images_per_hour=2320)
        | {"steps_computed": 14, "steps_reused": 14, "peak_gib": 18.61, "rel_err_latents_vs_uncached": 0.0015}
        | {"speedup_vs_uncached": 1.82},
        in_process("taylorseer:interval=5,warmup=3,order=1", s_per_image=3.1, images_per_hour=1161)
        | {"steps_computed": None, "steps_reused": None, "peak_gib": 19.02, "rel_err_latents_vs_uncached": 0.0003},
        through_worker("none", [28, 28, 28, 28], job_wall_s=11.8, s_per_image=2.95)
        | {"pipeline_s_per_image": 2.86, "pipeline_s_per_image_median": 2.85},
        through_worker("magcache", [14, 14, 14, 14], job_wall_s=7.1, s_per_image=1.775)
        | {"pipeline_s_per_image": 1.73, "pipeline_s_per_image_median": 1.6, "speedup_vs_uncached": 1.78},
    ]
    versions = {"python": "3.11.7", "torch": "2.11.0", "diffusers": "0.42.1", "triton": "3.5.0"}
    return {"device": "NVIDIA H200", "date": "2026-12-03", "versions": versions, "records": records}


def test_a_step_cache_file_is_its_own_kind_even_when_its_first_record_is_a_refusal() -> None:
    data = step_cache_data()
    assert kind(data) == "step_cache"
    # Without the refusal its first record has images_per_hour, the key that marks a scale-out file.
    assert kind(data | {"records": data["records"][1:]}) == "step_cache"
    # gpu_bench's worker records name a cache policy too; its plan keeps it a gpu_bench file.
    assert kind({"plan": "worker:fast", "records": data["records"][-2:]}) == "bench"
    assert kind({"records": [{"preset": "fast", "images_per_hour": 1277}]}) == "scaleout"
    assert kind({"records": []}) is None


def test_step_caching_rows_and_markdown(tmp_path: Path) -> None:
    # Given: a step-cache run of the fast preset on an H200, named as the benchmark names its file.
    (tmp_path / "2026-12-03-H200-step-cache.json").write_text(json.dumps(step_cache_data()))
    # When: the summary is rendered.
    md, js = render(tmp_path)
    summary = json.loads(js)
    # Then: one in-process row per policy, in the file's order, holding its figures as the file has them.
    rows = summary["step_cache"]
    assert [r["cache"] for r in rows] == [
        "fbcache:threshold=0.05",
        "none",
        "magcache:threshold=0.06,max_skip=3,retention=0.2",
        "taylorseer:interval=5,warmup=3,order=1",
    ]
    assert rows[0]["refused"] == REFUSAL and rows[0]["s_per_image"] is None
    assert rows[2]["versions"] == "V1"
    assert (rows[2]["device"], rows[2]["date"], rows[2]["file"]) == (
        "H200",
        "2026-12-03",
        "2026-12-03-H200-step-cache.json",
    )
    assert (rows[2]["speedup_vs_uncached"], rows[2]["steps_computed"], rows[2]["steps_reused"]) == (1.82, 14, 14)
    assert rows[3]["speedup_vs_uncached"] is None  # the file holds none for it; nothing is computed here
    workers = summary["step_cache_workers"]
    assert [(r["cache"], r["steps_computed"], r["speedup_vs_uncached"]) for r in workers] == [
        ("none", [28, 28, 28, 28], None),
        ("magcache", [14, 14, 14, 14], 1.78),
    ]
    assert summary["versions"] == {"V1": "torch 2.11.0, diffusers 0.42.1, triton 3.5.0"}
    # And: the section says what the latent error is worth, then both tables, with "—" for what was not measured.
    section = md[md.index("## Step caching") : md.index("## Scale-out")]
    assert "random weights" in section and "rough signal" in section
    run = "`2026-12-03-H200-step-cache`"
    assert (
        "| fast | magcache:threshold=0.06,max_skip=3,retention=0.2 | H200 | 1024x1024 | 28 | 1.552 | 2320 | 1.82 "
        f"| 14 / 14 | 18.61 | 0.0015 | — | V1 | {run} |"
    ) in section
    assert (
        f"| fast | fbcache:threshold=0.05 | H200 | 1024x1024 | 28 | — | — | — | — / — | — | — | {REFUSAL} | V1 |"
        in section
    )
    assert "| 28 | 3.1 | 1161 | — | — / — | 19.02 | 0.0003 | — |" in section
    assert "### Step caching through a real worker" in section
    assert (
        "| fast | magcache | H200 | 1024x1024 | 28 | 4 | 14, 14, 14, 14 | 21.3 | 7.1 | 1.775 | 1.73 / 1.6 | 1.78 "
        f"| V1 | {run} |" in section
    )
    assert (
        "| fast | none | H200 | 1024x1024 | 28 | 4 | 28, 28, 28, 28 | 21.3 | 11.8 | 2.95 | 2.86 / 2.85 | — |" in section
    )
    # And: the file is classified as nothing else.
    assert summary["scaleout"] == [] and summary["presets"] == [] and summary["workers"] == []
    assert main(["--dir", str(tmp_path)]) == 0 and main(["--dir", str(tmp_path), "--check"]) == 0


def test_a_summary_without_step_cache_runs_has_no_step_caching_section() -> None:
    # The committed results other than step-cache runs: their summary keeps the tables it always had.
    runs = [run for run in load_runs(RESULTS_DIR) if kind(run.data) != "step_cache"]
    summary = summarize(runs)
    assert runs and "step_cache" not in summary and "step_cache_workers" not in summary
    assert "Step caching" not in markdown(summary)
