"""Keeping secrets out of everything fluxfleet prints, logs or writes: one place that redacts them.

Usage::

    redact_url("redis://:hunter2@redis:6379/0")      # 'redis://:***@redis:6379/0'
    redact(f"cannot reach {url}: {error}")            # URL passwords and known secret values masked

Two kinds of secret are masked: the password part of any ``scheme://user:password@host`` URL in the
text, and the literal values of the secret settings (``FLUXFLEET_BROKER__PASSWORD``,
``FLUXFLEET_STORAGE__SECRET_ACCESS_KEY`` and the like), because a library's error message may quote
them without a URL around them. Every printer of the command line and every file fluxfleet writes
outside storage (``fleet.json``) goes through ``redact``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote

MASK = "***"

SECRET_NAME_PARTS = ("PASSWORD", "SECRET", "TOKEN")
"""An environment variable whose name contains one of these holds a secret (its value is masked)."""

MIN_SECRET_CHARS = 4
"""Shorter values are not masked: masking every 'a' in a message would hide it, and protect nothing."""

# scheme://user:password@ — the password runs to the last '@' before the host (an unquoted '@' in a
# password is ambiguous, and urlsplit also splits at the last one).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)(?P<password>[^\s/]*)@")


def redact_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``; anything else unchanged."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", url)


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names mark them as secrets (see ``SECRET_NAME_PARTS``)."""
    env = os.environ if environ is None else environ
    return [
        value
        for name, value in env.items()
        if any(part in name.upper() for part in SECRET_NAME_PARTS) and len(value) >= MIN_SECRET_CHARS
    ]


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with URL passwords and every value of ``secrets`` (default: ``environment_secrets()``)
    masked, also in their URL-quoted form."""
    text = redact_url(text)
    values = environment_secrets() if secrets is None else secrets
    # Longest first, so a secret containing another is masked whole.
    for value in sorted({v for v in values if len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        for form in {value, quote(value, safe="")}:
            # Until none is left: masking can join the text around it into the secret again ('aa***' for
            # 'a***'); each pass shortens the text, since the mask is shorter than any secret.
            while form in text:
                text = text.replace(form, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's formatted message (attach it to a handler)."""

    def __init__(self, secrets: Iterable[str] | None = None) -> None:
        super().__init__()
        self.secrets = None if secrets is None else list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
