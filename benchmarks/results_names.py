"""Names of benchmark result files: ``<date>-<device>-<what>.<ext>`` in ``benchmarks/results/``.

``2026-11-23-H100-fast-vs-anchors.json``: the UTC date of the run, the device (``H100``; ``2xH200`` for two GPUs
of one host; ``cpu`` for the CPU benchmarks) and what was measured. A run's log has the same stem. The device
part never contains a dash, so a name splits back into its parts (``parse``). Every script that writes results
takes its default file name from here; ``benchmarks/summarize.py`` reads the parts back::

    result_path("fast-vs-anchors", device_tag("NVIDIA H100 80GB HBM3, 580.159.04"))
    # benchmarks/results/2026-11-23-H100-fast-vs-anchors.json
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2})-(?P<device>(?:\d+x)?[A-Za-z0-9]+)-(?P<what>[^/]+)\.(?P<ext>[a-z]+)$")
# Words of a GPU's marketing name that say nothing about which chip it is (memory size, form factor, vendor).
NOISE = re.compile(r"^(nvidia|geforce|tesla|quadro|\d+gb|hbm\d*e?|sxm\d*|pcie|nvl|generation|mig.*)$", re.I)


@dataclass(frozen=True)
class ResultName:
    """The parts of a result file's name."""

    date: str  # YYYY-MM-DD, UTC
    device: str  # H100, 2xH200, cpu
    what: str  # what was measured, e.g. fast-vs-anchors
    ext: str  # json, log

    @property
    def gpus(self) -> int:
        """GPUs of one host that the run used (0 for a CPU run)."""
        if self.device == "cpu":
            return 0
        count, x, _ = self.device.partition("x")
        return int(count) if x and count.isdigit() else 1


def parse(name: str) -> ResultName | None:
    """The parts of ``name``, or None when it does not follow the scheme."""
    m = NAME.match(name)
    return ResultName(m["date"], m["device"], m["what"], m["ext"]) if m else None


def device_tag(device: str) -> str:
    """``H100`` for "NVIDIA H100 80GB HBM3, 580.159.04", ``2xH200`` for "2x NVIDIA H200", ``cpu`` for no GPU.

    Takes what nvidia-smi or the results' ``device`` field say: a driver after a comma and a memory size in
    parentheses are ignored, as are the words in ``NOISE``.
    """
    text = device.split(",")[0].split("(")[0].strip()
    count = 1
    if m := re.match(r"^(\d+)\s*x\s+(.*)$", text):
        count, text = int(m[1]), m[2]
    words = [w for w in re.split(r"[\s_-]+", text) if w and not NOISE.match(w)]
    chip = re.sub(r"[^A-Za-z0-9]", "", "".join(words))
    if not chip or not re.search(r"\d", chip) or text.lower().startswith(("cpu", "x86", "aarch64", "arm")):
        return "cpu"
    return f"{count}x{chip}" if count > 1 else chip


def local_device() -> str:
    """This host's GPUs as ``device_tag`` reads them (through nvidia-smi, so without torch), or ``cpu``."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    names = [n.strip() for n in out.splitlines() if n.strip()]
    if not names:
        return "cpu"
    return device_tag(f"{len(names)}x {names[0]}" if len(names) > 1 else names[0])


def slug(text: str) -> str:
    """``text`` as the ``what`` part of a name: lower case, words joined by dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def result_name(what: str, device: str, ext: str = "json", when: dt.datetime | None = None) -> str:
    """``<date>-<device>-<what>.<ext>`` for a run at ``when`` (now, UTC, by default)."""
    date = (when or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d")
    return f"{date}-{device_tag(device)}-{slug(what)}.{ext}"


def result_path(what: str, device: str, directory: Path = RESULTS_DIR, ext: str = "json") -> Path:
    """Where a new result goes; a second run of the same day gets the UTC time added, never an overwrite."""
    now = dt.datetime.now(dt.UTC)
    path = directory / result_name(what, device, ext, now)
    if path.exists():
        path = directory / result_name(f"{what}-{now:%H%M%S}", device, ext, now)
    return path


def plan_what(plan: str) -> str:
    """What a ``benchmarks/gpu_bench.py`` plan measures: ``fast-vs-anchors`` for "anchor:bf16,fast:cold,worker:fast"."""
    steps = [s.strip() for s in plan.split(",") if s.strip()]
    names: list[str] = []
    for step in steps:
        kind, _, rest = step.partition(":")
        if kind == "anchor":
            continue
        name = (rest if kind == "worker" else kind).replace("@", "-")
        if name not in names:
            names.append(name)
    what = "-".join(names[:3]) + ("-and-more" if len(names) > 3 else "")
    if any(s.startswith("anchor:") for s in steps):
        what = f"{what}-vs-anchors" if what else "anchors"
    return slug(what)
