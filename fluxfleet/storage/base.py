"""The storage interface every backend implements."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator


class Storage(ABC):
    """Write-once objects under string keys such as ``images/ab/abcd.png``."""

    @abstractmethod
    def check(self) -> None:
        """Raise ``StorageError`` (transient) or ``PermanentStorageError`` unless the store can be written
        (called at worker start and before a job is recorded)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes, content_type: str, sha256: str | None = None) -> bool:
        """Store ``data`` unless ``key`` exists; False when another attempt already wrote it.

        ``sha256``: the data's digest when the caller already has it (the worker hashes each PNG it
        encodes), so a backend that records digests does not hash the bytes again.
        """

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data``, replacing any object at ``key`` (manifests, which are rebuilt whole)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` when there is none."""

    def digest(self, key: str) -> str:
        """The object's sha256 (hex); ``KeyError`` when there is none.

        This fallback reads the whole object; backends that can answer cheaper (a digest recorded
        at write time, a local file) override it.
        """
        return hashlib.sha256(self.get(key)).hexdigest()

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Keys that start with ``prefix``."""

    @abstractmethod
    def location(self, key: str) -> str:
        """Where a user finds the object: a path or an ``s3://`` URL."""
