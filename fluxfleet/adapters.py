"""LoRA adapters of an item: how they are written, what a file must hold, and which presets can run them.

An item names up to ``MAX_ADAPTERS`` adapters, each a source and a scale. Written in a prompt file's JSONL as
``[{"source": "s3://bucket/styles/ink.safetensors", "scale": 0.8}]`` or, anywhere (a CSV column, JSONL, the
Python API, ``--adapter``), as compact text ``ink.safetensors@0.8; brand.safetensors`` (the scale after the
last ``@``, 1.0 when left out; entries split at ``;``). A source is an ``s3://`` object inside the job's
storage, or a local path every worker can read. Hub ids are refused: the producer works offline and the
image's key must hash the file's content, so download the file and name it.

A file must be safetensors with LoRA weights for the FLUX transformer (diffusers, peft or kohya key styles)
of rank at most the preset's ``[adapters] max_rank``; this module reads only its header (8 bytes of length,
then JSON), never the tensors, so the producer checks a file without torch.

Plain data and pure functions, no torch: the producer and the worker's admission both call them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from fluxfleet.errors import ValidationError
from fluxfleet.validation import as_float, shown

FIELD = "adapters"
MAX_ADAPTERS = 4
MAX_SCALE = 4.0
"""Scales are finite and within -MAX_SCALE..MAX_SCALE; 0 leaves the image as without the adapter."""
MAX_SOURCE_CHARS = 1024
MAX_HEADER_BYTES = 64 * 2**20
"""A safetensors header is JSON of a few hundred bytes per tensor; more than this is not a LoRA."""

VERIFIED_BACKENDS = frozenset({"none"})
"""Quantization backends whose transformer LoRA has been run and checked here. diffusers documents peft
LoRA on bitsandbytes, torchao, quanto and GGUF layers, but none of them runs in the CPU test suite."""

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
DOWN = re.compile(r"(?:lora_A|lora_down|lora\.down|lora_linear_layer\.down|_lora\d?\.down)(?:\.[\w]+)?\.weight$")
UP = re.compile(r"(?:lora_B|lora_up|lora\.up|lora_linear_layer\.up|_lora\d?\.up)(?:\.[\w]+)?\.weight$")
FLUX_MODULES = re.compile(
    r"transformer_blocks|double_blocks|single_blocks|x_embedder|context_embedder|proj_out|norm_out|time_text_embed"
    r"|img_in|txt_in|final_layer|time_in|vector_in|guidance_in"
)
"""Module names of FLUX's transformer, as diffusers and the original (kohya, XLabs) checkpoints write them."""
SCALARS = re.compile(r"(?:\.alpha|\.lora_B\.bias|lora_up\.bias|\.dora_scale|lora_magnitude_vector(?:\.\w+)?)$")
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te", "te_", "te1_", "te2_", "text_model")
DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"})


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as written: where it is read from and its scale (not yet read or hashed)."""

    source: str
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.source}@{self.scale!r}"


@dataclass(frozen=True)
class AdapterHeader:
    """What a LoRA file's header says: the largest rank among its LoRA weights."""

    rank: int


class AdapterFileError(ValueError):
    """Raised when a file is not a safetensors LoRA for the FLUX transformer; the message says why."""


# -- how adapters are written -----------------------------------------------------------------------------
def parse_adapters(value: Any, *, where: str = "", field: str = FIELD) -> tuple[AdapterSpec, ...]:
    """``value`` (compact text, a list of ``{source, scale}`` dicts, texts or ``AdapterSpec``) as adapters, or
    ``ValidationError`` naming ``where`` and ``field``; an empty text or list means no adapters."""

    refuse = _refuser(where, field)
    if isinstance(value, str):
        entries: list[Any] = [part for part in value.split(";") if part.strip()]
    elif isinstance(value, AdapterSpec | Mapping):
        entries = [value]
    elif isinstance(value, list | tuple):
        entries = list(value)
    else:
        raise refuse(f"adapters must be a list of {{source, scale}} or a text 'file@scale; ...', not {shown(value)}")
    if len(entries) > MAX_ADAPTERS:
        raise refuse(f"{len(entries)} adapters, over the limit of {MAX_ADAPTERS} per item")
    adapters = tuple(_entry(entry, refuse) for entry in entries)
    sources = [a.source for a in adapters]
    repeated = sorted({s for s in sources if sources.count(s) > 1})
    if repeated:
        raise refuse(f"adapter {shown(repeated[0])} is given twice; give it once with the summed scale")
    return adapters


def _entry(entry: Any, refuse: Any) -> AdapterSpec:
    if isinstance(entry, AdapterSpec):
        return AdapterSpec(check_source(entry.source, refuse), check_scale(entry.scale, refuse))
    if isinstance(entry, str):
        text = entry.strip()
        source, at, scale = text.rpartition("@")
        if not at:
            source, scale = text, "1"
        return AdapterSpec(check_source(source.strip(), refuse), check_scale(scale.strip(), refuse))
    if isinstance(entry, Mapping):
        unknown = sorted(str(k) for k in entry if k not in ("source", "scale"))
        if unknown:
            raise refuse(f"an adapter has the key(s) {', '.join(map(shown, unknown))}; known: source, scale")
        if "source" not in entry:
            raise refuse("an adapter needs a 'source'")
        given = entry.get("scale")
        return AdapterSpec(check_source(entry["source"], refuse), check_scale(1.0 if given is None else given, refuse))
    raise refuse(f"an adapter must be a {{source, scale}} object or a text 'file@scale', not {shown(entry)}")


def check_source(source: Any, refuse: Any) -> str:
    if not isinstance(source, str) or not source.strip():
        raise refuse(f"an adapter's source must be a non-empty text, not {shown(source)}")
    if len(source) > MAX_SOURCE_CHARS:
        raise refuse(f"an adapter's source is longer than {MAX_SOURCE_CHARS} characters")
    if not source.isprintable():
        raise refuse(f"an adapter's source has a control character: {shown(source)}")
    return source.strip()


def check_scale(value: Any, refuse: Any) -> float:
    try:
        scale = as_float(value)
    except ValidationError:
        raise refuse(f"adapter scale {shown(value)} is not a number") from None
    if not math.isfinite(scale) or not -MAX_SCALE <= scale <= MAX_SCALE:
        raise refuse(f"adapter scale {shown(value)} is outside {-MAX_SCALE:g}..{MAX_SCALE:g}")
    return scale + 0.0  # -0.0 is 0.0: one scale, one key


# -- where a source lives ---------------------------------------------------------------------------------
def is_s3(source: str) -> bool:
    return source.lower().startswith("s3://")


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` with no file suffix: the form of a Hugging Face repository id."""
    return bool(HUB_ID.fullmatch(source)) and not source.lower().endswith(".safetensors") and ".." not in source


def storage_key(source: str, bucket: str | None, prefix: str) -> str:
    """The key, relative to the job's storage (bucket and prefix), of an ``s3://`` source; ``AdapterFileError``
    when the object lies outside it (the workers read adapters with the job's storage credentials only)."""
    rest = source[len("s3://") :]
    source_bucket, _, key = rest.partition("/")
    if bucket is None:
        raise AdapterFileError(f"{source} is an S3 object, but the job's storage is not S3 (FLUXFLEET_STORAGE__URL)")
    if source_bucket != bucket:
        raise AdapterFileError(f"{source} is not in the job's bucket '{bucket}'")
    prefix = prefix.strip("/")
    if prefix:
        if not key.startswith(prefix + "/"):
            raise AdapterFileError(f"{source} is not under the job's storage prefix '{prefix}/'")
        key = key[len(prefix) + 1 :]
    if not key or key.endswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise AdapterFileError(f"{source} does not name an object")
    return key


# -- what a file must hold --------------------------------------------------------------------------------
def read_header(file: IO[bytes], size: int) -> AdapterHeader:
    """The LoRA header of the safetensors file of ``size`` bytes open at its start, or ``AdapterFileError``."""
    if size < 8:
        raise AdapterFileError(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", file.read(8))
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterFileError(f"not a safetensors file: its header claims {length} bytes, the file has {size}")
    raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterFileError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise AdapterFileError("not a safetensors file: its header is not a JSON object")
    data_bytes = size - 8 - length
    ranks: list[int] = []
    ups = 0
    full: list[str] = []
    foreign: list[str] = []  # LoRA weights for modules FLUX does not have (an SDXL LoRA's down_blocks, say)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = _check_tensor(name, entry, data_bytes)
        if name.lower().startswith(TEXT_ENCODER_PREFIXES):
            continue  # a text encoder's LoRA: not the transformer's
        if DOWN.search(name):
            if len(shape) < 2:
                raise AdapterFileError(f"LoRA weight {shown(name)} has shape {shape}, not a matrix")
            if not FLUX_MODULES.search(name):
                foreign.append(name)
                continue
            ranks.append(shape[0])
        elif UP.search(name):
            ups += 1
        elif not SCALARS.search(name):
            full.append(name)
    if not ranks or not ups:
        other = f"; its LoRA weights name other modules, such as {shown(foreign[0])}" if foreign else ""
        raise AdapterFileError(
            "no LoRA weights for the FLUX transformer (keys with lora_A/lora_B, lora_down/lora_up or lora.down/up"
            f" on FLUX's blocks){other}"
        )
    if full:
        # diffusers would copy such a weight (a norm layer's, say) into the transformer itself, where disabling
        # LoRA for the next item does not undo it.
        raise AdapterFileError(
            f"holds {shown(full[0])}, a full weight rather than a LoRA matrix; it would overwrite the base model"
        )
    return AdapterHeader(rank=max(ranks))


def _check_tensor(name: str, entry: Any, data_bytes: int) -> list[int]:
    if not isinstance(entry, dict):
        raise AdapterFileError(f"not a safetensors file: tensor {shown(name)} is not described by an object")
    shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
    if dtype not in DTYPES:
        raise AdapterFileError(f"tensor {shown(name)} has an unknown dtype {shown(dtype)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise AdapterFileError(f"tensor {shown(name)} has an invalid shape {shown(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise AdapterFileError(f"tensor {shown(name)} lies outside the file (offsets {shown(offsets)})")
    return shape


# -- which presets run them -------------------------------------------------------------------------------
def preset_refusal(preset: Any) -> str | None:
    """Why ``preset`` cannot run LoRA adapters (a sentence), or None."""
    speed, backend = preset.speed, preset.quantization.backend
    name = f"preset '{preset.name}'"
    if speed.transformer_fp8 != "none":
        return (
            f"{name} cannot run LoRA adapters: its transformer_fp8 = '{speed.transformer_fp8}' replaces the "
            "transformer's linear layers with float8 ones that peft cannot wrap; use a bf16 preset such as 'bf16'"
        )
    if speed.fuse_qkv:
        return (
            f"{name} cannot run LoRA adapters: fuse_qkv merges the to_q/to_k/to_v projections a LoRA targets, so "
            "its weights there would be ignored"
        )
    if speed.cuda_graph:
        return f"{name} cannot run LoRA adapters: cuda_graph replays a captured forward that would not see them"
    quantizes_transformer = "transformer" in preset.quantization.components or backend == "gguf"
    if backend not in VERIFIED_BACKENDS and quantizes_transformer:
        return (
            f"{name} cannot run LoRA adapters: LoRA on a transformer quantized by '{backend}' is not verified by "
            "fluxfleet's tests; use a preset whose transformer is not quantized, such as 'bf16'"
        )
    return None


def check_adapters(adapters: Iterable[Any], preset: Any, *, where: str = "") -> None:
    """Refuse an item's ``AdapterRef``s: too many, a bad scale, one file twice, or a preset without LoRA. The
    producer checks each item with it as it builds it, and the worker's admission each item it receives."""
    adapters = list(adapters)
    if not adapters:
        return
    refuse = _refuser(where)
    if len(adapters) > MAX_ADAPTERS:
        raise refuse(f"{len(adapters)} adapters, over the limit of {MAX_ADAPTERS} per item")
    for adapter in adapters:
        check_scale(adapter.scale, refuse)
    _check_distinct(adapters, where)
    refusal = preset_refusal(preset)
    if refusal:
        raise refuse(refusal)


def adapter_refs(
    adapters: Iterable[Any], resolved: Mapping[str, tuple[str, str]], *, where: str = ""
) -> tuple[Any, ...]:
    """The item's ``AdapterRef``s: each written source's (source as workers read it, sha256) from ``resolved``,
    which the producer filled by reading the files (``producer.adapters``) before building items."""
    from fluxfleet.schema import AdapterRef

    refs = []
    for adapter in adapters:
        if isinstance(adapter, AdapterRef):
            refs.append(adapter)
            continue
        if adapter.source not in resolved:
            raise _refuser(where)(f"adapter {shown(adapter.source)} was not read at submit (producer.adapters)")
        source, sha256 = resolved[adapter.source]
        refs.append(AdapterRef(source=source, sha256=sha256, scale=adapter.scale))
    return tuple(refs)


def _check_distinct(refs: list[Any], where: str) -> None:
    digests = [ref.sha256 for ref in refs]
    for ref in refs:
        if digests.count(ref.sha256) > 1:
            twins = " and ".join(shown(r.source) for r in refs if r.sha256 == ref.sha256)
            raise _refuser(where)(f"adapters {twins} are the same file; give it once with the summed scale")


def check_rank(header: AdapterHeader, source: str, max_rank: int, *, where: str = "") -> None:
    if header.rank > max_rank:
        raise _refuser(where)(
            f"adapter {shown(source)} has rank {header.rank}, over the preset's [adapters] max_rank of {max_rank}"
        )


def _refuser(where: str, field: str = FIELD) -> Any:
    return lambda why: ValidationError(why, where=where, field=field)
