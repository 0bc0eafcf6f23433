"""What to say when Redis fails: one sentence naming the broker (password masked) and the setting to check.

Used by every command and by ``Job.wait``, so a broker outage or a wrong password reads the same
everywhere, and never as a traceback.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis

from fluxfleet.errors import BrokerUnavailable
from fluxfleet.redaction import environment_secrets, redact
from fluxfleet.settings import BrokerSettings

AUTH_SIGNS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password", "Authentication required")
"""Texts of Redis's authentication refusals, for errors that reach us re-raised as another type (kombu's)."""


def is_broker_failure(e: BaseException) -> bool:
    """Whether ``e`` or what caused it is a failure to talk to Redis: one of redis-py's errors, or kombu's
    ``OperationalError`` (publishing). A ``BrokerUnavailable`` caused by something else (storage) is not."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, redis.RedisError) or type(seen).__name__ == "OperationalError":
            return True
        seen = seen.__cause__
    return False


def broker_error(e: BaseException, broker: BrokerSettings) -> BrokerUnavailable:
    """One sentence for a failure to talk to Redis: the broker (its URL, password masked), what went wrong,
    and the setting to check. ``e`` may be a redis-py or kombu error, or a fluxfleet error caused by one."""
    root: BaseException = e
    while root.__cause__ is not None and not isinstance(root, redis.RedisError):
        root = root.__cause__
    text = str(root).strip()
    secrets = [*environment_secrets(), *([broker.password.get_secret_value()] if broker.password else [])]
    reason = redact(text.splitlines()[0].rstrip(".") if text else type(root).__name__, secrets)
    url = broker.display_url()
    if isinstance(root, redis.AuthenticationError) or any(sign in text for sign in AUTH_SIGNS):
        if broker.password is None and not urlsplit(broker.url).password:
            return BrokerUnavailable(
                f"Redis at {url} requires a password and none is set: set FLUXFLEET_BROKER__PASSWORD"
            )
        return BrokerUnavailable(f"Redis at {url} refused the password ({reason}): check FLUXFLEET_BROKER__PASSWORD")
    if broker.url.startswith("rediss://") and ("SSL" in str(root) or "certificate" in str(root)):
        return BrokerUnavailable(
            f"TLS to Redis at {url} failed ({reason}): check FLUXFLEET_BROKER__TLS_CA_FILE and FLUXFLEET_BROKER__URL"
        )
    return BrokerUnavailable(f"cannot reach Redis at {url} ({reason}): check that it runs and FLUXFLEET_BROKER__URL")
