"""Storage keys and queue names: the same request always maps to the same names."""

from __future__ import annotations

import hashlib
import json

from fluxfleet.schema import GenerationParams

TASK_GENERATE = "fluxfleet.generate"
"""Stable task name: the producer sends by name and never imports worker code."""

KEY_VERSION = "v1"


def queue_name(preset: str) -> str:
    """One queue per preset, so a worker only receives work its loaded pipeline can do."""
    return f"fluxfleet.{preset}"


def item_key(*, model: str, preset: str, prompt: str, seed: int, params: GenerationParams) -> str:
    """A hash of everything that decides the image (never of the image bytes, which vary by GPU)."""
    request = {
        "v": KEY_VERSION,
        "model": model,
        "preset": preset,
        "prompt": prompt,
        "seed": seed,
        **params.model_dump(),
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


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/manifest.jsonl"
