"""``fluxfleet exporter``: queue depth and oldest-unacknowledged age per queue, read from Redis.

One exporter serves the whole fleet, so workers never poll Redis for metrics. Values are read on
each scrape. What kombu's Redis transport keeps (checked against a real Redis):

- a list per queue, named like the queue (``<queue>\\x06\\x16<n>`` for priorities 3, 6, 9), that
  producers LPUSH to and workers BRPOP from;
- ``unacked``: a hash, delivery tag -> JSON ``[message, exchange, routing_key]`` of each delivered,
  unacknowledged message, and ``unacked_index``: a sorted set, delivery tag -> delivery time (unix s);
- ``_kombu.binding.<exchange>``: a set of ``routing_key\\x06\\x16pattern\\x06\\x16queue`` bindings.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from fluxfleet import metric_names as m
from fluxfleet.keys import queue_name
from fluxfleet.presets import preset_names
from fluxfleet.settings import Settings

logger = logging.getLogger(__name__)

SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
BINDING_PREFIX = "_kombu.binding."


@dataclass
class QueueStats:
    queue: str
    messages: int = 0
    unacked: int = 0
    oldest_unacked_age_s: float = 0.0


@dataclass
class QueueReader:
    """Reads per-queue stats from the broker's Redis; ``queues`` are always reported, even at 0."""

    client: redis.Redis
    queues: list[str] = field(default_factory=list)

    def _bindings(self) -> dict[tuple[str, str], str]:
        """(exchange, routing key) -> queue, from kombu's binding sets."""
        table: dict[tuple[str, str], str] = {}
        for key in self.client.scan_iter(match=f"{BINDING_PREFIX}*", count=500):
            exchange = _text(key).removeprefix(BINDING_PREFIX)
            for member in self.client.smembers(key):  # type: ignore[union-attr]
                routing_key, _pattern, queue = [*_text(member).split(SEP), "", ""][:3]
                table[(exchange, routing_key)] = queue
        return table

    def read(self, now: float | None = None) -> list[QueueStats]:
        now = time.time() if now is None else now
        bindings = self._bindings()
        names = dict.fromkeys([*self.queues, *bindings.values()])
        stats = {q: QueueStats(q) for q in names if q}

        index = cast(list[tuple[bytes | str, float]], self.client.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True))
        tags = [_text(tag) for tag, _ in index]
        entries = cast(list[bytes | str | None], self.client.hmget(UNACKED_KEY, tags) if tags else [])
        for (_, delivered_at), entry in zip(index, entries, strict=True):
            if entry is None:
                continue
            queue = _queue_of(_text(entry), bindings)
            s = stats.setdefault(queue, QueueStats(queue))
            s.unacked += 1
            s.oldest_unacked_age_s = max(s.oldest_unacked_age_s, now - float(delivered_at))

        pipe = self.client.pipeline(transaction=False)
        for q in stats:
            for key in _priority_keys(q):
                pipe.llen(key)
        lengths = iter(pipe.execute())
        for s in stats.values():
            s.messages = sum(next(lengths) for _ in PRIORITY_STEPS)
        return sorted(stats.values(), key=lambda s: s.queue)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _priority_keys(queue: str) -> list[str]:
    return [queue if p == 0 else f"{queue}{SEP}{p}" for p in PRIORITY_STEPS]


def _queue_of(entry: str, bindings: dict[tuple[str, str], str]) -> str:
    try:
        _message, exchange, routing_key = json.loads(entry)
    except (ValueError, TypeError):
        return "unknown"
    return bindings.get((exchange, routing_key), routing_key or "unknown")


def default_queues(settings: Settings) -> list[str]:
    """One queue per preset in the presets directory."""
    return [queue_name(p) for p in preset_names(settings.presets_dir)]


class QueueCollector:
    """A prometheus_client collector that reads Redis on every scrape."""

    def __init__(self, reader: QueueReader, visibility_timeout_s: float) -> None:
        self.reader = reader
        self.visibility_timeout_s = visibility_timeout_s
        self.errors = 0
        self.lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.lock:
            try:
                stats = self.reader.read()
            except redis.RedisError as e:
                logger.warning("cannot read queues from Redis: %s", e)
                self.errors += 1
                stats = []
        families = {
            spec.name: GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            for spec in (m.QUEUE_MESSAGES, m.QUEUE_UNACKED, m.QUEUE_OLDEST_UNACKED)
        }
        for s in stats:
            families[m.QUEUE_MESSAGES.name].add_metric([s.queue], s.messages)
            families[m.QUEUE_UNACKED.name].add_metric([s.queue], s.unacked)
            families[m.QUEUE_OLDEST_UNACKED.name].add_metric([s.queue], s.oldest_unacked_age_s)
        yield from families.values()
        yield GaugeMetricFamily(m.VISIBILITY_TIMEOUT.name, m.VISIBILITY_TIMEOUT.help, value=self.visibility_timeout_s)
        yield CounterMetricFamily(m.EXPORTER_ERRORS.base_name, m.EXPORTER_ERRORS.help, value=self.errors)


def serve_exporter(settings: Settings, *, port: int, address: str = "127.0.0.1", queues: Iterable[str] = ()) -> Any:
    """Start the exporter's HTTP server in a thread; returns the server (``.shutdown()`` stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from fluxfleet.jobs import redis_client

    client = redis_client(settings.broker)
    reader = QueueReader(client, [*default_queues(settings), *queues])
    registry = CollectorRegistry()
    registry.register(QueueCollector(reader, settings.broker.visibility_timeout_s))
    server, _thread = start_http_server(port, address, registry=registry)
    logger.info("queue exporter on %s:%d for %s", address, port, ", ".join(reader.queues))
    return server
