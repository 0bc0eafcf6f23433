"""``fluxfleet report JOB --out DIR``: a contact sheet and timing plots from a job's manifest records.

Writes ``contact_sheet.png`` (thumbnails captioned with seed and prompt start), ``throughput.png``
(images per minute and cumulative images over the job's life) and ``seconds_per_image.png`` (a
histogram of end-to-end seconds per generated image). Plots need matplotlib:
``pip install 'fluxfleet[report]'``.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxfleet.schema import ItemRecord
from fluxfleet.storage import Storage

THUMB = 192
CAPTION_LINES = 3
CAPTION_CHARS = 30


@dataclass
class Report:
    contact_sheet: Path
    throughput: Path
    seconds_per_image: Path
    images: int

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def end_to_end_s(record: ItemRecord) -> float:
    t = record.timings
    return t.queue_wait_s + t.generate_s + t.encode_s + t.upload_s


def caption(record: ItemRecord) -> list[str]:
    prompt = " ".join(record.prompt.split())
    lines = textwrap.wrap(prompt, CAPTION_CHARS)[: CAPTION_LINES - 1] or [""]
    if len(lines) == CAPTION_LINES - 1 and len(" ".join(lines)) < len(prompt):
        lines[-1] = lines[-1][: CAPTION_CHARS - 1] + "…"
    return [f"#{record.index} seed {record.seed}", *lines]


def contact_sheet(records: list[ItemRecord], storage: Storage, out: Path, columns: int = 0) -> Path:
    """A grid of thumbnails, each captioned with its index, seed and the start of its prompt."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_h = 14
    cell_w, cell_h = THUMB + 8, THUMB + 8 + line_h * CAPTION_LINES + 4
    columns = columns or max(1, min(8, math.ceil(math.sqrt(max(len(records), 1)))))
    rows = max(1, math.ceil(len(records) / columns))
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, record in enumerate(records):
        x, y = (n % columns) * cell_w + 4, (n // columns) * cell_h + 4
        try:
            with Image.open(io.BytesIO(storage.get(record.image_key))) as image:
                scale = THUMB / max(image.width, image.height)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                # Small images (the tiny preset's 64x64) are enlarged with crisp pixels, large ones smoothed.
                resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
                thumb = image.convert("RGB").resize(size, resample)
        except KeyError:
            thumb = Image.new("RGB", (THUMB, THUMB), "lightgray")
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        for i, line in enumerate(caption(record)):
            draw.text((x, y + THUMB + 4 + i * line_h), line, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: run `pip install 'fluxfleet[report]'`") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_plot(records: list[ItemRecord], started_at: float, out: Path) -> Path:
    """Images finished per minute (bars) and cumulative images (line) since the job was created."""
    plt = _pyplot()
    done = sorted(r.finished_at - started_at for r in records)
    span = max(done[-1] if done else 1.0, 1e-3)
    bin_s = span / 20
    bins = [i * bin_s for i in range(math.ceil(span / bin_s) + 1)]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    if done:
        counts = [0] * (len(bins) - 1 or 1)
        for t in done:
            counts[min(int(t // bin_s), len(counts) - 1)] += 1
        ax.bar([b + bin_s / 2 for b in bins[: len(counts)]], [c * 60 / bin_s for c in counts], width=bin_s * 0.9)
        ax2 = ax.twinx()
        ax2.plot(done, range(1, len(done) + 1), color="tab:orange")
        ax2.set_ylabel("images finished (cumulative)")
    ax.set_xlabel("seconds since the job was submitted")
    ax.set_ylabel("images per minute")
    ax.set_title(f"throughput: {len(done)} images in {span:.1f} s")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def seconds_histogram(records: list[ItemRecord], out: Path) -> Path:
    """Histogram of end-to-end seconds per generated image (skipped images excluded)."""
    plt = _pyplot()
    values = [end_to_end_s(r) for r in records if not r.skipped]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    if values:
        ax.hist(values, bins=min(30, max(5, len(values) // 2)))
        p50 = sorted(values)[len(values) // 2]
        ax.axvline(p50, color="tab:red", linestyle="--", label=f"median {p50:.2f} s")
        ax.legend()
    ax.set_xlabel("seconds per image, end to end (queue wait + generation + encode + upload)")
    ax.set_ylabel("images")
    ax.set_title(f"seconds per image ({len(values)} generated)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(records: list[ItemRecord], storage: Storage, out: Path, started_at: float | None = None) -> Report:
    out.mkdir(parents=True, exist_ok=True)
    if started_at is None:
        started_at = min((r.finished_at - end_to_end_s(r) for r in records), default=0.0)
    return Report(
        contact_sheet=contact_sheet(records, storage, out / "contact_sheet.png"),
        throughput=throughput_plot(records, started_at, out / "throughput.png"),
        seconds_per_image=seconds_histogram(records, out / "seconds_per_image.png"),
        images=len(records),
    )
