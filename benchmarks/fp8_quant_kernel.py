"""One-pass quantization of a single block's ``proj_out`` input, against what inductor generates today.

In each of FLUX.1-dev's 38 single blocks, ``proj_out`` (fp8 row-wise in the fast preset) takes
``cat([attention output, gelu_tanh(proj_mlp output)])``, 4608 x 15360 at 1024x1024. Inductor quantizes it
in two kernels, an amax pass and a scale-and-cast pass, each reading both inputs and recomputing GELU
(5.48 + 5.51 ms per step in an H100 profile). This script times that against the one-pass Triton kernel
of ``workers/speed/fp8_kernels.py`` (each row kept in registers: read once, write fp8 once) at 8, 16 and 32 warps.
Figures: ``benchmarks/results/2026-11-23-H100-fp8-quant-kernel.json`` (benchmarks/results/SUMMARY.md).
GPU only::

    python benchmarks/fp8_quant_kernel.py  # writes benchmarks/results/<date>-<GPU>-fp8-quant-kernel.json

Prints a table last and writes JSON; checks that both produce the same scales and (almost) the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.results_names import local_device, result_path
from workers.speed.compile_cache import versions
from workers.speed.fp8_kernels import gelu_cat_rowwise_fp8_kernel, launch_gelu_cat_rowwise_fp8
from workers.speed.fp8_linear import FP8_MAX, MIN_SCALE, rowwise_quantize

ROWS, ATTN, MLP = 4608, 3072, 12288  # 4096 image + 512 text tokens; 24 heads x 128; 4 x 3072


def one_pass(attn: torch.Tensor, mlp: torch.Tensor, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_gelu_cat_rowwise_fp8(gelu_cat_rowwise_fp8_kernel, attn, mlp, num_warps)


def inductor_reference(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rowwise_quantize(torch.cat([attn, torch.nn.functional.gelu(mlp, approximate="tanh")], dim=-1))


def time_us(fn: object, reps: int = 100) -> float:
    for _ in range(5):
        fn()  # type: ignore[operator]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()  # type: ignore[operator]
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/<date>-<GPU>-fp8-quant-kernel.json"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    attn = torch.randn(ROWS, ATTN, device="cuda", dtype=torch.bfloat16)
    mlp = torch.randn(ROWS, MLP, device="cuda", dtype=torch.bfloat16) * 2
    compiled = torch.compile(inductor_reference, fullgraph=True)
    ref_q, ref_s = compiled(attn, mlp)
    moved = attn.nbytes + mlp.nbytes + ref_q.nbytes + ref_s.nbytes
    records = [{"impl": "inductor (torch.compile), today's fast preset", "us": time_us(lambda: compiled(attn, mlp))}]
    for warps in (8, 16, 32):
        q, s = one_pass(attn, mlp, warps)
        records.append(
            {
                "impl": f"triton one-pass, {warps} warps",
                "us": time_us(lambda w=warps: one_pass(attn, mlp, w)),
                "scale_max_rel_diff": float(((s - ref_s).abs() / ref_s).max()),
                "fp8_bytes_differing": float((q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean()),
            }
        )
    for r in records:
        r["effective_TBps"] = moved / (r["us"] * 1e-6) / 1e12
        r["ms_per_step_x38"] = r["us"] * 38 / 1000
    result = {
        "device": torch.cuda.get_device_name(),
        "versions": versions(),
        "shape": {"rows": ROWS, "attn": ATTN, "mlp": MLP},
        "bytes_moved_once": moved,
        "fp8_max": FP8_MAX,
        "min_scale": MIN_SCALE,
        "records": records,
    }
    out = args.out or result_path("fp8-quant-kernel", local_device())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("| implementation | us per call | ms per step (x38) | TB/s | scale max rel diff | fp8 bytes differing |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['impl']} | {r['us']:.1f} | {r['ms_per_step_x38']:.2f} | {r['effective_TBps']:.2f} | "
            f"{r.get('scale_max_rel_diff', '')} | {r.get('fp8_bytes_differing', '')} |"
        )


if __name__ == "__main__":
    main()
