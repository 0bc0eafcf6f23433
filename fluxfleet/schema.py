"""The messages that cross the queue and the records that land in storage.

A job is a list of items; each item is one image. The producer groups items that can share one
batched pipeline call into a task; the worker answers each item with an ``ItemRecord`` (one
manifest line) or a failure with its reason.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from fluxfleet.caching import NONE as NONE_CACHE
from fluxfleet.keys import check_job_id

SCHEMA_VERSION = 1

SEED_LIMIT = 2**64
"""Seeds are 0..2^64-1: the range ``torch.Generator.manual_seed`` takes and keeps exactly."""


class GenerationParams(BaseModel):
    """Everything besides the prompt that decides an image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Strict: JSON ``true`` or ``"64"`` is refused instead of read as 1 or 64.
    width: StrictInt
    height: StrictInt
    steps: StrictInt
    guidance: float = Field(strict=True, allow_inf_nan=False)
    max_sequence_length: StrictInt
    cache: str = Field(
        NONE_CACHE, description="step caching policy, canonical (fluxfleet.caching); 'none' computes every step"
    )

    def batch_shape(self) -> tuple[int, int, int, float, int, str]:
        """Items with equal shapes and policies can run in one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance, self.max_sequence_length, self.cache)

    def request(self) -> dict[str, object]:
        """The fields that decide the image, as the storage key hashes them: a field at its default (no cache)
        is left out, so requests made before the field existed keep their keys."""
        return self.model_dump(exclude_defaults=True)


class Item(BaseModel):
    """One image to make: its prompt, seed, parameters and storage key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, description="position in the job")
    prompt: str
    seed: StrictInt = Field(ge=0, lt=SEED_LIMIT)
    params: GenerationParams
    key: str = Field(pattern=r"^[0-9a-f]{40}$", description="hash of the request; names the stored image")
    source: str = Field("", description="where the item came from, e.g. 'prompts.csv:12'")


class TaskPayload(BaseModel):
    """The body of one queue message: items of one job that share a batch shape."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    job_id: str
    task_id: str
    preset: str
    model: str
    items: list[Item]
    enqueued_at: float

    @field_validator("job_id")
    @classmethod
    def _safe_job_id(cls, value: str) -> str:
        # The job id names a storage prefix: one with '/' or '..' could write outside it.
        return check_job_id(value)

    @field_validator("preset")
    @classmethod
    def _preset_is_a_name(cls, value: str) -> str:
        # The preset names a queue and a file: a message naming '../x' is refused by the worker too.
        from fluxfleet.presets import check_preset_name

        return check_preset_name(value)


class Timings(BaseModel):
    """Seconds spent on one item, by stage."""

    queue_wait_s: float = 0.0
    generate_s: float = 0.0
    encode_s: float = 0.0
    upload_s: float = 0.0


class ItemRecord(BaseModel):
    """One manifest line: a stored image and how it was made."""

    job_id: str
    index: int
    key: str
    image_key: str
    location: str
    prompt: str
    seed: int
    params: GenerationParams
    preset: str
    model: str
    worker: str
    gpu: str
    timings: Timings
    sha256: str
    skipped: bool = Field(False, description="the image already existed; nothing was generated")
    steps_computed: int | None = Field(
        None, description="denoising steps run through the transformer's blocks; the others reused a cache"
    )
    steps_reused: int | None = Field(None, description="denoising steps the cache policy reused (none: 0)")
    finished_at: float


class ItemFailure(BaseModel):
    """An item that will not be retried, and why."""

    job_id: str
    index: int
    key: str
    reason: str
    finished_at: float


JobState = Literal["submitting", "running", "done", "failed", "cancelled", "lost", "aborted"]


class JobStatus(BaseModel):
    """Progress of a job, read from fluxfleet's own records in Redis."""

    job_id: str
    preset: str
    state: JobState
    total: int
    done: int
    skipped: int
    failed: int
    cancelled: int
    created_at: float
    finished_at: float | None = None
    missing: int = Field(0, description="items neither done, failed, nor still queued (lost)")

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def is_terminal(self) -> bool:
        return self.state in ("done", "failed", "cancelled", "lost", "aborted")
