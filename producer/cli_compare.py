"""``fluxfleet compare A B``: PSNR and SSIM between two sets of images.

A and B are each a directory of images (matched by file name) or a job manifest (``manifest.jsonl``,
matched by prompt and seed, so the same job run on two presets pairs up). Typical use with real weights:
run one job on ``bf16`` and on ``fast``, then ``fluxfleet compare bf16/manifest.jsonl fast/manifest.jsonl``.

The arithmetic is in ``producer.imagecompare`` (numpy and Pillow, the ``report`` extra), imported when
the command runs so the command line starts without numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from producer.cli_common import app, console, err
from producer.extras import needs_extra

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _manifest_entries(path: Path) -> dict[str, Path]:
    entries: dict[str, Path] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record: dict[str, Any] = json.loads(line)
        location = str(record.get("location", ""))
        if location.startswith("file://"):
            location = location[len("file://") :]
        if "://" in location:
            raise typer.BadParameter(f"{path}: only local image locations can be compared, not '{location}'")
        image = Path(location)
        if not image.is_absolute():
            image = path.parent / image
        params = record.get("params") or {}
        name = f"seed={record.get('seed')} {params.get('width')}x{params.get('height')} | {record.get('prompt', '')}"
        entries[name] = image
    return entries


def collect(source: Path) -> dict[str, Path]:
    """Name -> image path, from a directory (file names) or a manifest (prompt, seed and size)."""
    if source.is_dir():
        return {p.name: p for p in sorted(source.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if source.is_file():
        return _manifest_entries(source)
    raise typer.BadParameter(f"'{source}' is neither an image directory nor a manifest file")


@app.command()
@needs_extra("report")
def compare(
    a: Annotated[Path, typer.Argument(help="image directory or manifest.jsonl (the reference)")],
    b: Annotated[Path, typer.Argument(help="image directory or manifest.jsonl (the candidate)")],
    min_psnr: Annotated[float | None, typer.Option(help="exit 1 if the mean PSNR (dB) is lower")] = None,
    min_ssim: Annotated[float | None, typer.Option(help="exit 1 if the mean SSIM is lower")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """PSNR (RGB) and SSIM (luma) between matching images of two directories or job manifests."""
    from producer.imagecompare import compare_sets

    set_a, set_b = collect(a), collect(b)
    rows = compare_sets(set_a, set_b)
    ok = [r for r in rows if "error" not in r]
    finite = [r["psnr_db"] for r in ok if math.isfinite(r["psnr_db"])]
    summary: dict[str, Any] = {
        "pairs": len(ok),
        "only_in_a": len(set(set_a) - set(set_b)),
        "only_in_b": len(set(set_b) - set(set_a)),
        "size_mismatch": len(rows) - len(ok),
        "mean_psnr_db": (sum(finite) / len(finite)) if finite else (math.inf if ok else None),
        "min_psnr_db": min((r["psnr_db"] for r in ok), default=None),
        "mean_ssim": (sum(r["ssim"] for r in ok) / len(ok)) if ok else None,
        "min_ssim": min((r["ssim"] for r in ok), default=None),
    }
    if as_json:
        print(json.dumps({"summary": summary, "images": rows}, default=str))
    else:
        from rich.table import Table

        table = Table("image", "PSNR dB", "SSIM")
        for r in rows:
            if "error" in r:
                table.add_row(r["name"], "-", r["error"])
            else:
                table.add_row(r["name"], f"{r['psnr_db']:.2f}", f"{r['ssim']:.4f}")
        console.print(table)
        console.print(
            f"{summary['pairs']} pairs; mean PSNR {summary['mean_psnr_db']} dB, mean SSIM {summary['mean_ssim']};"
            f" only in A: {summary['only_in_a']}, only in B: {summary['only_in_b']}"
        )
    if not ok:
        err.print("[red]error:[/red] no matching images to compare")
        raise typer.Exit(2)
    failed = (min_psnr is not None and summary["mean_psnr_db"] < min_psnr) or (
        min_ssim is not None and summary["mean_ssim"] < min_ssim
    )
    if failed:
        raise typer.Exit(1)
