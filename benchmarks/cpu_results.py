"""The results file both CPU benchmarks write: device, date, versions and the measured records."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def write_results(path: Path, benchmark: str, records: list[dict[str, Any]]) -> None:
    versions = {name: version(name) for name in ("celery", "kombu", "redis", "pydantic", "pillow")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "device": cpu_name(),
                "date": time.strftime("%Y-%m-%d"),
                "versions": {"python": platform.python_version(), **versions},
                "benchmark": benchmark,
                "records": records,
            },
            indent=2,
        )
    )
