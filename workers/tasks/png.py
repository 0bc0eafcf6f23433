"""PNG encoding with the generation parameters in a ``parameters`` text chunk, the convention
image tools read."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image, PngImagePlugin

from fluxfleet.errors import ValidationError
from fluxfleet.schema import Item


def parameters_text(item: Item, preset: str, model: str) -> str:
    """The ``parameters`` chunk's text. A NUL would end it early in PNG readers, so the producer and the
    worker's checks refuse prompts with one; this refuses rather than write a text that reads back cut."""
    p = item.params
    text = (
        f"{item.prompt}\n"
        f"Steps: {p.steps}, Sampler: FlowMatchEuler, CFG scale: {p.guidance}, Seed: {item.seed}, "
        f"Size: {p.width}x{p.height}, Model: {model}, Preset: {preset}, "
        f"Max sequence length: {p.max_sequence_length}, Key: {item.key}"
    )
    if p.cache != "none":  # as before caching existed, for an image computed at every step
        text += f", Cache: {p.cache}"
    for adapter in p.adapters:  # by content, as the key hashes them; the source is in the manifest
        text += f", LoRA: {adapter.sha256[:12]}@{adapter.scale!r}"
    if p.image is not None:  # by content, as the key hashes it; the source is in the manifest
        text += f", Init image: {p.image.sha256[:12]}, Strength: {p.strength!r}"
    if "\x00" in text:
        field = "prompt" if "\x00" in item.prompt else "model"
        raise ValidationError("a NUL character cannot be stored in a PNG text chunk", where=item.source, field=field)
    return text


def encode_png(image: Any, item: Item, preset: str, model: str) -> tuple[bytes, str]:
    """The PNG bytes and their sha256."""
    assert isinstance(image, Image.Image)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(item, preset, model))
    buffer = io.BytesIO()
    # compress_level 1: several times faster than the default 6 for ~10% larger files.
    image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()
