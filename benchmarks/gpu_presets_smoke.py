"""Load and run each named preset on a CUDA machine; print memory and speed, write JSON.

Usage (on the GPU host, after installing the wheelhouse)::

    python benchmarks/gpu_presets_smoke.py --model /tmp/flux-random --steps 4 \\
        bf16 bnb-nf4 torchao-int8wo ...  # writes benchmarks/results/<date>-<GPU>-smoke-<presets>.json

``--model`` is a full-size random-weight FLUX.1-dev in diffusers format (this script builds nothing);
GGUF presets need ``--gguf-dir`` holding ``flux1-dev-<TYPE>.gguf`` files (e.g. written by
``python -m workers.tools.quantize --preset gguf-q8-0 --gguf Q8_0 --out DIR/flux1-dev-Q8_0.gguf``).
Each preset runs in its own subprocess so one failure or leak cannot spoil the next.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3


def device_map(pipe: object) -> dict[str, str] | str | None:
    """``hf_device_map``: per component for "balanced", the bare device name for ``device_map="cuda"``."""
    mapping = getattr(pipe, "hf_device_map", None)
    return {k: str(v) for k, v in mapping.items()} if isinstance(mapping, dict) else mapping


def progress(message: str) -> None:
    """Stage marks on stderr: when a preset runs out of time, the report says how far it got."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_one(name: str, model: str, steps: int, gguf_dir: str | None, no_compile: bool) -> dict:
    import torch

    from fluxfleet.presets import load_preset
    from fluxfleet.settings import Settings
    from workers.pipeline.build import build_pipeline
    from workers.pipeline.footprint import record_generation_peak

    settings = Settings(model_dir=model)
    preset = load_preset(name, settings.presets_dir)
    if preset.quantization.backend == "gguf":
        if not gguf_dir:
            return {"preset": name, "ok": False, "error": "GGUF preset: pass --gguf-dir"}
        quant_type = preset.quantization.options.get("quant_type", "Q8_0")
        preset = preset.model_copy(update={"single_file": str(Path(gguf_dir) / f"flux1-dev-{quant_type}.gguf")})
    if no_compile:
        preset = preset.model_copy(update={"compile": preset.compile.model_copy(update={"enabled": False})})
    progress(f"{name}: loading")
    loaded = build_pipeline(preset, settings)
    after_load = loaded.memory.after_load_bytes
    progress(f"{name}: loaded in {loaded.load_s:.1f}s ({loaded.stages}); first call")

    def call() -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        loaded.pipe(
            "a lavish palace interior",
            width=1024,
            height=1024,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=512,
            generator=torch.Generator("cpu").manual_seed(0),
        )
        torch.cuda.synchronize()
        return time.perf_counter() - started

    warmup_s = call()  # first call: compilation, allocator warm-up
    progress(f"{name}: first call {warmup_s:.1f}s; second call")
    record_generation_peak(loaded.memory, "cuda")
    seconds = call()
    peak = record_generation_peak(loaded.memory, "cuda")
    return {
        "preset": name,
        "ok": True,
        "components_bytes": loaded.memory.components,
        "after_load_gib": round(after_load / GIB, 3),
        "peak_gib": round(peak / GIB, 3),
        "s_per_image": round(seconds, 3),
        "steps": steps,
        "first_call_s": round(warmup_s, 1),
        "load_s": round(loaded.load_s, 1),
        # where each component went and what each GPU held (a balanced placement splits them)
        "device_map": device_map(loaded.pipe),
        "per_gpu_after_gen_gib": [
            round(torch.cuda.memory_allocated(i) / GIB, 2) for i in range(torch.cuda.device_count())
        ],
        "per_gpu_peak_gib": [
            round(torch.cuda.max_memory_allocated(i) / GIB, 2) for i in range(torch.cuda.device_count())
        ],
        "load_stages_s": {k: round(v, 1) for k, v in loaded.stages.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--model", required=True, help="full-size random FLUX.1-dev in diffusers format")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<date>-<GPU>-smoke-…")
    parser.add_argument("--gguf-dir")
    parser.add_argument("--no-compile", action="store_true", help="eager only (compile can take minutes)")
    parser.add_argument("--timeout", type=int, default=540, help="seconds per preset")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.one:
        try:
            result = run_one(args.presets[0], args.model, args.steps, args.gguf_dir, args.no_compile)
        except Exception as e:  # reported in the table, the next preset still runs
            result = {"preset": args.presets[0], "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        print("RESULT " + json.dumps(result))
        return 0
    results = []
    for name in args.presets:
        cmd = [sys.executable, __file__, name, "--one", "--model", args.model, "--steps", str(args.steps)]
        cmd += ["--gguf-dir", args.gguf_dir] if args.gguf_dir else []
        cmd += ["--no-compile"] if args.no_compile else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"preset": name, "ok": False, "error": proc.stderr[-500:]}
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            marks = [line for line in err.splitlines() if line.startswith("[")][-3:]
            result = {"preset": name, "ok": False, "error": f"timeout after {args.timeout} s; got to: {marks}"}
        results.append(result)
        print(json.dumps(result), flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.results_names import local_device, result_path

    what = "smoke-" + ("-".join(args.presets) if len(args.presets) <= 2 else "presets")
    out = args.out or result_path(what, local_device())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{'preset':30s} {'after load GiB':>14s} {'peak GiB':>9s} {'s/image':>8s}  {args.steps} steps, 1024x1024")
    for r in results:
        if r["ok"]:
            print(f"{r['preset']:30s} {r['after_load_gib']:14.2f} {r['peak_gib']:9.2f} {r['s_per_image']:8.2f}")
        else:
            print(f"{r['preset']:30s} FAILED: {r['error'][:200]}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
