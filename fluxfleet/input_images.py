"""Image-to-image inputs: where an item's ``image`` is read from, how strongly it is changed, and the bounds.

A source is one of:

- ``s3://bucket/key``: an object in the job's own S3 storage (the bucket of ``FLUXFLEET_STORAGE__URL``; the key
  is the object's whole key, not one under the storage prefix);
- ``http://...`` or ``https://...``: read with a time limit (``LimitSettings.input_image_timeout_s``) and a size
  limit; redirects are followed only to other http(s) URLs, at most ``MAX_REDIRECTS`` of them;
- anything else is a local path, which the producer makes absolute; workers read the same path, so it must be
  on a file system they share. A name that starts like a URL scheme (``file:``, ``ftp:``, ``data:``) is refused
  as one: write ``./file:name.png`` for such a file.

``strength`` is diffusers' image-to-image strength: the fraction of the denoising schedule run from the noised
input, 0 < strength <= 1. At 1 the input is fully replaced by noise (text-to-image with the input's size); at 0
diffusers would run no step at all and returns nothing, so fluxfleet refuses 0, and any strength that leaves no
step at the item's step count (``denoising_steps``).

Both the producer (at submit: it reads, decodes and hashes each source once) and the worker (it reads the
source again and checks the content has not changed) read through :func:`read_source` and
:func:`decode_image`. Pillow is imported only when an image is decoded; torch never.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from fluxfleet.caching import parse_policy
from fluxfleet.errors import JobError, StorageError, ValidationError
from fluxfleet.schema import InputImageRef
from fluxfleet.settings import LimitSettings
from fluxfleet.validation import as_float, shown

DEFAULT_STRENGTH = 0.6
"""The strength of an item with an image and no strength of its own or of its job."""
MAX_SOURCE_CHARS = 2048
MAX_REDIRECTS = 3
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""The formats Pillow may decode an input as; others (EPS runs Ghostscript, for one) are refused."""
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is a drive, not a scheme
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
HOOK_POLICIES = ("fbcache", "taylorseer")
"""Cache policies that run as diffusers hooks: they need the ``cache_context`` FluxPipeline opens around each
transformer call, which FluxImg2ImgPipeline (diffusers 0.42.1) does not; MagCache runs without hooks."""
PILLOW_HINT = "image-to-image needs Pillow, which is not installed. Run `pip install 'fluxfleet[img2img]'`"


class UnreadableImage(JobError):
    """Raised when an input image cannot be read, is too large, or does not decode; the message says which
    source and why, and callers add the place (``prompts.csv:3``) and the field."""


# -- checking what was written --------------------------------------------------------------------------------
def source_kind(source: str) -> str:
    """'s3', 'http' or 'local' for a source ``parse_source`` accepted."""
    scheme = _SCHEME.match(source)
    if scheme is None:
        return "local"
    return "s3" if scheme.group(1).lower() == "s3" else "http"


def parse_source(value: Any, *, where: str = "", field: str = "image") -> Any:
    """``value`` as a source (text, stripped), or ``ValidationError`` naming ``where`` and ``field``. An
    ``InputImageRef`` (a source already read) is kept as it is."""
    if isinstance(value, InputImageRef):
        return value

    def refuse(why: str) -> ValidationError:
        return ValidationError(why, where=where, field=field)

    if not isinstance(value, str):
        raise refuse(f"image must be a path or a URL (text), not {type(value).__name__}")
    source = value.strip()
    if len(source) > MAX_SOURCE_CHARS:
        raise refuse(f"image source is {len(source)} characters, over the limit of {MAX_SOURCE_CHARS}")
    if not source.isprintable():
        bad = next(c for c in source if not c.isprintable())
        raise refuse(f"image source {shown(source)} has the unprintable character {bad!r}")
    scheme = _SCHEME.match(source)
    if scheme is None:
        return source
    name = scheme.group(1).lower()
    if name not in ("s3", "http", "https"):
        raise refuse(
            f"image source {shown(source)}: the URL scheme '{name}:' is not read; use s3://, http://, https:// or "
            "a local path (./name for a file whose name has a colon)"
        )
    try:
        parts = urlsplit(source)
        port = parts.port
    except ValueError as e:
        raise refuse(f"image URL {shown(source)} does not parse ({e})") from None
    if name == "s3":
        if not _BUCKET.fullmatch(parts.netloc) or not parts.path.strip("/"):
            raise refuse(f"image source {shown(source)} is not s3://bucket/key")
        return source
    if not parts.hostname or "@" in parts.netloc or port == 0:
        raise refuse(f"image URL {shown(source)} needs a host, and no user:password@ or port 0")
    return source


def as_strength(value: Any, *, where: str = "", field: str = "strength") -> float:
    """``value`` as a strength, 0 < strength <= 1, or ``ValidationError`` naming ``where`` and ``field``."""
    strength = as_float(value, where=where, field=field)
    if strength == 0:
        raise ValidationError(
            "strength 0 would keep the input image as it is: diffusers runs no denoising step; use a strength "
            "above 0 (0.6 changes the style and keeps the composition)",
            where=where,
            field=field,
        )
    if not 0 < strength <= 1:
        raise ValidationError(f"strength {shown(value)} is outside 0..1 (0 excluded)", where=where, field=field)
    return strength


def denoising_steps(steps: int, strength: float) -> int:
    """The denoising steps an image-to-image call runs: diffusers' ``get_timesteps``, which starts the schedule
    at ``int(steps - steps * strength)``."""
    init = min(steps * strength, steps)
    return steps - int(max(steps - init, 0))


def check_input_image(params: Any, limits: LimitSettings, where: str = "") -> None:
    """An item's image and strength agree with each other, its steps and the limits (producer and worker)."""
    if params.image is None:
        if params.strength is not None:
            raise ValidationError("strength is given without an image to change", where=where, field="strength")
        return
    if params.strength is None:
        raise ValidationError("an image needs a strength", where=where, field="strength")
    as_strength(params.strength, where=where)
    if denoising_steps(params.steps, params.strength) < 1:
        raise ValidationError(
            f"strength {params.strength} with {params.steps} steps runs no denoising step; use at least "
            f"{1 / params.steps:.4g}",
            where=where,
            field="strength",
        )
    policy = parse_policy(params.cache, where=where)
    if policy.name in HOOK_POLICIES:
        raise ValidationError(
            f"cache policy {policy.name} cannot run on image-to-image items: diffusers' img2img pipeline gives its "
            "hooks no cache context; use magcache or none",
            where=where,
            field="cache",
        )
    image = params.image
    if not 0 < image.width * image.height <= limits.max_input_image_pixels:
        raise ValidationError(
            f"input image of {image.width}x{image.height} pixels is over the limit of {limits.max_input_image_pixels}",
            where=where,
            field="image",
        )


def default_size(
    width: int, height: int, limits: LimitSettings, given_width: int | None = None, given_height: int | None = None
) -> tuple[int, int]:
    """The item's size for an input of ``width`` x ``height``. Sides the item (or its job) gives are kept; with
    neither, each side is the input's rounded to the nearest multiple of ``size_multiple`` (an input larger than
    ``max_size`` is first scaled down, keeping its aspect); with one, the other keeps the input's aspect. A
    side is then held within ``min_size``..``max_size``."""
    if given_width is not None and given_height is not None:
        return given_width, given_height
    if given_width is not None:
        scale = given_width / width
    elif given_height is not None:
        scale = given_height / height
    else:
        scale = min(1.0, limits.max_size / max(width, height))
    step = limits.size_multiple

    def side(length: int) -> int:
        rounded = int(length * scale / step + 0.5) * step
        return min(max(rounded, limits.min_size), limits.max_size // step * step)

    final_width = side(width) if given_width is None else given_width
    return final_width, side(height) if given_height is None else given_height


# -- reading ---------------------------------------------------------------------------------------------------
def read_source(source: str, *, storage: Callable[[], Any], limits: LimitSettings) -> bytes:
    """The bytes at ``source``, at most ``limits.max_input_image_bytes``; ``UnreadableImage`` saying why not.
    ``storage()`` gives the job's storage (opened only for an s3:// source). A transient S3 failure is raised as
    ``StorageError``."""
    kind = source_kind(source)
    if kind == "s3":
        return _read_s3(source, storage(), limits.max_input_image_bytes)
    if kind == "http":
        return _read_http(source, limits.max_input_image_bytes, limits.input_image_timeout_s)
    return _read_local(source, limits.max_input_image_bytes)


def _too_large(source: str, limit: int, size: int | None = None) -> UnreadableImage:
    """The byte limit (``LimitSettings.max_input_image_bytes``) stated, with the size where it is known."""
    known = "" if size is None else f" is {size} bytes,"
    return UnreadableImage(
        f"image {shown(source)}{known} over the limit of {limit} bytes (FLUXFLEET_LIMITS__MAX_INPUT_IMAGE_BYTES)"
    )


def _read_local(source: str, limit: int) -> bytes:
    path = Path(source).expanduser()
    try:
        # Opened without blocking, then checked: a FIFO or a device (/dev/stdin) would wait or never end.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(descriptor, "rb") as file:
            kind = os.fstat(file.fileno()).st_mode
            if stat.S_ISDIR(kind):
                raise UnreadableImage(f"{shown(source)} is a directory, not an image file")
            if not stat.S_ISREG(kind):
                raise UnreadableImage(f"{shown(source)} is not a regular file")
            data = file.read(limit + 1)
    except FileNotFoundError:
        raise UnreadableImage(f"no such file: {shown(source)}") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{shown(source)} is a directory, not an image file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise UnreadableImage(f"cannot read {shown(source)}: {e.strerror or e}") from None
    if len(data) > limit:
        raise _too_large(source, limit)
    return data


def _read_s3(source: str, storage: Any, limit: int) -> bytes:
    parts = urlsplit(source)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    own = getattr(storage, "bucket", None)
    if own is None or getattr(storage, "client", None) is None:
        raise UnreadableImage(f"image {shown(source)} is in S3, but the job's storage is not (FLUXFLEET_STORAGE__URL)")
    if bucket != own:
        raise UnreadableImage(f"image {shown(source)} is outside the job's storage bucket '{own}'")
    from botocore.exceptions import BotoCoreError, ClientError

    from fluxfleet.storage.s3 import is_transient

    try:
        # One request: the answer's length is checked before its body is read.
        response = storage.client.get_object(Bucket=bucket, Key=key)
        body, size = response["Body"], int(response.get("ContentLength") or 0)
        try:
            if size > limit:
                raise _too_large(source, limit, size)
            data = body.read(limit + 1)
        finally:
            body.close()
    except (ClientError, BotoCoreError) as e:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if isinstance(e, ClientError) else ""
        if code in ("404", "NoSuchKey", "NotFound"):
            raise UnreadableImage(f"no object {shown(source)} in the job's storage") from None
        if is_transient(e):
            raise StorageError(f"S3 read of {source} failed: {e}") from e
        raise UnreadableImage(f"cannot read {shown(source)}: {e}") from None
    if len(data) > limit:
        raise _too_large(source, limit)
    return bytes(data)


class _HttpRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to another http(s) URL, at most ``MAX_REDIRECTS`` times."""

    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        # Checked before urllib's own check, which lets ftp: through and words a refusal as an HTTP error.
        target = urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        scheme = urlsplit(target).scheme.lower()
        if scheme not in ("http", "https"):
            fp.close()
            raise UnreadableImage(f"image URL {shown(req.full_url)} redirects to a '{scheme}:' URL, which is not read")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _read_http(source: str, limit: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(source, headers={"User-Agent": "fluxfleet"})
    try:
        with urllib.request.build_opener(_HttpRedirects).open(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise _too_large(source, limit, int(length))
            chunks, size = [], 0
            while size <= limit:
                if time.monotonic() > deadline:
                    raise UnreadableImage(f"image URL {shown(source)} took over {timeout_s:g} s to read")
                # read1: what has arrived, so a server sending a byte at a time meets the deadline
                chunk = response.read1(min(65536, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as e:
        e.close()
        moved = f" (redirects are followed {MAX_REDIRECTS} times at most)" if 300 <= e.code < 400 else ""
        raise UnreadableImage(f"image URL {shown(source)} answered HTTP {e.code}{moved}") from None
    except urllib.error.URLError as e:
        raise UnreadableImage(f"image URL {shown(source)} cannot be read: {e.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise UnreadableImage(f"image URL {shown(source)} cannot be read: {e or type(e).__name__}") from None
    if size > limit:
        raise _too_large(source, limit)
    return b"".join(chunks)


# -- decoding --------------------------------------------------------------------------------------------------
def decode_image(data: bytes, source: str, limits: LimitSettings) -> Any:
    """``data`` as an RGB ``PIL.Image`` turned upright (EXIF orientation); its size is checked against
    ``max_input_image_pixels`` from the header, before the pixels are decoded."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise UnreadableImage(PILLOW_HINT) from None
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > limits.max_input_image_pixels:
            raise UnreadableImage(f"image {shown(source)} is {width}x{height} pixels, {_over_pixels(limits)}")
        image.load()
        upright = ImageOps.exif_transpose(image)
        return upright.convert("RGB")
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage(
            f"image {shown(source)} declares more pixels than Pillow decodes, {_over_pixels(limits)}"
        ) from None
    except Exception as e:  # Pillow raises many kinds for a broken or unknown file
        raise UnreadableImage(f"{shown(source)} is not an image Pillow can decode ({type(e).__name__})") from None


def _over_pixels(limits: LimitSettings) -> str:
    return f"over the limit of {limits.max_input_image_pixels} pixels (FLUXFLEET_LIMITS__MAX_INPUT_IMAGE_PIXELS)"


def input_ref(source: str, data: bytes, limits: LimitSettings) -> InputImageRef:
    """The reference an item carries: the source, its bytes' sha256 and its decoded size."""
    image = decode_image(data, source, limits)
    return InputImageRef(source=source, sha256=hashlib.sha256(data).hexdigest(), width=image.width, height=image.height)


def item_image_fields(values: Any, where: str = "") -> dict[str, Any]:
    """An item's ``image`` and ``strength`` as its request takes them: an image already read (an
    ``InputImageRef``) with its strength, ``DEFAULT_STRENGTH`` when it has none; a source not read is refused."""
    image, strength = values.get("image"), values.get("strength")
    if isinstance(image, str):
        raise ValidationError(
            f"image {shown(image)} has not been read: Client.submit reads input images before items are built",
            where=where,
            field="image",
        )
    if image is not None and strength is None:
        strength = DEFAULT_STRENGTH
    return {"image": image, "strength": strength}
