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


SHA256 = r"^[0-9a-f]{64}$"


class AdapterRef(BaseModel):
    """A LoRA adapter of an item: where it is read from, its content's sha256 (taken at submit) and its scale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="an s3:// object in the job's storage, a local path, or a hub id")
    sha256: str = Field(pattern=SHA256)
    scale: float = Field(strict=True, allow_inf_nan=False)


class InputImageRef(BaseModel):
    """An item's input image (image-to-image): where it is read from, its content's sha256 and size at submit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="an s3:// object in the job's storage, a local path, or an http(s) URL")
    sha256: str = Field(pattern=SHA256)
    width: StrictInt
    height: StrictInt


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
    adapters: tuple[AdapterRef, ...] = Field((), description="LoRA adapters applied to this item, in order")
    image: InputImageRef | None = Field(None, description="the input image of an image-to-image item")
    strength: float | None = Field(
        None, strict=True, allow_inf_nan=False, description="image-to-image: how far from the input image, 0..1"
    )

    def batch_shape(self) -> tuple[object, ...]:
        """Items with equal shapes, policies and adapter sets can run in one pipeline call."""
        adapters = tuple((a.sha256, a.scale) for a in self.adapters)
        img2img = (self.image is not None, self.strength)
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.max_sequence_length,
            self.cache,
            adapters,
            img2img,
        )

    def request(self) -> dict[str, object]:
        """The fields that decide the image, as the storage key hashes them: a field at its default (no cache,
        no adapters, no input image) is left out, so requests made before the field existed keep their keys;
        adapters and input images by their content and scale or strength, not by where they are read from."""
        request = self.model_dump(exclude_defaults=True)
        if self.adapters:
            request["adapters"] = [{"sha256": a.sha256, "scale": a.scale} for a in self.adapters]
        if self.image is not None:
            request["image"] = {"sha256": self.image.sha256}
        return request


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
