"""Messages a worker refused to run: counted by reason, and the newest kept for inspection.

Two Redis keys, next to the job records (``<prefix>`` is ``FLUXFLEET_BROKER__KEY_PREFIX``):

- ``<prefix>:rejected``    hash: reason -> count of every refusal (never trimmed);
- ``<prefix>:deadletter``  list, newest first, at most ``DEADLETTER_MAX`` entries, each a JSON object
  ``{"reason", "queue", "detail", "at", "size", "raw"}``: ``raw`` is the message's first
  ``RAW_MAX_BYTES`` bytes as text (undecodable bytes as ``\\xNN``), ``size`` its full length.

Inspect with ``redis-cli LRANGE fluxfleet:deadletter 0 9``. A refused message is never re-queued:
one that cannot be run now cannot be run later either, and re-queueing it would loop.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

DEADLETTER_MAX = 1000
"""Entries kept in ``<prefix>:deadletter``; older ones are trimmed as new ones arrive."""

RAW_MAX_BYTES = 2048
"""Bytes of a refused message kept in its entry (about 2 MiB for a full list)."""

DETAIL_MAX_CHARS = 500
"""Characters of the reason's one-sentence explanation kept in an entry."""


def entry(*, reason: str, queue: str, raw: bytes | str, detail: str = "") -> str:
    """One dead-letter entry as JSON."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    return json.dumps(
        {
            "reason": reason,
            "queue": queue,
            "detail": detail[:DETAIL_MAX_CHARS],
            "at": time.time(),
            "size": len(data),
            "raw": data[:RAW_MAX_BYTES].decode("utf-8", "backslashreplace"),
        },
        ensure_ascii=False,
    )


def refuse(client: redis.Redis, prefix: str, *, reason: str, queue: str, raw: bytes | str, detail: str = "") -> None:
    """Count a refused message under ``reason`` and keep it in the bounded dead-letter list.

    One MULTI/EXEC, so the count and the entry never disagree; works with any client (bytes or str
    replies).
    """
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(f"{prefix}:rejected", reason, 1)
    pipe.lpush(f"{prefix}:deadletter", entry(reason=reason, queue=queue, raw=raw, detail=detail))
    pipe.ltrim(f"{prefix}:deadletter", 0, DEADLETTER_MAX - 1)
    pipe.execute()


def dead_letters(client: redis.Redis, prefix: str, count: int = DEADLETTER_MAX) -> list[dict[str, Any]]:
    """The newest ``count`` entries, newest first."""
    raw = cast(list[bytes | str], client.lrange(f"{prefix}:deadletter", 0, count - 1))
    return [json.loads(e) for e in raw]


def rejected_counts(client: redis.Redis, prefix: str) -> dict[str, int]:
    """Refusals by reason since the counter was created."""
    raw = cast(dict[bytes | str, bytes | str], client.hgetall(f"{prefix}:rejected"))
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
