"""Completion webhooks: one signed JSON POST to a job's ``webhook`` URL when the job ends.

Usage::

    url = check_webhook("https://hooks.example.com/fluxfleet", settings.webhook)  # at submit
    dispatcher = start_dispatcher(settings, jobs, storage)                     # in a worker's main process
    describe_delivery(delivery_summary(jobs, job_id))  # 'webhook: delivered after 3 attempts'

The job's completion (``JobStore.finish_if_complete``) queues its id in ``<prefix>:webhooks``, a sorted set
scored by the time of the next attempt, in the same script that marks it complete. Every worker runs a
``Dispatcher`` thread that claims one due job at a time by moving its score past a lease (one script, so
two workers never claim the same one; a worker killed mid-delivery leaves a lease that runs out, and another
worker takes the job). A failed attempt (connection refused, a timeout, an answer other than 2xx, a
redirect: none is followed) is retried after 1, 2, 4 ... ``max_backoff_s`` seconds, until
``give_up_after_s`` after the job ended. Each attempt is recorded in ``<prefix>:job:<id>:webhook``.

The body is signed: ``X-Fluxfleet-Signature: sha256=<hex HMAC-SHA256 of the exact body>`` with
``FLUXFLEET_WEBHOOK__SECRET``, and ``X-Fluxfleet-Timestamp`` (Unix seconds) says when it was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import string
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from fluxfleet.errors import ValidationError
from fluxfleet.jobs import JobStore
from fluxfleet.keys import manifest_key
from fluxfleet.redaction import redact
from fluxfleet.schema import JobStatus
from fluxfleet.settings import Settings, WebhookSettings
from fluxfleet.storage import Storage

logger = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
URL_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")
"""What RFC 3986 allows in a URL: anything else (spaces, control characters, non-ASCII) must be percent-encoded."""

HOSTNAME = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?")

MANIFEST_GRACE_S = 30.0
"""Seconds a delivery waits for the job's manifest to be written (it is, just after the job completes),
so a receiver that fetches it at once finds it; then it is sent anyway."""

USER_AGENT = "fluxfleet-webhook/1"

# Claim the job whose attempt is due first by moving its score to the end of a lease.
# KEYS: pending webhooks. ARGV: now, lease end. Returns the job id, or nil when nothing is due.
CLAIM_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], due[1])
return due[1]
"""

# Record an attempt, only if the lease it ran under is still this claimer's (its score is unchanged), and
# reschedule the job or take it out of the set. KEYS: pending webhooks, the job's webhook hash.
# ARGV: job id, lease end, next attempt time ('' when finished), then field/value pairs for the hash.
SETTLE_LUA = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1]) end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
return 1
"""


# -- at submit ---------------------------------------------------------------------------------------------
def check_webhook_url(url: object) -> str:
    """``url`` if it is an http(s) URL with a host and nothing hostile in it; else ``ValidationError`` (field
    'webhook'). The URL itself is never repeated in the message: it may hold a token."""

    def refuse(why: str) -> ValidationError:
        return ValidationError(f"webhook URL refused: {why}", field="webhook")

    if not isinstance(url, str):
        raise refuse(f"a {type(url).__name__}, not text")
    if not url:
        raise refuse("it is empty")
    if len(url) > MAX_URL_CHARS:
        raise refuse(f"{len(url)} characters, over the limit of {MAX_URL_CHARS}")
    for position, char in enumerate(url):
        if char not in URL_CHARACTERS:
            raise refuse(
                f"the character {char!r} at position {position} is not allowed in a URL (percent-encode it; "
                "a host name outside ASCII goes in its xn-- form)"
            )
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise refuse(f"it does not parse ({e})") from None
    if parts.scheme not in ("http", "https"):
        scheme = f"'{parts.scheme}:'" if parts.scheme else "a URL without one"
        raise refuse(f"only http:// and https:// URLs are sent to, not {scheme}")
    if "@" in parts.netloc:
        raise refuse("credentials in the URL (user:password@) are not accepted; receivers check the signature")
    if not host:
        raise refuse("it names no host")
    if port == 0:
        raise refuse("port 0")
    if not HOSTNAME.fullmatch(host) and not _is_ip(host):
        raise refuse("its host is not a host name or an IP address")
    return url


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def signing_key(settings: WebhookSettings) -> str:
    """``FLUXFLEET_WEBHOOK__SECRET``'s value; empty when it is not set."""
    return settings.secret.get_secret_value() if settings.secret is not None else ""


def check_webhook(url: object, settings: WebhookSettings) -> str:
    """``check_webhook_url``, and refuse a webhook that could not be signed (no secret set)."""
    checked = check_webhook_url(url)
    if not signing_key(settings):
        raise ValidationError(
            "a job with a webhook needs FLUXFLEET_WEBHOOK__SECRET, the key its notification is signed with; "
            "set it here and on the workers",
            field="webhook",
        )
    return checked


# -- the request -------------------------------------------------------------------------------------------
def payload(status: JobStatus, manifest: str) -> bytes:
    """The exact bytes POSTed (and signed)."""
    fields = status.model_dump(include={"job_id", "state", "total", "done", "skipped", "failed", "cancelled"})
    return json.dumps({**fields, "finished_at": status.finished_at, "manifest": manifest}, sort_keys=True).encode()


def signature(body: bytes, secret: str) -> str:
    """The ``X-Fluxfleet-Signature`` header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Attempt:
    """What one POST came to: ``status`` is the HTTP status when an answer came, ``error`` why it failed."""

    status: int | None
    error: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is the receiver's answer, not a forward: following one would re-send a POST as a GET, or to
    another scheme."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post(url: str, body: bytes, secret: str, timeout_s: float) -> Attempt:
    """POST ``body`` signed with ``secret``; never raises."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Fluxfleet-Signature": signature(body, secret),
        "X-Fluxfleet-Timestamp": str(int(time.time())),
    }
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.build_opener(_NoRedirects).open(request, timeout=timeout_s) as response:
            return Attempt(int(response.status))
    except urllib.error.HTTPError as e:
        e.close()
        moved = " (redirects are not followed)" if 300 <= e.code < 400 else ""
        return Attempt(e.code, f"HTTP {e.code}{moved}")
    except urllib.error.URLError as e:
        return Attempt(None, _describe(e.reason, timeout_s))
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Attempt(None, _describe(e, timeout_s))


def _describe(reason: object, timeout_s: float) -> str:
    """A failure in a few words, for the status line and the log."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(reason, ssl.SSLError):
        return f"TLS: {getattr(reason, 'reason', None) or reason}"
    if isinstance(reason, ConnectionError | http.client.HTTPException):
        return f"the connection broke ({type(reason).__name__})"
    return str(reason)[:200] or type(reason).__name__


def backoff_s(attempts: int, cap_s: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: 1, 2, 4 ... ``cap_s``."""
    return float(min(cap_s, 2 ** min(attempts - 1, 30)))


def display_url(url: str) -> str:
    """Scheme, host and path only, for the log: a query may hold a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# -- delivering --------------------------------------------------------------------------------------------
class Dispatcher:
    """Delivers due webhooks, one at a time, in a daemon thread of a worker's main process (never in the
    process generating: a slow receiver never holds up an image)."""

    def __init__(self, jobs: JobStore, settings: WebhookSettings, storage: Storage) -> None:
        self.secret = signing_key(settings)
        if not self.secret:
            raise ValueError("a dispatcher needs a secret to sign with")
        self.jobs = jobs
        self.settings = settings
        self.storage = storage
        self.pending = jobs.webhook_keys("")[2]  # one set for every job
        self._claim = jobs.r.register_script(CLAIM_LUA)
        self._settle = jobs.r.register_script(SETTLE_LUA)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lease_s(self) -> float:
        """How long a claim holds: past any attempt's timeouts (connect, send, answer) and the manifest check."""
        return 3 * self.settings.timeout_s + 30.0

    def deliver_due(self, now: float | None = None) -> bool:
        """Claim the first due delivery and attempt it; False when none is due."""
        now = time.time() if now is None else now
        lease_end = now + self.lease_s
        job_id = self._claim(keys=[self.pending], args=[now, lease_end])
        if job_id is None:
            return False
        self._attempt(cast(str, job_id), lease_end)
        return True

    def _attempt(self, job_id: str, lease_end: float) -> None:
        job_key, record_key, _pending = self.jobs.webhook_keys(job_id)
        url = cast(str | None, self.jobs.r.hget(job_key, "webhook"))
        record = cast(dict[str, str], self.jobs.r.hgetall(record_key))
        status = self.jobs.status(job_id)
        queued_at = float(record.get("queued_at") or time.time())
        if url is None or status is None:
            self._record(job_id, lease_end, None, gave_up_at=time.time(), last_error="the job is no longer in Redis")
            return
        manifest = manifest_key(job_id)
        if not self.storage.exists(manifest) and time.time() < queued_at + MANIFEST_GRACE_S:
            soon = time.time() + 1.0  # not an attempt: the manifest is on its way
            self._record(job_id, lease_end, soon, next_at=soon)
            return
        attempts = int(record.get("attempts") or 0) + 1
        body = payload(status, self.storage.location(manifest))
        attempt = post(url, body, self.secret, self.settings.timeout_s)
        now = time.time()
        result = {"attempts": attempts, "last_status": attempt.status or "", "last_error": attempt.error}
        if attempt.delivered:
            logger.info("job %s: webhook delivered to %s after %d attempt(s)", job_id, display_url(url), attempts)
            self._record(job_id, lease_end, None, delivered_at=now, **result)
            return
        deadline = queued_at + self.settings.give_up_after_s
        if now >= deadline:
            logger.error(
                "job %s: webhook to %s given up after %d attempt(s) over %.0f s: %s",
                *(job_id, display_url(url), attempts, now - queued_at, attempt.error),
            )
            self._record(job_id, lease_end, None, gave_up_at=now, **result)
            return
        next_at = min(now + backoff_s(attempts, self.settings.max_backoff_s), deadline)
        logger.warning(
            "job %s: webhook to %s failed (%s), attempt %d; next in %.0f s",
            *(job_id, display_url(url), attempt.error, attempts, next_at - now),
        )
        self._record(job_id, lease_end, next_at, next_at=next_at, **result)

    def _record(self, job_id: str, lease_end: float, due_at: float | None, **fields: object) -> None:
        """Write ``fields`` to the job's webhook record; due again at ``due_at``, or finished (None)."""
        record_key = self.jobs.webhook_keys(job_id)[1]
        pairs = [str(part) for item in fields.items() for part in item]
        args = [job_id, lease_end, "" if due_at is None else due_at, *pairs]
        if not self._settle(keys=[self.pending, record_key], args=args):
            logger.warning("job %s: webhook claim ran out before its attempt was recorded", job_id)

    def run(self) -> None:
        """Deliver until ``stop``; a Redis outage or a fault in one delivery is logged and waited out."""
        paused = False
        while not self._stop.is_set():
            try:
                busy = self.deliver_due()
                if paused:
                    logger.info("webhook deliveries resumed")
                paused = False
            except Exception as e:  # the thread must outlive any one fault; a claimed delivery's lease runs out
                if not paused:  # once per outage, not once per poll
                    logger.warning("webhook deliveries paused: %s: %s", type(e).__name__, redact(str(e)))
                paused, busy = True, False
            if not busy:
                self._stop.wait(self.settings.poll_interval_s)

    def start(self) -> Dispatcher:
        self._thread = threading.Thread(target=self.run, name="fluxfleet-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop after the attempt in flight (at most ``timeout_s`` seconds' wait)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.lease_s if timeout_s is None else timeout_s)


def start_dispatcher(settings: Settings, jobs: JobStore, storage: Storage) -> Dispatcher | None:
    """Start delivering webhooks from this process, through the worker's own ``jobs`` and ``storage``; None
    (and a log line) when no secret is set, since an unsigned notification is never sent: the jobs wait for a
    worker that has one."""
    if not signing_key(settings.webhook):
        logger.info("this worker sends no webhooks: FLUXFLEET_WEBHOOK__SECRET is not set")
        return None
    return Dispatcher(jobs, settings.webhook, storage).start()


# -- reporting ---------------------------------------------------------------------------------------------
def delivery_summary(jobs: JobStore, job_id: str) -> dict[str, Any] | None:
    """The job's webhook deliveries for ``status --json``; None for a job without a webhook."""
    job_key, record_key, _pending = jobs.webhook_keys(job_id)
    pipe = jobs.r.pipeline(transaction=False)
    pipe.hget(job_key, "webhook")
    pipe.hgetall(record_key)
    url, record = cast(tuple[str | None, dict[str, str]], tuple(pipe.execute()))
    if not url:
        return None
    if not record:
        state = "waiting"  # for the job to end
    elif record.get("delivered_at"):
        state = "delivered"
    elif record.get("gave_up_at"):
        state = "gave_up"
    else:
        state = "retrying" if int(record.get("attempts") or 0) else "queued"
    numbers = {k: float(v) for k, v in record.items() if k.endswith("_at") and v}
    return {
        "state": state,
        "host": urlsplit(url).hostname,
        "attempts": int(record.get("attempts") or 0),
        "last_status": int(record["last_status"]) if record.get("last_status") else None,
        "last_error": record.get("last_error") or None,
        **{k: numbers.get(k) for k in ("queued_at", "next_at", "delivered_at", "gave_up_at")},
    }


def describe_delivery(summary: dict[str, Any], now: float | None = None) -> str:
    """One line for ``fluxfleet status``, e.g. 'webhook: retrying (connection refused), attempt 3 in 4 s'."""
    attempts = summary["attempts"]
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    state = summary["state"]
    if state == "waiting":
        return "webhook: sent when the job ends"
    if state == "delivered":
        return f"webhook: delivered after {tries} (HTTP {summary['last_status']})"
    if state == "gave_up":
        return f"webhook: gave up after {tries} ({summary['last_error']})"
    if state == "queued":
        return "webhook: queued, not attempted yet (workers with FLUXFLEET_WEBHOOK__SECRET send it)"
    wait = max(0.0, (summary["next_at"] or 0.0) - (time.time() if now is None else now))
    return f"webhook: retrying ({summary['last_error']}), attempt {attempts + 1} in {wait:.0f} s"
