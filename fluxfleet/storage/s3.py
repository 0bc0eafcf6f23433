"""Storage in an S3-compatible bucket through boto3 (AWS, MinIO, any server speaking S3).

Each operation is one boto3 call; boto3's standard retry mode resends a throttled, 5xx or unanswered
request inside that call (``FLUXFLEET_STORAGE__MAX_ATTEMPTS``). What still fails is raised as a
``StorageError`` (transient: the task is retried, see ``fluxfleet.retry``) or, for an error no retry
can fix (access denied, bad credentials, no such bucket, any other 4xx), a ``PermanentStorageError``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from fluxfleet.errors import PermanentStorageError, StorageError
from fluxfleet.settings import StorageSettings
from fluxfleet.storage.base import Storage

DIGEST_METADATA = "sha256"
"""User metadata (``x-amz-meta-sha256``) holding the object's sha256, set on every write."""
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "429",
    }
)
"""S3 error codes worth another attempt; any other 4xx is the request's or the account's fault."""


def is_transient(error: Exception) -> bool:
    """Whether a boto3 error may pass on its own: throttling, a 5xx, a dropped or timed-out connection."""
    from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError, PartialCredentialsError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return code in TRANSIENT_CODES or status >= 500 or (code.isdigit() and int(code) >= 500)
    return not isinstance(error, (NoCredentialsError, PartialCredentialsError, ParamValidationError))


def _metadata(data: bytes, sha256: str | None = None) -> dict[str, str]:
    return {DIGEST_METADATA: sha256 or hashlib.sha256(data).hexdigest()}


class S3Storage(Storage):
    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> S3Storage:
        import boto3
        from botocore.config import Config

        parts = urlsplit(settings.url)
        config = Config(
            retries={"mode": "standard", "max_attempts": settings.max_attempts},
            # Older S3-compatible servers reject the CRC checksums boto3 sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=5,
            read_timeout=30,
        )
        secret = settings.secret_access_key
        key_id = settings.access_key_id
        client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region or "us-east-1",
            aws_access_key_id=key_id.get_secret_value() if key_id else None,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=config,
        )
        return cls(client, parts.netloc, parts.path)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, action: str, key: str, e: Exception) -> StorageError | PermanentStorageError:
        message = f"S3 {action} s3://{self.bucket}/{self._key(key)} failed: {e}"
        return StorageError(message) if is_transient(e) else PermanentStorageError(message)

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            code = str(e.response.get("Error", {}).get("Code", "")) if isinstance(e, ClientError) else ""
            problem = {"404": "does not exist", "NoSuchBucket": "does not exist", "403": "refuses these credentials"}
            message = f"bucket '{self.bucket}' {problem.get(code, 'is not reachable')}: {e}"
            raise (StorageError(message) if is_transient(e) else PermanentStorageError(message)) from e

    def _head(self, key: str) -> dict[str, Any] | None:
        """The object's HEAD response; None when there is no object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error("HEAD", key, e) from e
        except BotoCoreError as e:
            raise self._error("HEAD", key, e) from e

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def digest(self, key: str) -> str:
        """The sha256 recorded in the object's metadata (one HEAD, no download of the image)."""
        head = self._head(key)
        if head is None:
            raise KeyError(key)
        recorded = str(head.get("Metadata", {}).get(DIGEST_METADATA, ""))
        if SHA256_HEX.fullmatch(recorded):
            return recorded
        # Written before writes recorded the digest (or by another tool): read the object once.
        return super().digest(key)

    def put_if_absent(self, key: str, data: bytes, content_type: str, sha256: str | None = None) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType=content_type,
                Metadata=_metadata(data, sha256),
                IfNoneMatch="*",
            )
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            # 412: another attempt already stored this key. 409: a concurrent conditional write is
            # in flight; the object will exist once it completes.
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise self._error("PUT", key, e) from e
        except BotoCoreError as e:
            raise self._error("PUT", key, e) from e

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type, Metadata=_metadata(data)
            )
        except (BotoCoreError, ClientError) as e:
            raise self._error("PUT", key, e) from e

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise KeyError(key) from None
            raise self._error("GET", key, e) from e
        except BotoCoreError as e:
            raise self._error("GET", key, e) from e

    def list(self, prefix: str) -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:]
        except (BotoCoreError, ClientError) as e:
            raise self._error("LIST", prefix, e) from e

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"
