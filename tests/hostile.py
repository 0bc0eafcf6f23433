"""Hostile queue traffic for the tests: junk bytes, junk JSON, and Celery envelopes with wrong parts.

Everything is drawn from a seeded ``random.Random``, so a failing run repeats exactly. Envelopes start
from a real one (``celery_envelope``: Celery publishes it, the test pops it before any worker sees it)
and are changed one part at a time.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import string
import uuid
from typing import Any

import redis

from fluxfleet.celery_config import make_celery
from fluxfleet.keys import TASK_GENERATE
from fluxfleet.settings import Settings

Json = Any

ISSUE_REASONS = {
    b"not json": "undecodable",
    b"[1,2,3]": "malformed",
    b"12345": "malformed",
    b"": "undecodable",
    b"{}": "malformed",
    b"null": "malformed",
    b'"text"': "malformed",
    b"\xff\xfe\x00garbage": "undecodable",
}
"""The messages of the original report and their nearest relatives, with the reason each is refused for."""
ISSUE_SAMPLES = list(ISSUE_REASONS)

EXOTIC_TEXT = "\u2028\u0000\ufeff\ud7ff\U0001f600é中\\\"'{}[]"


def random_text(rng: random.Random, max_len: int = 40) -> str:
    alphabet = string.printable + EXOTIC_TEXT
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def random_json(rng: random.Random, depth: int = 3) -> Json:
    """Any JSON value: scalars (huge and negative numbers, any text), lists and objects, nested."""
    kind = rng.randrange(9 if depth > 0 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**63, -(2**70), rng.randint(-(10**6), 10**6)])
    if kind == 3:
        return rng.choice([0.5, -1e300, 1e-300, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return random_text(rng)
    if kind in (6, 7):
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    keys = ["body", "headers", "properties", "task", "id", "args", random_text(rng, 8)]
    return {rng.choice(keys): random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))}


def random_bytes(rng: random.Random) -> bytes:
    """Junk bytes: binary, text, truncated or deeply nested JSON, oversized lines."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 200))
    if kind == 1:
        return random_text(rng, 200).encode("utf-8", "surrogatepass")
    if kind == 2:
        text = json.dumps(random_json(rng))
        return text[: rng.randint(0, len(text))].encode()  # cut anywhere: mostly invalid JSON
    if kind == 3:
        depth = rng.choice([50, 5000, 100_000])
        return b"[" * depth + b"]" * rng.choice([0, depth])  # nesting deeper than the parser's recursion
    if kind == 4:
        return b'{"body": "' + b"A" * rng.randint(1000, 20_000) + b'"'  # long and unterminated
    return json.dumps(random_json(rng)).encode()


def celery_envelope(settings: Settings, args: list[Json], queue: str = "fluxfleet.tiny") -> dict[str, Json]:
    """The envelope Celery itself sends for ``fluxfleet.generate(*args)`` to ``queue``, as kombu stores it.

    Published to a scratch queue no worker reads and popped from there.
    """
    scratch = f"fluxfleet.scratch-{uuid.uuid4().hex[:8]}"
    app = make_celery(settings, None)
    app.send_task(TASK_GENERATE, args=args, queue=scratch)
    client = redis.Redis.from_url(settings.broker.url_with_password())
    raw = client.rpop(scratch)
    assert isinstance(raw, bytes), "Celery published nothing"
    envelope = dict(json.loads(raw))
    envelope["properties"]["delivery_info"]["routing_key"] = queue
    return envelope


def with_body(envelope: dict[str, Json], body: Json) -> dict[str, Json]:
    """``envelope`` carrying ``body`` (``[args, kwargs, embed]`` for task protocol 2), base64 as Celery sends it."""
    changed = copy.deepcopy(envelope)
    changed["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return fresh(changed)


def with_task(envelope: dict[str, Json], args: list[Json], kwargs: dict[str, Json] | None = None) -> dict[str, Json]:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return with_body(envelope, [args, kwargs or {}, embed])


def fresh(envelope: dict[str, Json]) -> dict[str, Json]:
    """A copy with new delivery tag and task id, as two separate sends would have."""
    changed = copy.deepcopy(envelope)
    if isinstance(changed.get("properties"), dict):
        changed["properties"]["delivery_tag"] = str(uuid.uuid4())
    if isinstance(changed.get("headers"), dict):
        changed["headers"]["id"] = str(uuid.uuid4())
    return changed


def paths(value: Json, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into nested dicts and lists (the empty path excluded)."""
    found: list[tuple[Any, ...]] = []
    children: list[tuple[Any, Json]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    for key, child in children:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key)))
    return found


def mutate(rng: random.Random, envelope: dict[str, Json]) -> dict[str, Json]:
    """``envelope`` with one part deleted or replaced by a random JSON value (the body as decoded JSON)."""
    changed = fresh(envelope)
    body = json.loads(base64.b64decode(changed["body"]))
    target = rng.choice([changed, body])
    path = rng.choice(paths(target))
    parent = target
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = random_json(rng, 2)
    if target is body:
        changed["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return changed


def encode(message: bytes | dict[str, Json]) -> bytes:
    return message if isinstance(message, bytes) else json.dumps(message).encode()
