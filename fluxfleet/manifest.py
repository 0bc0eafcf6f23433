"""The per-job manifest: one JSON line per stored image, sorted by item index."""

from __future__ import annotations

from fluxfleet.jobs import JobStore
from fluxfleet.keys import manifest_key
from fluxfleet.schema import ItemRecord
from fluxfleet.storage import Storage


def manifest_text(records: list[ItemRecord]) -> str:
    return "".join(r.model_dump_json() + "\n" for r in sorted(records, key=lambda r: r.index))


def write_manifest(storage: Storage, jobs: JobStore, job_id: str) -> str:
    """Rebuild the job's manifest from its recorded items (idempotent); returns its location."""
    key = manifest_key(job_id)
    storage.put(key, manifest_text(jobs.records(job_id)).encode(), "application/x-ndjson")
    return storage.location(key)
