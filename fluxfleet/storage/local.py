"""Storage in a local directory: the embedded default, also fine on a shared filesystem.

Every key is reached from the root one path component at a time through directory descriptors opened
with ``O_NOFOLLOW``, so no read or write ever passes through a symbolic link inside the root: a link
found on the way (or as the object itself) is refused with a ``PermanentStorageError`` naming it. The
root itself is resolved once, so a root that is a link (``/data -> /mnt/disk``) works.

Files are created with mode 0666 and directories 0777, less the process's umask (0644 and 0755 under
the usual 022), so others in the group can read results. A write goes to a temporary ``.<name>.<hex>``
beside its target and is linked (``put_if_absent``) or renamed (``put``) into place; the temporary is
removed whatever happens, so a failed write (no space, read-only) leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

from fluxfleet.errors import PermanentStorageError
from fluxfleet.retry import storage_error
from fluxfleet.storage.base import Storage

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_url(cls, url: str) -> LocalStorage:
        parts = urlsplit(url)
        # file://./outputs (relative) and file:///abs/path (absolute) both work.
        raw = parts.netloc + parts.path
        return cls(Path(raw).expanduser().resolve())

    # -- paths ---------------------------------------------------------------------------------
    def _parts(self, key: str) -> list[str]:
        parts = key.split("/")
        if key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in parts):
            raise PermanentStorageError(f"key '{key}' escapes the storage root {self.root}")
        return parts

    def _link_error(self, path: Path) -> PermanentStorageError:
        return PermanentStorageError(
            f"{path} is a symbolic link inside the storage root {self.root}; fluxfleet never reads or "
            "writes through a link: replace it with a directory or file"
        )

    @contextmanager
    def _directory(self, key: str, *, create: bool) -> Iterator[tuple[int, str, Path]]:
        """(descriptor of the key's directory, the key's last name, the key's path), walked from the
        root without following a link; ``create`` makes missing directories on the way."""
        parts = self._parts(key)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        path = self.root
        try:
            for name in parts[:-1]:
                path = path / name
                if create:
                    with suppress(FileExistsError):
                        os.mkdir(name, 0o777, dir_fd=fd)
                try:
                    next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR) and self._is_link(fd, name):
                        raise self._link_error(path) from e
                    raise
                os.close(fd)
                fd = next_fd
            yield fd, parts[-1], path / parts[-1]
        finally:
            os.close(fd)

    @staticmethod
    def _is_link(dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def _open_file(self, key: str) -> int:
        """A read descriptor of the object; ``KeyError`` when there is none."""
        try:
            with self._directory(key, create=False) as (fd, name, path):
                try:
                    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise self._link_error(path) from e
                    raise
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as e:
            raise storage_error(f"cannot read {self.root / key}", e) from e

    # -- the interface -------------------------------------------------------------------------
    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._directory(".write-check", create=False) as (fd, name, _):
                # A few bytes, not none: a full disk still has inodes for empty files.
                os.unlink(self._write_temp(fd, name, b"fluxfleet write check\n"), dir_fd=fd)
        except OSError as e:
            raise storage_error(f"storage directory {self.root} is not writable", e) from e

    def exists(self, key: str) -> bool:
        try:
            with self._directory(key, create=False) as (fd, name, path):
                mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return False
        except OSError as e:
            raise storage_error(f"cannot look up {self.root / key}", e) from e
        if stat.S_ISLNK(mode):
            raise self._link_error(path)
        return stat.S_ISREG(mode)

    def _write_temp(self, dir_fd: int, name: str, data: bytes) -> str:
        """``data`` in a new temporary file beside ``name``; removed again if anything fails."""
        tmp = f".{name}.{secrets.token_hex(4)}"
        # 0666 less the umask (mkstemp would make 0600, unreadable by the group).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        return tmp

    def put_if_absent(self, key: str, data: bytes, content_type: str, sha256: str | None = None) -> bool:
        try:
            with self._directory(key, create=True) as (fd, name, path):
                tmp = self._write_temp(fd, name, data)
                try:
                    # link() fails if the target exists (a link too: it is never followed): an atomic
                    # conditional write, and readers never see a partial file.
                    os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                    return True
                except FileExistsError:
                    if self._is_link(fd, name):
                        raise self._link_error(path) from None
                    return False
                finally:
                    os.unlink(tmp, dir_fd=fd)
        except OSError as e:
            raise storage_error(f"cannot write {self.root / key}", e) from e

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            with self._directory(key, create=True) as (fd, name, path):
                if self._is_link(fd, name):
                    # rename() would replace the link itself, but a link here is never ours: say so.
                    raise self._link_error(path)
                tmp = self._write_temp(fd, name, data)
                try:
                    os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
                except BaseException:
                    os.unlink(tmp, dir_fd=fd)
                    raise
        except OSError as e:
            raise storage_error(f"cannot write {self.root / key}", e) from e

    def get(self, key: str) -> bytes:
        fd = self._open_file(key)
        with os.fdopen(fd, "rb") as f:
            try:
                return f.read()
            except OSError as e:
                raise storage_error(f"cannot read {self.root / key}", e) from e

    def digest(self, key: str) -> str:
        # Hashing the file is a local read, streamed in chunks: nothing to record at write time, and
        # nothing that a file replaced by hand could leave stale.
        fd = self._open_file(key)
        with os.fdopen(fd, "rb") as f:
            try:
                return hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                raise storage_error(f"cannot read {self.root / key}", e) from e

    def list(self, prefix: str) -> Iterator[str]:
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        if directory:
            self._parts(directory)
            search = self.root / directory
            for parent in (search, *search.parents):
                if parent == self.root:
                    break
                if parent.is_symlink():
                    raise self._link_error(parent)
        else:
            search = self.root
        if not search.is_dir():
            return
        # os.walk does not descend into linked directories; linked files are skipped below.
        for top, dirs, files in os.walk(search):
            dirs.sort()
            for name in sorted(files):
                path = Path(top) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not name.startswith(".") and not path.is_symlink():
                    yield key

    def location(self, key: str) -> str:
        self._parts(key)
        return str(self.root / key)
