"""``fluxfleet presets``, ``plan`` and ``quantize``: what a preset needs and where it would live.

Registered on the main app (``producer/cli.py`` imports this module last). Nothing here imports
torch: ``quantize`` runs ``python -m workers.tools.quantize`` in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from fluxfleet.errors import FluxfleetError
from fluxfleet.estimate import quantized_components, speed_fp8
from fluxfleet.planner import (
    COMPONENTS,
    GIB,
    SAFETY_BYTES,
    Placement,
    component_bytes,
    no_estimate_reason,
    parse_bytes,
    plan_placement,
)
from fluxfleet.presets import Preset, load_preset, preset_names
from fluxfleet.settings import Settings
from producer.cli_common import _fail, _plain, app, console
from producer.extras import needs_extra


def component_backends(preset: Preset) -> dict[str, str]:
    """Which backend holds each component ('none' where it stays in the preset's dtype)."""
    quantized = quantized_components(preset)  # as the backend declares (a GGUF file holds the transformer)
    return {c: (preset.quantization.backend if c in quantized else "none") for c in COMPONENTS}


def describe(preset: Preset) -> dict[str, Any]:
    """One preset as ``fluxfleet presets --json`` prints it; the estimates are null, with the reason,
    for a preset whose model the planner's FLUX.1-dev figures do not describe."""
    why = no_estimate_reason(preset)
    est = None if why else component_bytes(preset)
    return {
        **preset.model_dump(),
        "backends": component_backends(preset),
        "estimated_bytes": est,
        "estimated_total_bytes": None if est is None else sum(est.values()),
        "no_estimate_reason": why,
    }


def _estimate_label(preset: Preset) -> str:
    if no_estimate_reason(preset):
        return "n/a"
    return f"{sum(component_bytes(preset).values()) / GIB:.1f}"


GRAPH_BREAKS_MARK = "*"  # explained under the table: the compile label stays one short word


def _compile_label(preset: Preset) -> str:
    if not preset.compile.enabled:
        return "off"
    return ("regional" if preset.compile.regional else "whole") + (
        "" if preset.compile.fullgraph else GRAPH_BREAKS_MARK
    )


# Below this width the description and quantized components leave the table for a list under it:
# the preset names, which a user types, are never wrapped or cut.
PRESETS_TABLE_MIN_WIDTH = 150


def _quantized(preset: Preset) -> str:
    return ", ".join(c for c, b in component_backends(preset).items() if b != "none") or "-"


@app.command()
def presets(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The presets a worker can load, with the estimated memory of each."""
    settings = Settings()
    try:
        rows = [load_preset(name, settings.presets_dir) for name in preset_names(settings.presets_dir)]
    except FluxfleetError as e:
        raise _fail(e) from e
    if as_json:
        print(json.dumps([describe(p) for p in rows]))
        return
    wide = console.width >= PRESETS_TABLE_MIN_WIDTH
    # No vertical rules, two spaces between columns: at 80 columns every name and number fits whole.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("preset", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    if wide:
        table.add_column("quantized")
    table.add_column("placement", no_wrap=True)
    table.add_column("compile", no_wrap=True)
    table.add_column("est. GiB", justify="right")
    table.add_column("items per task", justify="right")
    if wide:
        table.add_column("description")
    for p in rows:
        cells = [p.name, p.quantization.backend] + ([_quantized(p)] if wide else [])
        cells += [p.placement.policy, _compile_label(p), _estimate_label(p), str(p.max_items_per_task)]
        table.add_row(*map(_plain, cells), *([_plain(p.description)] if wide else []))
    console.print(table)
    if any(_compile_label(p).endswith(GRAPH_BREAKS_MARK) for p in rows):
        console.print(f"{GRAPH_BREAKS_MARK} compiled without fullgraph: graph breaks allowed", markup=False)
    if not wide:
        details = Table.grid(padding=(0, 2))
        details.add_column(no_wrap=True)
        details.add_column()
        for p in rows:
            quantized = _quantized(p)
            details.add_row(
                _plain(p.name), _plain(p.description + ("" if quantized == "-" else f" [quantized: {quantized}]"))
            )
        console.print(details)
    for p in rows:
        if why := no_estimate_reason(p):
            console.print(_plain(f"{p.name}: no memory estimate: {why}"))


def _plan_dict(plan: Placement) -> dict[str, Any]:
    known = not plan.no_estimate_reason  # null rather than 0 where the preset has no estimate: unknown, not zero
    return {
        "policy": plan.policy,
        "gpus": plan.gpus,
        "text_encoder_off_gpu_after_encode": plan.text_encoder_off_gpu_after_encode,
        "group_offload": {
            "type": plan.group_offload_type,
            "use_stream": plan.group_offload_use_stream,
            "components": list(plan.group_offload_components),
        }
        if plan.policy == "group_offload"
        else None,
        "estimate_bytes": plan.estimate if known else None,
        "after_load_bytes": plan.after_load_bytes if known else None,
        "expected_peak_bytes": plan.expected_peak_bytes if known else None,
        "gpu_peak_bytes": list(plan.gpu_peaks) if known else None,
        "load_peak_bytes": plan.load_peak_bytes if known else None,
        "load_peak_step": plan.load_peak_step if known else None,
        "fits": plan.fits,
        "load_fits": plan.load_fits,
        "reason": plan.reason,
        "no_estimate_reason": plan.no_estimate_reason or None,
    }


def _plan_backends(preset: Preset) -> dict[str, str]:
    """``component_backends``, plus the fp8 scheme where ``[speed]`` converts a component after loading."""
    converted = speed_fp8(preset)
    return {c: f"fp8 {converted[c]} (speed)" if c in converted else b for c, b in component_backends(preset).items()}


def _print_peaks(decision: Placement, usable: int, where: str) -> None:
    """Memory after loading and the serving peak, then the load-time peak where loading needs more."""
    on_gpus = "on the GPUs" if decision.gpus > 1 else "on the GPU"
    console.print(
        f"after load: {decision.after_load_bytes / GIB:.1f} GiB {on_gpus}; "
        f"serving peak: {decision.expected_peak_bytes / GIB:.1f} GiB per GPU ({where})"
    )
    load, serving = decision.load_peak_bytes, decision.expected_peak_bytes
    if load > serving:
        console.print(
            f"load-time peak: {load / GIB:.1f} GiB, above the serving peak: weights land on the GPU "
            f"before they are converted, and the peak comes with {escape(decision.load_peak_step)}"
        )
    if decision.fits:
        return
    if not decision.load_fits and serving <= usable:
        console.print(
            f"[yellow]warning:[/yellow] loading needs {load / GIB:.1f} GiB, more than the {usable / GIB:.1f} GiB "
            f"usable, although serving ({serving / GIB:.1f} GiB) fits: the worker would run out of memory while loading"
        )
    else:
        console.print("[yellow]warning:[/yellow] the preset forces this placement but the estimate exceeds the memory")


@app.command()
def plan(
    preset: Annotated[str, typer.Option(help="preset name; see `fluxfleet presets`")],
    gpu_memory: Annotated[str, typer.Option(help="free memory per GPU, e.g. 24GiB or 80GB")] = "80GiB",
    gpus: Annotated[int, typer.Option(min=0, help="GPUs the worker owns (0: CPU only)")] = 1,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Where a preset's pipeline would live on GPUs of this size, and its expected peak memory."""
    settings = Settings()
    try:
        spec = load_preset(preset, settings.presets_dir)
        decision = plan_placement(spec, [parse_bytes(gpu_memory)] * gpus)
    except (FluxfleetError, ValueError) as e:
        raise _fail(e) from e
    if as_json:
        print(json.dumps({"preset": spec.name, **_plan_dict(decision)}))
        return
    extra = " + text encoders off the GPU after encoding" if decision.text_encoder_off_gpu_after_encode else ""
    if decision.policy == "group_offload":
        extra = f" ({decision.group_offload_type}, streams {'on' if decision.group_offload_use_stream else 'off'}, "
        extra += f"{', '.join(decision.group_offload_components)})"
    name, reason = _plain(spec.name), _plain(decision.reason)
    console.print(f"preset {name}: [bold]{decision.policy}[/bold]{_plain(extra)} — {reason}")
    if decision.no_estimate_reason:
        return  # the reason above already says there are no numbers
    table = Table("component", "backend", "estimated GiB")
    backends = _plan_backends(spec)
    for name, size in decision.estimate.items():
        table.add_row(_plain(name), _plain(backends[name]), f"{size / GIB:.2f}")
    table.add_row("total", "", f"{sum(decision.estimate.values()) / GIB:.2f}")
    console.print(table)
    usable = max(0, parse_bytes(gpu_memory) - SAFETY_BYTES)
    _print_peaks(decision, usable, f"{gpus} × {gpu_memory}")


@app.command()
@needs_extra("worker")
def quantize(
    preset: Annotated[str, typer.Option(help="preset whose quantization to apply")],
    out: Annotated[Path, typer.Option(help="directory for save_pretrained (or the .gguf file with --gguf)")],
    dequantize: Annotated[bool, typer.Option(help="save the weights back in the preset's dtype")] = False,
    gguf: Annotated[str | None, typer.Option(help="write the transformer as GGUF of this type (e.g. Q8_0)")] = None,
) -> None:
    """Save a quantized pipeline so workers load it without quantizing (runs the worker code in a subprocess)."""
    args = [sys.executable, "-m", "workers.tools.quantize", "--preset", preset, "--out", str(out)]
    if dequantize:
        args.append("--dequantize")
    if gguf:
        args += ["--gguf", gguf]
    raise typer.Exit(subprocess.call(args))
