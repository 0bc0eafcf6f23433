"""Reading a job's input images at submit: each distinct source once, decoded, hashed and sized.

``Client.submit`` calls :func:`read_input_images` after the prompts are read and before items are built, so
``producer.batching.build_items`` stays a pure function of what it is given. Every item with an ``image`` (its
own, or the job's) leaves here with an ``InputImageRef`` (source made absolute for a local path, sha256, size),
a strength (its own, the job's, or ``DEFAULT_STRENGTH``), and a width and height (its own, the job's, or the
input's size, ``fluxfleet.input_images.default_size``). The first source that cannot be used is refused with
the place of the first item naming it and the field ``image``; nothing is enqueued.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fluxfleet.errors import ValidationError
from fluxfleet.input_images import (
    DEFAULT_STRENGTH,
    UnreadableImage,
    default_size,
    input_ref,
    read_source,
    source_kind,
)
from fluxfleet.schema import InputImageRef
from fluxfleet.settings import LimitSettings
from producer.inputs import SUBMIT, PromptSpec, coerce_overrides

READ_THREADS = 8
"""Sources read at once: a catalogue of URLs is read in parallel, each within its own time limit."""


def read_input_images(
    specs: Sequence[PromptSpec],
    job_params: Mapping[str, Any],
    *,
    storage: Callable[[], Any],
    limits: LimitSettings,
) -> tuple[list[PromptSpec], dict[str, Any]]:
    """(the prompts with their input images read, the job defaults without ``image`` and ``strength``).

    ``storage()`` gives the job's storage, opened only when a source is ``s3://``."""
    job = dict(job_params)
    job_image, job_strength = job.pop("image", None), job.pop("strength", None)
    chosen: list[tuple[PromptSpec, str, dict[str, Any], Any]] = []
    for index, spec in enumerate(specs):
        where = spec.source or f"prompt {index + 1}"
        overrides = coerce_overrides(spec.overrides, where)
        source = overrides.get("image", job_image)
        if source is None and "strength" in overrides:
            raise ValidationError("strength is given without an image to change", where=where, field="strength")
        chosen.append((spec, where, overrides, _absolute(source)))
    if job_strength is not None and all(source is None for *_, source in chosen):
        raise ValidationError("strength is given, but no item has an image", where=SUBMIT, field="strength")
    refs = _read_all(
        [(where, source) for _spec, where, _o, source in chosen if isinstance(source, str)], storage, limits
    )
    resolved = []
    for spec, where, overrides, source in chosen:
        if source is None:
            resolved.append(spec)
            continue
        ref = source if isinstance(source, InputImageRef) else refs[source]
        overrides["image"] = ref
        if "strength" not in overrides:
            overrides["strength"] = DEFAULT_STRENGTH if job_strength is None else job_strength
        width = overrides.get("width", job.get("width"))
        height = overrides.get("height", job.get("height"))
        overrides["width"], overrides["height"] = default_size(ref.width, ref.height, limits, width, height)
        resolved.append(PromptSpec(spec.prompt, overrides, where))
    return resolved, job


def _absolute(source: Any) -> Any:
    """A local path as workers will read it: absolute (they do not share the producer's working directory)."""
    if isinstance(source, str) and source_kind(source) == "local":
        return os.path.abspath(os.path.expanduser(source))
    return source


def _read_all(
    wanted: list[tuple[str, str]], storage: Callable[[], Any], limits: LimitSettings
) -> dict[str, InputImageRef]:
    """Each distinct source read once (in parallel); the first in job order that fails is refused where it is
    first named."""
    first_named: dict[str, str] = {}
    for where, source in wanted:
        first_named.setdefault(source, where)
    # One storage client for every thread, opened before they start and only when a source is s3://.
    job_storage = storage() if any(source_kind(source) == "s3" for source in first_named) else None

    def read(source: str) -> InputImageRef | UnreadableImage:
        try:
            return input_ref(source, read_source(source, storage=lambda: job_storage, limits=limits), limits)
        except UnreadableImage as e:
            return e

    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(first_named)))) as pool:
        results = dict(zip(first_named, pool.map(read, first_named), strict=True))
    refs = {}
    for source, result in results.items():
        if isinstance(result, UnreadableImage):
            raise ValidationError(str(result), where=first_named[source], field="image")
        refs[source] = result
    return refs
