"""Storage in a local directory: the embedded default, also fine on a shared filesystem."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from fluxfleet.errors import StorageError
from fluxfleet.storage.base import Storage


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_url(cls, url: str) -> LocalStorage:
        parts = urlsplit(url)
        # file://./outputs (relative) and file:///abs/path (absolute) both work.
        raw = parts.netloc + parts.path
        return cls(Path(raw).expanduser().resolve())

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StorageError(f"key '{key}' escapes the storage root {self.root}")
        return path

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-check-"):
                pass
        except OSError as e:
            raise StorageError(f"storage directory {self.root} is not writable: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _write_temp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put_if_absent(self, key: str, data: bytes, content_type: str, sha256: str | None = None) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data)
            try:
                # link() fails if the target exists: an atomic conditional write, and readers
                # never see a partial file.
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from e

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            os.replace(self._write_temp(path, data), path)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from e

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def digest(self, key: str) -> str:
        # Hashing the file is a local read, streamed in chunks: nothing to record at write time, and
        # nothing that a file replaced by hand could leave stale.
        try:
            with self._path(key).open("rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            raise KeyError(key) from None

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        search = base if base.is_dir() else base.parent
        if not search.exists():
            return
        for path in sorted(search.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not path.name.startswith("."):
                yield key

    def location(self, key: str) -> str:
        return str(self._path(key))
