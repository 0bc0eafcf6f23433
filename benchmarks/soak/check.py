"""The end state the soak promises, read from Redis and storage after every fault has been healed."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxfleet.keys import manifest_key
from producer.client import Client

TERMINAL = ("done", "failed", "cancelled")


@dataclass
class SubmittedJob:
    job_id: str
    storage: str  # "s3" or "file"
    client: Client


def job_state(job: SubmittedJob) -> dict[str, Any]:
    """One job's counts: items, outcomes, items without one, manifest lines against records."""
    jobs = job.client.jobs
    status = jobs.status(job.job_id)
    keys = [item.key for task in jobs.task_payloads(job.job_id) for item in task.items]
    without = sum(not finished for finished in jobs.are_finished(job.job_id, keys))
    records = jobs.records(job.job_id)
    reasons = Counter(reason_kind(failure.reason) for failure in jobs.failures(job.job_id))
    missing_manifest = (
        status is not None and status.state in TERMINAL and not job.client.storage.exists(manifest_key(job.job_id))
    )
    if missing_manifest:
        # A job that ended while its storage was full has no manifest yet; a reader's request writes it.
        job.client.job(job.job_id).manifest_location()
    try:
        lines = job.client.storage.get(manifest_key(job.job_id)).decode().splitlines()
    except KeyError:
        lines = []
    manifest_keys = sorted(line.split('"key":"', 1)[1][:40] for line in lines if '"key":"' in line)
    return {
        "job_id": job.job_id,
        "storage": job.storage,
        "state": status.state if status else None,
        "items": len(keys),
        "done": status.done if status else 0,
        "skipped": status.skipped if status else 0,
        "failed": status.failed if status else 0,
        "cancelled": status.cancelled if status else 0,
        "without_outcome": without,
        "records": len(records),
        "manifest_lines": len(lines),
        "manifest_matches_records": manifest_keys == sorted(r.key for r in records),
        "terminal": bool(status and status.state in TERMINAL and status.finished == status.total),
        "failure_reasons": dict(reasons),
        "manifest_missing_at_end": missing_manifest,
        "image_keys": {r.image_key for r in records},
    }


def reason_kind(reason: str) -> str:
    """A failure reason without its item's path and key, so reasons can be counted by kind."""
    without_path = re.sub(r"\S*images/[0-9a-f]{2}/[0-9a-f]{40}\S*?(?=:|\s|$)", "<image>", reason)
    return re.sub(r"[0-9a-f]{40}", "<key>", without_path)[:200]


def file_objects(root: Path) -> dict[str, Any]:
    """PNGs under ``images/`` and temporary files (``.<name>.*``) anywhere in a storage directory."""
    images: list[str] = []
    temporaries: list[str] = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            relative = str(Path(dirpath, name).relative_to(root))
            if name.startswith("."):
                temporaries.append(relative)
            elif relative.startswith("images/") and name.endswith(".png"):
                images.append(relative)
    return {"objects": images, "temporaries": temporaries}


def objects_check(objects: list[str], records: set[str], puts: dict[str, int] | None = None) -> dict[str, int]:
    """Stored images against the image keys of the records: written once, none without a record."""
    unique = set(objects)
    written_twice = sum(n - 1 for n in (puts or {}).values() if n > 1)
    return {
        "objects": len(objects),
        "unique_keys": len(unique),
        "duplicates": len(objects) - len(unique) + written_twice,
        "without_record": len(unique - records),
        "records_without_object": len(records - unique),
    }


def invariants(summary: dict[str, Any], bound_s: float) -> list[dict[str, Any]]:
    """(name, observed, expected, ok) rows; the run fails unless every row holds."""
    s = summary
    rows = [
        ("items submitted (all jobs of the plan)", s["submitted"], s["planned"], None),
        ("items with an outcome (done/failed/cancelled)", s["with_outcome"], s["submitted"], None),
        ("items without an outcome", s["without_outcome"], 0, None),
        ("duplicate objects (written more than once)", s["duplicates"], 0, None),
        ("stored objects without a record", s["objects_without_record"], 0, None),
        ("records without a stored object", s["records_without_object"], 0, None),
        ("jobs whose manifest lines != records (as read)", s["manifest_mismatches"], 0, None),
        ("jobs not terminal", s["jobs_not_terminal"], 0, None),
        ("temporary files left in file storage", s["temporaries"], 0, None),
        ("workers that exited without being killed", s["unexpected_worker_exits"], 0, None),
        ("junk messages refused and counted", s["junk_refused"], s["junk_pushed"], None),
        ("wall time to the last job's end (s)", s["wall_s"], f"<= {bound_s:g}", s["wall_s"] <= bound_s),
    ]
    return [
        {
            "invariant": name,
            "observed": observed,
            "expected": expected,
            "ok": observed == expected if ok is None else ok,
        }
        for name, observed, expected, ok in rows
    ]


def image_keys_of(states: list[dict[str, Any]], storage: str) -> set[str]:
    return {key for state in states if state["storage"] == storage for key in state["image_keys"]}
