"""Reading prompts files: ``.txt`` (one prompt a line), ``.jsonl`` and ``.csv`` (per-item overrides).

All or nothing, and every value is kept exactly or refused: the first malformed line raises an
``InputFileError`` naming the file, the line and the field. The rules:

- Files are UTF-8; a byte order mark at the start is dropped (it is not part of the first prompt).
- ``.txt``: lines end at ``\\n`` or ``\\r\\n`` only, so U+2028, U+0085 and form feeds stay inside a
  prompt; spaces and tabs around a line are dropped; blank lines and lines starting with ``#`` are
  skipped; a lone ``\\r`` inside a line is refused (a file with old Mac line endings would otherwise
  become one prompt). A prompt with a newline needs ``.jsonl`` or ``.csv``.
- ``.jsonl``: one JSON object a line (lines end at ``\\n``); a repeated key is refused.
- ``.csv``: as Python's csv module writes it: quoted fields keep commas, quotes and newlines, and an
  error names the line the record starts on; a repeated column is refused.
- Numbers: see ``fluxfleet.validation.as_int``/``as_float`` (no round trip through float).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from fluxfleet.adapters import parse_adapters
from fluxfleet.caching import canonical_policy
from fluxfleet.errors import InputFileError, ValidationError
from fluxfleet.input_images import as_strength, parse_source
from fluxfleet.keys import check_job_id
from fluxfleet.schema import SEED_LIMIT
from fluxfleet.validation import as_float, as_int, shown

OVERRIDE_FIELDS: dict[str, type] = {
    "seed": int,
    "width": int,
    "height": int,
    "steps": int,
    "guidance": float,
    "max_sequence_length": int,
    "images_per_prompt": int,
    "cache": str,  # a step caching policy (fluxfleet.caching), kept in its canonical form
    "adapters": tuple,  # LoRA adapters (fluxfleet.adapters): a tuple of AdapterSpec, read and hashed at submit
    "image": str,  # an image-to-image input's source (fluxfleet.input_images), read and hashed at submit
    "strength": float,  # image-to-image strength, 0 < strength <= 1
}
ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
"""diffusers' names for two fields, accepted in files, dicts and ``Client.submit`` keywords."""

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
JOB_PARAMS = ("width", "height", "steps", "guidance", "max_sequence_length", "cache", "adapters", "image", "strength")
"""Job defaults ``Client.submit`` takes as keywords (with the ``ALIASES``)."""
SUBMIT = "Client.submit"


@dataclass(frozen=True)
class PromptSpec:
    """One prompt with the overrides its line gave, and where it came from."""

    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def coerce_overrides(values: Mapping[Any, Any], where: str, noun: str = "field") -> dict[str, Any]:
    """Overrides by their canonical names, each an exact int, a finite float or a canonical cache policy; empty
    values (``None``, ``""``) leave the job default. Unknown names, and a name given twice (also through an alias), are
    refused."""
    if not isinstance(values, Mapping):
        raise ValidationError(f"overrides must be a dict, not {type(values).__name__}", where=where)
    overrides: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValidationError(f"{noun} names must be text, not {shown(key)}", where=where)
        name = ALIASES.get(key.strip(), key.strip())
        if name not in OVERRIDE_FIELDS:
            raise ValidationError(
                f"unknown {noun} {shown(key)} (known: prompt, {', '.join(OVERRIDE_FIELDS)})", where=where, field=key
            )
        if name in given_as:
            raise ValidationError(f"both '{given_as[name]}' and '{key.strip()}' set {name}", where=where, field=name)
        given_as[name] = key.strip()
        if value is None or (isinstance(value, str) and value == ""):
            continue
        convert = FIELD_CONVERTERS.get(name) or _BY_TYPE[OVERRIDE_FIELDS[name]]
        overrides[name] = convert(value, where=where, field=name)
    return overrides


_BY_TYPE: dict[type, Callable[..., Any]] = {int: as_int, float: as_float}
FIELD_CONVERTERS: dict[str, Callable[..., Any]] = {
    "cache": canonical_policy,
    "adapters": parse_adapters,
    "image": parse_source,
    "strength": as_strength,
}
"""Fields that are not plain numbers, with the function that reads (or refuses) a written value:
``convert(value, where=..., field=...)``."""


def spec_from_mapping(raw: Mapping[Any, Any], where: str, noun: str = "field") -> PromptSpec:
    """A JSON object, a CSV row or a dict of the Python API as a prompt with checked overrides."""
    values = dict(raw)
    prompt_keys = [k for k in values if isinstance(k, str) and k.strip() == "prompt"]
    if len(prompt_keys) > 1:
        raise ValidationError(f"the prompt is given twice ({noun}s {prompt_keys})", where=where, field="prompt")
    prompt = values.pop(prompt_keys[0]) if prompt_keys else None
    if not isinstance(prompt, str):
        raise ValidationError("missing or non-text prompt", where=where, field="prompt")
    return PromptSpec(prompt=prompt, overrides=coerce_overrides(values, where, noun), source=where)


def prompt_specs(prompts: Any) -> list[PromptSpec]:
    """The prompts ``Client.submit`` was given, checked: a ``Path`` (a prompts file), one ``str`` (one
    prompt), or an iterable of ``str``, ``dict`` (``prompt`` and overrides) and ``PromptSpec``.

    A lone ``str`` that names a prompts file is refused rather than enqueued as the prompt "prompts.csv";
    inside a list, a ``str`` is always a prompt.
    """
    if isinstance(prompts, os.PathLike):
        return read_prompts(Path(prompts))
    if isinstance(prompts, str):
        if _looks_like_a_file(prompts):
            raise ValidationError(
                f"{shown(prompts)} looks like a prompts file: pass Path({prompts.strip()!r}) to read it, "
                "or a list with the string to submit it as a prompt",
                where=SUBMIT,
                field="prompts",
            )
        return [PromptSpec(prompt=prompts, source="prompt 1")]
    if isinstance(prompts, bytes | bytearray | Mapping) or not isinstance(prompts, Iterable):
        raise ValidationError(
            f"prompts must be a Path, a str or a list of str, dict or PromptSpec, not {type(prompts).__name__}",
            where=SUBMIT,
            field="prompts",
        )
    specs = []
    for index, prompt in enumerate(prompts):
        where = f"prompt {index + 1}"
        if isinstance(prompt, PromptSpec):
            specs.append(prompt if prompt.source else PromptSpec(prompt.prompt, prompt.overrides, where))
        elif isinstance(prompt, str):
            specs.append(PromptSpec(prompt=prompt, source=where))
        elif isinstance(prompt, Mapping):
            specs.append(spec_from_mapping(prompt, where, "key"))
        else:
            raise ValidationError(
                f"must be a str, a dict or a PromptSpec, not {type(prompt).__name__}", where=where, field="prompt"
            )
    if not specs:
        # A job of no items would never finish.
        raise ValidationError("no prompts: a job needs at least one", where=SUBMIT, field="prompts")
    return specs


def _looks_like_a_file(text: str) -> bool:
    name = text.strip()
    if "\n" in name or not name.lower().endswith(PROMPT_SUFFIXES):
        return False
    # "cats.txt" is a file name whether or not it exists yet; "a poem about notes.txt" only if it does.
    return not any(c.isspace() for c in name) or os.path.isfile(name)


def submit_arguments(
    *, preset: Any, job_id: Any, seed: Any, images_per_prompt: Any, params: Mapping[str, Any]
) -> tuple[int, int, dict[str, Any]]:
    """``Client.submit``'s arguments checked: (job seed, images per prompt, job defaults by canonical
    name). Unknown keywords are refused by name, not ignored."""
    if not isinstance(preset, str):
        raise ValidationError(f"preset must be a name (str), not {type(preset).__name__}", where=SUBMIT, field="preset")
    if job_id is not None:
        if not isinstance(job_id, str):
            raise ValidationError(f"job_id must be a str, not {type(job_id).__name__}", where=SUBMIT, field="job_id")
        check_job_id(job_id)
    unknown = [name for name in params if ALIASES.get(name, name) not in JOB_PARAMS]
    if unknown:
        raise ValidationError(
            f"unknown keyword argument(s) {', '.join(map(shown, unknown))}; known: preset, job_id, seed, "
            f"images_per_prompt, {', '.join(JOB_PARAMS)} ({', '.join(f'{a} = {c}' for a, c in ALIASES.items())})",
            where=SUBMIT,
            field=unknown[0],
        )
    # None, as for the job defaults, keeps the default (job seed 0, one image a prompt).
    job_seed = 0 if seed is None else as_int(seed, where=SUBMIT, field="seed")
    if not 0 <= job_seed < SEED_LIMIT:
        raise ValidationError(f"seed {job_seed} is outside 0..2^64-1", where=SUBMIT, field="seed")
    count = 1 if images_per_prompt is None else as_int(images_per_prompt, where=SUBMIT, field="images_per_prompt")
    return job_seed, count, coerce_overrides(params, SUBMIT, "keyword")


def read_prompts(path: Path) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"no such file: {path}")
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise InputFileError(f"unsupported prompts file type '{suffix}' (use .txt, .jsonl or .csv)", where=str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputFileError(f"cannot read the file: {e.strerror}", where=str(path)) from e
    specs = reader(_decode(data, path), path)
    if not specs:
        raise InputFileError("no prompts in file", where=str(path))
    return specs


def _decode(data: bytes, path: Path) -> str:
    # The BOM some editors write is no part of the first prompt (or the CSV header's first column).
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputFileError(f"not UTF-8 text (byte 0x{data[e.start]:02x})", where=f"{path}:{line}") from None


def _read_txt(text: str, path: Path) -> list[PromptSpec]:
    specs = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        where = f"{path}:{number}"
        if "\r" in line:
            raise InputFileError(
                "a carriage return (\\r) inside the line: use \\n or \\r\\n line endings, or a .jsonl file for "
                "prompts with line breaks",
                where=where,
                field="prompt",
            )
        prompt = line.strip(" \t")
        if prompt and not prompt.startswith("#"):
            specs.append(PromptSpec(prompt=prompt, source=where))
    return specs


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"the key {shown(key)} appears twice in one object")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys without a word; a value silently dropped is refused.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _RepeatedKey(key)
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _read_jsonl(text: str, path: Path) -> list[PromptSpec]:
    specs = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(" \t\r"):
            continue
        where = f"{path}:{number}"
        try:
            # Decimal: 9007199254740993.0 or 1e400 reach the int check as written, not as a rounded float.
            raw = json.loads(line, object_pairs_hook=_unique_keys, parse_float=Decimal, parse_constant=_no_constants)
        except json.JSONDecodeError as e:
            raise InputFileError(f"invalid JSON: {e.msg} at column {e.colno}", where=where) from None
        except _RepeatedKey as e:
            raise InputFileError(str(e), where=where, field=e.key) from None
        except ValueError as e:  # NaN/Infinity, or an integer of over 4300 digits
            problem = "a number of thousands of digits" if "digits" in str(e) else str(e)
            raise InputFileError(f"invalid JSON: {problem}", where=where) from None
        except RecursionError:
            raise InputFileError("invalid JSON: nested too deeply", where=where) from None
        if not isinstance(raw, dict):
            raise InputFileError("each line must be a JSON object", where=where)
        specs.append(_in_file(spec_from_mapping, raw, where, "field"))
    return specs


def _read_csv(text: str, path: Path) -> list[PromptSpec]:
    # newline="": line breaks inside quoted fields reach the csv module as written; it alone decides
    # where a record ends (only \n and \r, never U+2028 or a form feed).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows = iter(reader)
    header = _next_row(rows, reader, path)
    names = [name.strip() for name in header or []]
    if "prompt" not in names:
        raise InputFileError("the header must have a 'prompt' column", where=f"{path}:1", field="prompt")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputFileError(f"repeated column(s) {', '.join(map(shown, repeated))}", where=f"{path}:1")
    specs: list[PromptSpec] = []
    while True:
        start = reader.line_num + 1  # a record with quoted line breaks spans lines: name its first
        row = _next_row(rows, reader, path)
        if row is None:
            return specs
        if not row:
            continue  # a blank line
        where = f"{path}:{start}"
        if len(row) > len(names):
            raise InputFileError("more values than header columns", where=where)
        specs.append(_in_file(spec_from_mapping, dict(zip(names, row, strict=False)), where, "column"))


def _next_row(rows: Any, reader: Any, path: Path) -> list[str] | None:
    start = reader.line_num + 1
    try:
        return next(rows)  # type: ignore[no-any-return]
    except StopIteration:
        return None
    except csv.Error as e:
        raise InputFileError(f"malformed CSV: {e}", where=f"{path}:{start}") from None


def _in_file(build: Callable[..., PromptSpec], *args: Any) -> PromptSpec:
    """A file's errors are all InputFileErrors, with the same place and field."""
    try:
        return build(*args)
    except InputFileError:
        raise
    except ValidationError as e:
        message = str(e).removeprefix(f"{e.where}: ").removesuffix(f" (field '{e.field}')" if e.field else "")
        raise InputFileError(message, where=e.where, field=e.field) from None


_READERS: dict[str, Callable[[str, Path], list[PromptSpec]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
}
