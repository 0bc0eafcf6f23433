"""The messages that cross the queue and the records that land in storage.

A job is a list of items; each item is one image. The producer groups items that can share one
batched pipeline call into a task; the worker answers each item with an ``ItemRecord`` (one
manifest line) or a failure with its reason.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1


class GenerationParams(BaseModel):
    """Everything besides the prompt that decides an image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int
    height: int
    steps: int
    guidance: float
    max_sequence_length: int

    def batch_shape(self) -> tuple[int, int, int, float, int]:
        """Items with equal shapes can run in one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance, self.max_sequence_length)


class Item(BaseModel):
    """One image to make: its prompt, seed, parameters and storage key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, description="position in the job")
    prompt: str
    seed: int = Field(ge=0, lt=2**63)
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
        from fluxfleet.keys import check_job_id

        return check_job_id(value)


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
