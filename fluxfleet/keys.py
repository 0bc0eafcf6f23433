"""Storage keys and queue names: the same request always maps to the same names."""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel

from fluxfleet.errors import ValidationError

TASK_GENERATE = "fluxfleet.generate"
"""Stable task name: the producer sends by name and never imports worker code."""

KEY_VERSION = "v1"

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""Job ids name storage prefixes (``jobs/<id>/``): letters, digits, ``_ . -``; no ``/`` and no ``..``."""


def check_job_id(job_id: str) -> str:
    """``job_id`` unchanged, or ``ValidationError`` if it could escape its storage prefix."""
    if not JOB_ID_PATTERN.fullmatch(job_id) or ".." in job_id:
        raise ValidationError(
            f"job id {job_id!r} is not allowed: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit, without '/' or '..'",
            field="job_id",
        )
    return job_id


def queue_name(preset: str) -> str:
    """One queue per preset, so a worker only receives work its loaded pipeline can do."""
    return f"fluxfleet.{preset}"


def item_key(*, model: str, preset: str, prompt: str, seed: int, params: BaseModel) -> str:
    """A hash of everything that decides the image (never of the image bytes, which vary by GPU).

    ``params`` is a ``fluxfleet.schema.GenerationParams``; typed by its base so the keys do not import the
    schema, which imports them."""
    request = {
        "v": KEY_VERSION,
        "model": model,
        "preset": preset,
        "prompt": prompt,
        "seed": seed,
        **params.request(),  # type: ignore[attr-defined]
    }
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:40]


def derive_seed(job_seed: int, prompt_index: int, image_index: int) -> int:
    """A seed that depends only on the job seed and the item's position, so resubmission repeats it."""
    digest = hashlib.sha256(f"{job_seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**32


def image_key(key: str) -> str:
    return f"images/{key[:2]}/{key}.png"


def record_key(job_id: str, key: str) -> str:
    return f"jobs/{job_id}/records/{key}.json"


def failure_key(job_id: str, key: str) -> str:
    return f"jobs/{job_id}/failures/{key}.json"


def job_spec_key(job_id: str) -> str:
    """The job as submitted (its items), written by the producer: what a resume after Redis data loss reads."""
    return f"jobs/{job_id}/job.json"


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/manifest.jsonl"
