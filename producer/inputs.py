"""Reading prompts files: ``.txt`` (one prompt a line), ``.jsonl`` and ``.csv`` (per-item overrides).

All or nothing: the first malformed line raises an error naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxfleet.errors import InputFileError

OVERRIDE_FIELDS = {
    "seed": int,
    "width": int,
    "height": int,
    "steps": int,
    "guidance": float,
    "max_sequence_length": int,
    "images_per_prompt": int,
}
ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}


@dataclass(frozen=True)
class PromptSpec:
    """One prompt with the overrides its line gave, and where it came from."""

    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _coerce(raw: dict[str, Any], where: str) -> PromptSpec:
    values = {ALIASES.get(k.strip(), k.strip()): v for k, v in raw.items() if k is not None}
    prompt = values.pop("prompt", None)
    if not isinstance(prompt, str):
        raise InputFileError("missing or non-text prompt", where=where, field="prompt")
    overrides: dict[str, Any] = {}
    for name, value in values.items():
        if name not in OVERRIDE_FIELDS:
            raise InputFileError(
                f"unknown column '{name}' (known: prompt, {', '.join(OVERRIDE_FIELDS)})", where=where, field=name
            )
        if value is None or value == "":
            continue
        kind = OVERRIDE_FIELDS[name]
        try:
            if kind is int and isinstance(value, float | str) and float(value) != int(float(value)):
                raise ValueError
            overrides[name] = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            raise InputFileError(f"'{value}' is not a valid {kind.__name__}", where=where, field=name) from None
    return PromptSpec(prompt=prompt, overrides=overrides, source=where)


def read_prompts(path: Path) -> list[PromptSpec]:
    if not path.is_file():
        raise InputFileError(f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"not UTF-8 text: {e}", where=str(path)) from e
    specs: list[PromptSpec] = []
    if suffix == ".txt":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                specs.append(PromptSpec(prompt=line.strip(), source=f"{path}:{number}"))
    elif suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"invalid JSON: {e.msg} at column {e.colno}", where=where) from e
            if not isinstance(raw, dict):
                raise InputFileError("each line must be a JSON object", where=where)
            specs.append(_coerce(raw, where))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in [f.strip() for f in reader.fieldnames]:
            raise InputFileError("the header must have a 'prompt' column", where=f"{path}:1", field="prompt")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise InputFileError("more values than header columns", where=where)
            specs.append(_coerce(row, where))
    else:
        raise InputFileError(f"unsupported prompts file type '{suffix}' (use .txt, .jsonl or .csv)", where=str(path))
    if not specs:
        raise InputFileError("no prompts in file", where=str(path))
    return specs
