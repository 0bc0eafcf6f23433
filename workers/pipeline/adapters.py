"""LoRA adapters on a worker: adapter files in a local cache, loaded into the pipeline and activated per batch.

- ``AdapterCache``: each adapter is fetched once (a local path, or an ``s3://`` object through the job's storage)
  into a directory, named by its sha256 and verified against the sha256 taken at submit; the directory holds at
  most ``FLUXFLEET_ADAPTERS__CACHE_BYTES``, the least recently used files going first.
- ``PipelineAdapters``: loads an adapter with diffusers' ``load_lora_weights`` (peft) under a name of its own,
  activates a batch's adapters with ``set_adapters(names, scales)``, and serves an adapter-free batch with LoRA
  disabled, which runs the base layers alone (the image is bit-identical to one made before any adapter was
  loaded). At most ``FLUXFLEET_ADAPTERS__MAX_LOADED`` stay loaded; the least recently used is deleted.
- Hot-swap, for presets with ``[compile]``: ``enable_lora_hotswap(target_rank=max_rank)`` before compiling
  (``prepare_hotswap``, called by ``workers.pipeline.build``), then adapters go into ``MAX_ADAPTERS`` fixed slots,
  a new one replacing a slot's weights in place (``hotswap=True``) so the compiled transformer is not recompiled
  per adapter.

A file that changed since submit, or that diffusers cannot load, fails the items that use it
(``AdapterFailure``, a job error) and leaves the pipeline as it was for every other item.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluxfleet.adapters import MAX_ADAPTERS, AdapterFileError, is_s3, preset_refusal, storage_key
from fluxfleet.errors import JobError
from fluxfleet.presets import Preset
from fluxfleet.schema import AdapterRef
from fluxfleet.settings import Settings
from fluxfleet.storage import Storage

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"


class AdapterFailure(JobError):
    """Raised when an item's adapter cannot be fetched, verified or loaded: its items fail with the reason."""


class AdapterCache:
    """Verified adapter files on this worker's disk, ``<sha256>.safetensors``, least recently used evicted."""

    def __init__(self, directory: Path, limit_bytes: int, storage: Storage | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.limit_bytes = limit_bytes
        self.storage = storage

    def path(self, ref: AdapterRef) -> Path:
        """The local file of ``ref``, fetched and verified if it is not cached yet."""
        target = self.directory / f"{ref.sha256}{SUFFIX}"
        if target.is_file():
            os.utime(target)  # its last use: eviction goes by modification time
            return target
        data = self._fetch(ref)
        digest = hashlib.sha256(data).hexdigest()
        if digest != ref.sha256:
            raise AdapterFailure(
                f"adapter {ref.source} changed since the job was submitted (sha256 {digest[:12]}, submitted as "
                f"{ref.sha256[:12]}); submit the job again to use the new file"
            )
        if len(data) > self.limit_bytes:
            raise AdapterFailure(
                f"adapter {ref.source} is {len(data)} bytes, larger than this worker's adapter cache of "
                f"{self.limit_bytes} (FLUXFLEET_ADAPTERS__CACHE_BYTES)"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        # Written beside its name and renamed: another worker on this host never reads half a file.
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".part")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, target)
        self.evict(keep=target)
        return target

    def _fetch(self, ref: AdapterRef) -> bytes:
        try:
            if is_s3(ref.source):
                if self.storage is None:
                    raise AdapterFailure(f"adapter {ref.source}: this worker has no S3 storage to read it from")
                store = self.storage
                key = storage_key(ref.source, getattr(store, "bucket", None), getattr(store, "prefix", ""))
                return store.get(key)
            return Path(ref.source).read_bytes()
        except KeyError:
            raise AdapterFailure(f"adapter {ref.source} no longer exists in the job's storage") from None
        except AdapterFileError as e:
            raise AdapterFailure(f"adapter {ref.source}: {e}") from None
        except OSError as e:
            raise AdapterFailure(f"adapter {ref.source} cannot be read on this worker: {e.strerror}") from None

    def files(self) -> list[Path]:
        """Cached files, least recently used first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                found.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:  # another worker evicted it
                continue
        return [path for _, path in sorted(found)]

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently used files until the cache fits its limit; the deleted files."""
        files = self.files()
        sizes = {path: _size(path) for path in files}
        total = sum(sizes.values())
        deleted = []
        for path in files:
            if total <= self.limit_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= sizes[path]
            deleted.append(path)
        return deleted


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class PipelineAdapters:
    """The adapters loaded in one pipeline, by name, least recently used first."""

    def __init__(self, pipe: Any, cache: AdapterCache, max_loaded: int, *, hotswap: bool = False) -> None:
        self.pipe = pipe
        self.cache = cache
        self.hotswap = hotswap
        # Hot-swap keeps MAX_ADAPTERS slots (the compiled graph's shape); otherwise one name per adapter.
        self.max_loaded = MAX_ADAPTERS if hotswap else max(max_loaded, MAX_ADAPTERS)
        self.loaded: OrderedDict[str, str] = OrderedDict()  # name -> sha256, least recently used first
        # Whether the pipeline ever had an adapter (LoRA layers to disable).
        self.touched = bool(getattr(getattr(pipe, "transformer", None), "peft_config", None))

    def activate(self, adapters: Sequence[AdapterRef]) -> None:
        """Make the next pipeline call run with exactly ``adapters`` at their scales (none: the base model).

        Every adapter is fetched and verified, even at scale 0; one at scale 0 is left out of the call, so the
        image is the adapter-free one bit for bit."""
        paths = [self.cache.path(ref) for ref in adapters]
        active = [(ref, path) for ref, path in zip(adapters, paths, strict=True) if ref.scale != 0.0]
        if not active:
            self._disable()
            return
        if self.hotswap:
            names = [self._in_slot(position, ref, path) for position, (ref, path) in enumerate(active)]
        else:
            wanted = {ref.sha256 for ref, _ in active}
            names = [self._by_name(ref, path, wanted) for ref, path in active]
        try:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, [ref.scale for ref, _ in active])
        except Exception as e:
            self._disable()
            raise AdapterFailure(
                f"adapters {', '.join(r.source for r, _ in active)} cannot be set: {_first_line(e)}"
            ) from e

    def _disable(self) -> None:
        if not self.touched:
            return
        try:
            self.pipe.disable_lora()
        except ValueError:  # diffusers: "No adapter loaded" once the last one is deleted
            logger.debug("no adapter left to disable")

    def _by_name(self, ref: AdapterRef, path: Path, wanted: set[str]) -> str:
        """The adapter under a name of its own, loaded unless it is; the least recently used one not in this
        batch is deleted to make room."""
        name = f"lora_{ref.sha256[:16]}"
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return name
        if len(self.loaded) >= self.max_loaded:
            self._delete(next(n for n, sha256 in self.loaded.items() if sha256 not in wanted))
        self._load(name, ref, path, hotswap=False)
        return name

    def _in_slot(self, position: int, ref: AdapterRef, path: Path) -> str:
        """The batch's ``position``-th adapter in slot ``position``: a batch of k adapters always runs slots
        0..k-1, so the compiled graph sees the same adapter names and swapped weights, never a new module."""
        name = f"slot_{position}"
        if self.loaded.get(name) != ref.sha256:
            self._load(name, ref, path, hotswap=name in self.loaded)
        return name

    def _load(self, name: str, ref: AdapterRef, path: Path, *, hotswap: bool) -> None:
        from safetensors.torch import load_file

        self.touched = True
        try:
            try:
                state = load_file(path)
            except FileNotFoundError:  # another worker on this host evicted it just now: fetch it again
                state = load_file(self.cache.path(ref))
            self.pipe.load_lora_weights(state, adapter_name=name, hotswap=hotswap)
            self._check_base_untouched(ref)
        except AdapterFailure:
            raise
        except Exception as e:
            # Whatever the failed load left behind goes (a slot swapped half-way too): the other items run on
            # the pipeline as it was.
            self._delete(name)
            self._disable()
            if type(e).__name__ == "OutOfMemoryError":
                raise  # the engine's own handling: free memory, smaller batches, then the item fails
            raise AdapterFailure(f"adapter {ref.source} cannot be loaded: {_first_line(e)}") from e
        self.loaded[name] = ref.sha256
        logger.info("loaded adapter %s (%s) as %s%s", ref.source, ref.sha256[:12], name, " (hot-swap)" * hotswap)

    def _check_base_untouched(self, ref: AdapterRef) -> None:
        """diffusers copies some weights into the transformer itself (norm layers) and widens linear layers for a
        Control LoRA; neither is undone by disabling LoRA, so such an adapter is unloaded with everything else
        (the base restored) and refused."""
        transformer = self.pipe.transformer
        if not (
            getattr(transformer, "_transformer_norm_layers", None) or getattr(transformer, "_overwritten_params", None)
        ):
            return
        self.pipe.unload_lora_weights(reset_to_overwritten_params=True)
        transformer._overwritten_params = None
        self.loaded.clear()
        raise AdapterFailure(
            f"adapter {ref.source} changes the transformer's own weights or shapes (norm layers, or a Control "
            "LoRA's wider input), which disabling LoRA does not undo; it is not supported"
        )

    def _delete(self, name: str) -> None:
        self.loaded.pop(name, None)
        try:
            self.pipe.delete_adapters(name)
        except Exception:  # never loaded far enough to have a name
            logger.debug("adapter %s had nothing to delete", name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def hotswap_wanted(preset: Preset) -> bool:
    return preset.compile.enabled and preset_refusal(preset) is None


def prepare_hotswap(pipe: Any, preset: Preset) -> None:
    """Before compiling: LoRA layers padded to the preset's max_rank, scales as tensors, so swapping adapters
    later changes weights, never the compiled graph."""
    if hotswap_wanted(preset):
        pipe.enable_lora_hotswap(target_rank=preset.adapters.max_rank)


def worker_adapters(pipe: Any, settings: Settings, preset: Preset, storage: Storage | None) -> PipelineAdapters:
    cache = AdapterCache(settings.adapters.cache_dir, settings.adapters.cache_bytes, storage)
    return PipelineAdapters(pipe, cache, settings.adapters.max_loaded, hotswap=hotswap_wanted(preset))
