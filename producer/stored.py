"""A job as storage alone knows it: what a resume or a status reads when Redis has lost the job."""

from __future__ import annotations

import json
from typing import Any

from fluxfleet.errors import FluxfleetError
from fluxfleet.keys import job_spec_key
from fluxfleet.schema import ItemFailure, ItemRecord, JobStatus
from fluxfleet.storage import Storage


def stored_outcomes(storage: Storage, job_id: str) -> tuple[dict[str, Any], list[ItemRecord], list[ItemFailure]]:
    """(job spec, stored records, stored failures) from storage alone."""
    try:
        spec = json.loads(storage.get(job_spec_key(job_id)))
    except KeyError:
        where = job_spec_key(job_id)
        raise FluxfleetError(f"unknown job '{job_id}': not in Redis, and no {where} in storage") from None
    records = [
        ItemRecord.model_validate_json(storage.get(key))
        for key in storage.list(f"jobs/{job_id}/records/")
        if key.endswith(".json")
    ]
    failures = [
        ItemFailure.model_validate_json(storage.get(key))
        for key in storage.list(f"jobs/{job_id}/failures/")
        if key.endswith(".json")
    ]
    return spec, records, failures


def status_from_storage(storage: Storage, job_id: str) -> JobStatus:
    """Status of a job Redis has lost: stored items are done, the rest are 'lost'."""
    spec, records, failures = stored_outcomes(storage, job_id)
    done = {r.key for r in records}
    keys = {i["key"] for i in spec["items"]}
    failed = {f.key for f in failures} & (keys - done)
    return JobStatus(
        job_id=job_id,
        preset=spec["preset"],
        state="lost",
        total=len(spec["items"]),
        done=len(done & keys),
        skipped=sum(1 for r in records if r.skipped),
        failed=len(failed),
        cancelled=0,
        created_at=min((r.finished_at for r in records), default=0.0),
        missing=len(keys - done - failed),
    )
