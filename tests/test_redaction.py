"""The redaction helper: any password in a URL, any secret value in any text, is masked; the rest stays."""

from __future__ import annotations

import logging
from urllib.parse import quote, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from fluxfleet.redaction import MASK, MIN_SECRET_CHARS, RedactingFilter, environment_secrets, redact, redact_url
from fluxfleet.settings import BrokerSettings, Settings

secrets = st.text(min_size=MIN_SECRET_CHARS, max_size=40).filter(lambda s: s.strip() == s and s)
hosts = st.sampled_from(["127.0.0.1", "redis", "redis.internal.example", "[::1]"])


@settings(max_examples=300, deadline=None)
@given(password=secrets, user=st.sampled_from(["", "default", "fleet"]), host=hosts, port=st.integers(1, 65535))
def test_a_url_password_is_masked_and_nothing_else_changes(password: str, user: str, host: str, port: int) -> None:
    url = f"rediss://{user}:{quote(password, safe='')}@{host}:{port}/3?ssl_cert_reqs=required"
    masked = redact_url(url)
    parts = urlsplit(masked)
    assert parts.password == MASK and (parts.username or "") == user
    assert (parts.hostname, parts.port, parts.path, parts.query) == (
        host.strip("[]"),
        port,
        "/3",
        "ssl_cert_reqs=required",
    )
    # Also inside a sentence, and through the settings' display URL.
    sentence = f"cannot reach Redis at {url} (Error 111): check FLUXFLEET_BROKER__URL"
    assert quote(password, safe="") not in redact(sentence, [password]).replace(MASK, "")
    assert BrokerSettings(url=url).display_url() == masked


@settings(max_examples=300, deadline=None)
@given(secret=secrets, before=st.text(max_size=30), after=st.text(max_size=30))
def test_a_secret_value_never_survives_in_any_text(secret: str, before: str, after: str) -> None:
    text = f"{before}{secret}{after} and again {quote(secret, safe='')}"
    assert secret not in redact(text, [secret])
    assert quote(secret, safe="") not in redact(text, [secret])


def test_masking_can_not_join_text_into_the_secret_again() -> None:
    # 'aa***' with the secret 'a***': one replace leaves 'a***' again; redact keeps going.
    assert redact("aa***", ["a***"]) == MASK


def test_short_values_and_text_without_secrets_are_left_alone() -> None:
    assert redact("a plain sentence: redis://127.0.0.1:6379/0", ["abc"]) == "a plain sentence: redis://127.0.0.1:6379/0"


def test_environment_secrets_are_the_values_of_secret_looking_names() -> None:
    env = {
        "FLUXFLEET_BROKER__PASSWORD": "hunter22",
        "FLUXFLEET_STORAGE__SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
        "SOME_API_TOKEN": "tok-123456",
        "FLUXFLEET_BROKER__URL": "redis://127.0.0.1:6379/0",
        "X_PASSWORD": "ab",  # too short to mask
    }
    assert sorted(environment_secrets(env)) == ["hunter22", "tok-123456", "wJalrXUtnFEMI"]


def test_settings_list_their_secrets() -> None:
    settings = Settings.model_validate(
        {
            "broker": {"url": "redis://:in-url-pass@h:1/0", "password": "field-pass"},
            "storage": {"secret_access_key": "s3-secret-key"},
        }
    )
    assert sorted(settings.secret_values()) == ["field-pass", "in-url-pass", "s3-secret-key"]
    assert "field-pass" not in repr(settings) and "s3-secret-key" not in repr(settings)


def test_logging_filter_redacts_formatted_messages() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "connecting to %s with %s", ("redis://:pw12@h/0", "pw12"), None
    )
    assert RedactingFilter(["pw12"]).filter(record)
    assert record.getMessage() == "connecting to redis://:***@h/0 with ***"
