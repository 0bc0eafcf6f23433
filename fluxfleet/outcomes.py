"""The one recorder of item outcomes: every path that ends an item goes through ``Outcomes``.

An item's outcome lives in two places: Redis (``JobStore``: progress, ``status``, ``wait``) and storage
(``jobs/<id>/records/<key>.json`` or ``jobs/<id>/failures/<key>.json``: what ``submit --resume`` reads
when Redis has lost the job). The engine's successes and failures, the soft time limit, the hard time
limit (recorded by the worker's parent process) and a task that ran out of retries all record here, so
no path writes one place and forgets the other.

- ``done``: the stored record first (it is written after its image, so it always points at one), then
  the manifest line in Redis;
- ``failed``: Redis first, which a broken store cannot block, then the stored failure records. These
  are best effort: a store that refuses them (full, read-only, gone) is usually why the items failed,
  so the first refusal ends the attempt instead of a thousand items each waiting on a dead store;
- ``finish``: once every item has an outcome the job becomes done or failed and its manifest is
  written. A manifest that cannot be written is logged, not raised: the job still ends, and
  ``Job.manifest_location()`` writes the manifest later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fluxfleet.errors import PermanentStorageError, StorageError
from fluxfleet.jobs import JobStore
from fluxfleet.keys import failure_key, record_key
from fluxfleet.manifest import write_manifest
from fluxfleet.schema import Item, ItemFailure, ItemRecord
from fluxfleet.storage import Storage

logger = logging.getLogger(__name__)


class Outcomes:
    def __init__(self, storage: Storage, jobs: JobStore) -> None:
        self.storage = storage
        self.jobs = jobs

    def done(self, record: ItemRecord) -> bool:
        """Record a stored image; True the first time for this item (False for a redelivered duplicate).

        Raises the storage error if the record cannot be stored: the item then has no outcome yet.
        """
        data = record.model_dump_json().encode()
        self.storage.put_if_absent(record_key(record.job_id, record.key), data, "application/json")
        return self.jobs.record_done(record)

    def failed(self, job_id: str, items: Sequence[Item], reason: str) -> list[ItemFailure]:
        """Record ``items`` as failed with ``reason``, in Redis and (best effort) in storage."""
        now = time.time()
        failures = [
            ItemFailure(job_id=job_id, index=item.index, key=item.key, reason=reason, finished_at=now) for item in items
        ]
        if not failures:
            return []
        self.jobs.record_failures(failures)
        for stored, failure in enumerate(failures):
            try:
                data = failure.model_dump_json().encode()
                self.storage.put_if_absent(failure_key(job_id, failure.key), data, "application/json")
            except (StorageError, PermanentStorageError) as e:
                logger.warning(
                    "could not store the failure records of %d items of job %s (Redis has them): %s",
                    len(failures) - stored,
                    job_id,
                    e,
                )
                break
        return failures

    def finish(self, job_id: str) -> bool:
        """End the job once every item has an outcome and write its manifest; True the first time."""
        if not self.jobs.finish_if_complete(job_id):
            return False
        try:
            location = write_manifest(self.storage, self.jobs, job_id)
        except (StorageError, PermanentStorageError) as e:
            logger.error("job %s complete, but its manifest could not be written: %s", job_id, e)
        else:
            logger.info("job %s complete; manifest at %s", job_id, location)
        return True
