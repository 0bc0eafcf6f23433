"""The worker's Redis transport: kombu's, with every message checked before kombu or Celery reads it.

kombu parses each popped message itself (``json.loads`` in ``Channel._brpop_read``) and builds its
``Message`` from the envelope's fields; a message that is not JSON, or an envelope without
``properties``, raises there, outside the app's consumer, and Celery stops the worker ("Unrecoverable
error"). Celery then reads the headers and the body with more assumptions (``timelimit`` unpacks into
two values, the body into three). This channel checks a popped message against what Celery's task
protocol 2 sends, before delivering it. A message that fails is never delivered: it is counted and kept
in the bounded dead-letter list (``fluxfleet.deadletter``) with the reason, and the worker serves on.

Good messages are delivered unchanged (the same parsed envelope kombu would have built), so the
late-ack and visibility-timeout handling of kombu's Redis QoS is untouched. A refused message was
popped and never recorded as unacknowledged: if the worker dies between the pop and the dead-letter
write, that message is lost, as kombu's own pop-then-record leaves a good one.

Selected with Celery's ``broker_transport`` setting (``workers.service.transport:FleetTransport``) by
``workers.service.app.build_app``; the producer keeps kombu's own transport.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import UTC, datetime
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from fluxfleet import deadletter

logger = logging.getLogger(__name__)

JSON_CONTENT = ("application/json", "utf-8")
"""The only content type and encoding a worker accepts (``accept_content = ["json"]``)."""

DEFAULT_MAX_MESSAGE_BYTES = 8_000_000
"""Largest envelope read when the transport options do not say (a task body is base64: 4/3 larger)."""

MAX_ID_CHARS = 255
"""Longest delivery tag or task id accepted (Celery's are 36-character UUIDs)."""

OPTIONAL_TEXT_HEADERS = ("lang", "root_id", "parent_id", "group", "shadow", "origin", "argsrepr", "kwargsrepr")
EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


class Refused(Exception):
    """Raised when a popped message is not a task message the worker can read; ``reason`` is the
    low-cardinality label it is counted under, the message one sentence for the log."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def _need(ok: bool, reason: str, message: str) -> None:
    if not ok:
        raise Refused(reason, message)


def _text_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _small_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_envelope(
    raw: bytes | str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_eta_s: float = 3600.0
) -> dict[str, Any]:
    """The envelope as kombu parses it, or ``Refused`` naming what is wrong with it.

    ``max_eta_s``: how far ahead a task may be scheduled (the visibility timeout: one held longer is
    handed to a second worker while the first still holds it).
    """
    _need(len(raw) <= max_bytes, "too_large", f"message of {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        envelope = loads(bytes_to_str(raw))  # kombu's own parser, so what passes is what kombu reads
    except (ValueError, TypeError, RecursionError) as e:
        raise Refused("undecodable", f"message is not JSON ({type(e).__name__})") from None
    except Exception as e:  # kombu's JSON hooks turn tagged values into objects and raise what they raise
        raise Refused("undecodable", f"message is not JSON ({type(e).__name__})") from None
    _need(isinstance(envelope, dict), "malformed", f"message is a JSON {type(envelope).__name__}, not an object")
    _check_properties(envelope.get("properties"))
    content = (envelope.get("content-type"), envelope.get("content-encoding"))
    _need(content == JSON_CONTENT, "content_type", f"content type {content[0]!r} ({content[1]!r}) is not JSON")
    _check_headers(envelope.get("headers"), max_eta_s)
    _check_body(envelope.get("body"), envelope["properties"].get("body_encoding"))
    return envelope


def _check_properties(props: Any) -> None:
    _need(isinstance(props, dict), "malformed", "envelope has no 'properties' object")
    tag = props.get("delivery_tag")
    _need(
        isinstance(tag, str) and 0 < len(tag) <= MAX_ID_CHARS,
        "malformed",
        "envelope has no usable 'properties.delivery_tag'",
    )
    info = props.get("delivery_info")
    _need(
        isinstance(info, dict) and isinstance(info.get("exchange"), str) and isinstance(info.get("routing_key"), str),
        "malformed",
        "envelope has no 'properties.delivery_info' with an exchange and a routing key",
    )
    _need(
        props.get("body_encoding") in (None, "utf-8", "base64"),
        "malformed",
        "'properties.body_encoding' is neither base64 nor utf-8",
    )
    priority = props.get("priority")
    _need(priority is None or _small_int(priority, 0, 255), "malformed", "'properties.priority' is not 0-255")
    for name in ("correlation_id", "reply_to"):
        _need(_text_or_none(props.get(name)), "malformed", f"'properties.{name}' is not text")


def _check_headers(headers: Any, max_eta_s: float) -> None:
    _need(isinstance(headers, dict), "malformed", "envelope has no 'headers' object (task protocol 2)")
    for name in ("task", "id"):
        value = headers.get(name)
        _need(
            isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS,
            "malformed",
            f"header '{name}' is missing or not text",
        )
    for name in OPTIONAL_TEXT_HEADERS:
        _need(_text_or_none(headers.get(name)), "malformed", f"header '{name}' is not text")
    _need(_small_int(headers.get("retries", 0), 0, 1000), "malformed", "header 'retries' is not a count of 0-1000")
    # The worker's own time limits apply to every task: a message cannot raise (or lift) them.
    limits = headers.get("timelimit")
    _need(
        limits is None or (isinstance(limits, list) and len(limits) == 2 and limits == [None, None]),
        "malformed",
        "header 'timelimit' sets a time limit; the worker's own limits apply",
    )
    _need(headers.get("ignore_result") in (None, True, False), "malformed", "header 'ignore_result' is not a bool")
    # Celery's revocation check iterates and hashes these before any task code runs; fluxfleet never stamps.
    for name in ("stamped_headers", "stamps"):
        _need(not headers.get(name), "malformed", f"header '{name}' is set; fluxfleet tasks carry no stamps")
    # fluxfleet never sends an expiry; Celery would drop an expired task silently, uncounted.
    _need(headers.get("expires") is None, "malformed", "header 'expires' is set; fluxfleet tasks do not expire")
    _check_eta(headers.get("eta"), max_eta_s)


def _check_eta(eta: Any, max_eta_s: float) -> None:
    """A retry's countdown is an ETA; one further ahead than ``max_eta_s`` would be held past the
    visibility timeout. An unreadable one is left to Celery, which refuses it (InvalidTaskError)."""
    _need(eta is None or isinstance(eta, str), "malformed", "header 'eta' is not text")
    if eta is None:
        return
    try:
        when = datetime.fromisoformat(eta)
    except ValueError:
        return
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ahead = (when - datetime.now(UTC)).total_seconds()
    _need(ahead <= max_eta_s, "malformed", f"header 'eta' is {ahead:.0f} s ahead, past the visibility timeout")


def _check_body(body: Any, encoding: str | None) -> None:
    _need(isinstance(body, str), "malformed", "envelope has no 'body' text")
    if encoding == "base64":
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise Refused("malformed", "body is not valid base64") from None
    else:
        data = body.encode("utf-8", "surrogatepass")
    try:
        decoded = loads(data.decode("utf-8"))
    except Exception as e:  # invalid UTF-8 or JSON, too deep, or a tagged value kombu's hooks refuse
        raise Refused("malformed", f"body is not JSON ({type(e).__name__})") from None
    _need(
        isinstance(decoded, list) and len(decoded) == 3,
        "malformed",
        "body is not [args, kwargs, embed] (task protocol 2)",
    )
    args, kwargs, embed = decoded
    _need(isinstance(args, list), "malformed", "body's args is not a list")
    _need(isinstance(kwargs, dict), "malformed", "body's kwargs is not an object")
    # Celery merges the embed into the task's request, and callbacks or chains would make this worker send
    # further tasks on a message's say-so: only the four keys Celery writes, all empty.
    _need(
        embed is None or (isinstance(embed, dict) and set(embed) <= set(EMBED_KEYS) and not any(embed.values())),
        "malformed",
        "body's embed is not empty (callbacks, errbacks, a chain, a chord or other request fields)",
    )


class FleetChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, checking each popped message with ``check_envelope`` before delivery."""

    from_transport_options = (  # type: ignore[assignment]  # kombu types it as its own fixed tuple
        *kombu_redis.Channel.from_transport_options,
        "fluxfleet_key_prefix",
        "fluxfleet_max_message_bytes",
    )
    fluxfleet_key_prefix = "fluxfleet"
    fluxfleet_max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES

    def _admit(self, raw: bytes | str, queue: str) -> dict[str, Any] | None:
        """The envelope to deliver, or None when it was refused (counted and dead-lettered)."""
        try:
            return check_envelope(raw, self.fluxfleet_max_message_bytes, float(self.visibility_timeout))
        except Refused as refusal:
            logger.error("refused a message on queue %s: %s (%s)", queue, refusal, refusal.reason)
            try:
                with self.conn_or_acquire() as client:
                    deadletter.refuse(
                        client,
                        self.fluxfleet_key_prefix,
                        reason=refusal.reason,
                        queue=queue,
                        raw=raw,
                        detail=str(refusal),
                    )
            except (*self.connection_errors, self.ResponseError) as e:
                logger.warning("could not dead-letter the refused message: %s", e)
            return None

    # Same steps as kombu's ``Channel._brpop_read`` (kombu 5.5-5.7), with ``_admit`` in place of its
    # unchecked ``loads``.
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # As kombu: drop the connection so the next poll reconnects.
                self.client.connection.disconnect()
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            envelope = self._admit(item, dest)
            if envelope is not None:
                self.connection._deliver(envelope, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu does
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    # Same as kombu's ``Channel._get`` (the polling path, without an event loop), refused messages skipped.
    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while (item := client.rpop(self._q_for_pri(queue, pri))) is not None:
                    envelope = self._admit(item, queue)
                    if envelope is not None:
                        self._maybe_update_queues_expire(client, queue)
                        return envelope
            self._maybe_update_queues_expire(client, queue)
            raise Empty()


class FleetTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with ``FleetChannel``; ``rediss://`` URLs work through ``broker_use_ssl``."""

    Channel = FleetChannel
