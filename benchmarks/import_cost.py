"""What a worker's pool child pays in imports before it can load a pipeline, and which import touches CUDA.

Each case runs twice in a fresh interpreter (the first run may also write bytecode caches); torch is
imported first and timed apart, as the worker's parent imports it before forking. Run on the GPU host::

    python benchmarks/import_cost.py  # writes benchmarks/results/<date>-<GPU>-import-cost.json

Prints a table last and writes JSON; with ``--importtime`` also keeps ``python -X importtime`` output of the
worker's import set (the heaviest modules first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HIDE_BNB = "import sys; sys.modules['bitsandbytes'] = None\n"
HIDE_BNB_AO = "import sys; sys.modules['bitsandbytes'] = sys.modules['torchao'] = None\n"
# What workers.pipeline.build.build_pipeline imports before its first CUDA call, for a torchao preset.
WORKER_SET = "from diffusers import FluxPipeline\nimport torchao.quantization\nimport workers.pipeline.build\n"
CASES: dict[str, str] = {
    "diffusers FluxPipeline": "from diffusers import FluxPipeline\n",
    "diffusers FluxPipeline, bitsandbytes hidden": HIDE_BNB + "from diffusers import FluxPipeline\n",
    "diffusers FluxPipeline, bitsandbytes and torchao hidden": HIDE_BNB_AO + "from diffusers import FluxPipeline\n",
    "bitsandbytes alone": "import bitsandbytes\n",
    "torchao.quantization alone": "import torchao.quantization\n",
    "worker set (torchao preset)": WORKER_SET,
    "worker set, bitsandbytes hidden": HIDE_BNB + WORKER_SET,
}
PROBE = """
import time, json
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
{code}
t2 = time.perf_counter()
print(json.dumps({{"torch_s": t1 - t0, "rest_s": t2 - t1, "cuda_initialized": torch.cuda.is_initialized()}}))
"""


def run_case(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def importtime(code: str, top: int) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import torch\n" + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [line for line in proc.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    rows = [r for r in rows if r.split("|")[1].strip().isdigit()]
    rows.sort(key=lambda r: int(r.split("|")[1]), reverse=True)
    return rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/<date>-<GPU>-import-cost.json"
    )
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()
    records = []
    for name, code in CASES.items():
        for attempt in (1, 2):
            t = time.perf_counter()
            rec = {"case": name, "run": attempt, **run_case(code), "process_s": time.perf_counter() - t}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    from workers.speed.compile_cache import versions  # metadata only: no torch in this process

    result: dict = {"versions": versions(), "records": records}
    if args.importtime:
        result["importtime_worker_set_top"] = importtime(WORKER_SET, 40)
        print("\n".join(result["importtime_worker_set_top"]))
    from benchmarks.results_names import local_device, result_path

    out = args.out or result_path("import-cost", local_device())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("| case | run | torch s | rest s | CUDA initialised |\n|---|---|---|---|---|")
    for r in records:
        if "error" in r:
            print(f"| {r['case']} | {r['run']} | | | error: {r['error']} |")
        else:
            print(f"| {r['case']} | {r['run']} | {r['torch_s']:.2f} | {r['rest_s']:.2f} | {r['cuda_initialized']} |")


if __name__ == "__main__":
    main()
