"""Reading a job's LoRA adapter files at submit, before any item is built or anything is enqueued.

Each distinct source is read once: a local file from disk, an ``s3://`` object through the job's storage. Its
safetensors header is checked (``fluxfleet.adapters.read_header``: LoRA weights for the FLUX transformer, rank
within the preset's limit) and its content hashed: the sha256 goes into every item's request, so the key names
the file's content, and a worker refuses a file that changed since. Errors name the first item that uses the
source, and the field ``adapters``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fluxfleet.adapters import (
    FIELD,
    AdapterFileError,
    AdapterHeader,
    AdapterSpec,
    check_rank,
    is_s3,
    looks_like_hub_id,
    preset_refusal,
    read_header,
    storage_key,
)
from fluxfleet.errors import ValidationError
from fluxfleet.presets import Preset
from fluxfleet.settings import Settings
from fluxfleet.storage import Storage
from fluxfleet.validation import shown
from producer.inputs import SUBMIT, PromptSpec, coerce_overrides

Resolved = dict[str, tuple[str, str]]
"""Each written source: (the source workers read, the content's sha256)."""


def resolve_adapters(
    specs: Sequence[PromptSpec],
    job_params: dict[str, Any],
    preset: Preset,
    settings: Settings,
    storage: Callable[[], Storage],
) -> tuple[tuple[AdapterSpec, ...], Resolved]:
    """Read, check and hash every adapter the job's items use; ``ValidationError`` for the first bad one.

    Returns the job's default adapters, taken out of ``job_params`` (``Client.submit``'s checked keywords), and
    each source's (source workers read, sha256). ``storage`` opens the job's storage, only when an ``s3://``
    source needs it."""
    job_adapters: tuple[AdapterSpec, ...] = job_params.pop("adapters", ())
    max_bytes = settings.adapters.cache_bytes
    first_use: dict[str, str] = {}
    for where, adapters in _written(specs, job_adapters):
        for adapter in adapters:
            first_use.setdefault(adapter.source, where)
    refusal = preset_refusal(preset)
    if refusal and first_use:
        # Refused before any file is read, naming the first item that asks for an adapter.
        raise ValidationError(refusal, where=next(iter(first_use.values())), field=FIELD)
    resolved: Resolved = {}
    for source, where in first_use.items():
        try:
            resolved[source], header = _read(source, storage, max_bytes)
        except AdapterFileError as e:
            raise ValidationError(f"adapter {shown(source)}: {e}", where=where, field=FIELD) from None
        check_rank(header, source, preset.adapters.max_rank, where=where)
    return job_adapters, resolved


def _written(specs: Sequence[PromptSpec], job_adapters: tuple[AdapterSpec, ...]) -> Iterator[tuple[str, Any]]:
    if job_adapters:
        yield SUBMIT, job_adapters
    for index, spec in enumerate(specs):
        where = spec.source or f"prompt {index + 1}"
        overrides = coerce_overrides(spec.overrides, where)
        yield where, overrides.get("adapters", ())


def _read(source: str, storage: Callable[[], Storage], max_bytes: int) -> tuple[tuple[str, str], AdapterHeader]:
    """((the source workers read, sha256), header) of one adapter; ``AdapterFileError`` naming the problem."""
    if is_s3(source):
        store = storage()
        key = storage_key(source, getattr(store, "bucket", None), getattr(store, "prefix", ""))
        try:
            data = store.get(key)
        except KeyError:
            raise AdapterFileError("no such object in the job's storage") from None
        _check_size(len(data), max_bytes)
        header = read_header(io.BytesIO(data), len(data))
        return (source, hashlib.sha256(data).hexdigest()), header
    path = Path(source).expanduser()
    if not path.is_file():
        if looks_like_hub_id(source) and not path.exists():
            raise AdapterFileError(
                "looks like a Hugging Face hub id; hub adapters are not fetched (the key must hash the file): "
                "download the .safetensors file and name its path, or upload it to the job's S3 storage"
            )
        raise AdapterFileError("no such file" if not path.exists() else "not a regular file")
    try:
        with path.open("rb") as file:
            size = path.stat().st_size
            _check_size(size, max_bytes)
            header = read_header(file, size)
            file.seek(0)
            sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as e:
        raise AdapterFileError(f"cannot read the file: {e.strerror}") from None
    # Absolute: workers do not share the submitting shell's working directory.
    return (str(path.resolve()), sha256), header


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise AdapterFileError(
            f"{size} bytes, larger than a worker's adapter cache of {max_bytes} (FLUXFLEET_ADAPTERS__CACHE_BYTES)"
        )
