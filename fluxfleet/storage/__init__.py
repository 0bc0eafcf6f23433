"""Object storage behind one interface: ``file:///path`` (the embedded default) or ``s3://bucket/prefix``."""

from __future__ import annotations

from fluxfleet.errors import ConfigurationError
from fluxfleet.settings import StorageSettings
from fluxfleet.storage.base import Storage

__all__ = ["Storage", "open_storage"]


def open_storage(settings: StorageSettings) -> Storage:
    """The backend named by the URL's scheme; boto3 is imported only for ``s3://``."""
    url = settings.url
    if url.startswith("file://"):
        from fluxfleet.storage.local import LocalStorage

        return LocalStorage.from_url(url)
    if url.startswith("s3://"):
        from fluxfleet.storage.s3 import S3Storage

        return S3Storage.from_settings(settings)
    raise ConfigurationError(f"FLUXFLEET_STORAGE__URL must start with file:// or s3://, got '{url}'")
