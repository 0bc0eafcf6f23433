"""Completion webhooks against real things: a redis-server, an HTTP receiver on loopback (http.server in a
thread), a real tiny worker for the end-to-end case. One signed POST per job, retried through a receiver that
is down or failing, given up after the bound, never claimed by two dispatchers; hostile URLs refused at
submit with nothing enqueued; the secret never printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from fluxfleet.errors import ValidationError
from fluxfleet.jobs import JobStore, redis_client
from fluxfleet.keys import manifest_key
from fluxfleet.outcomes import Outcomes
from fluxfleet.schema import ItemFailure
from fluxfleet.settings import BrokerSettings, Settings, StorageSettings, WebhookSettings
from fluxfleet.storage import Storage, open_storage
from fluxfleet.webhooks import (
    MAX_URL_CHARS,
    URL_CHARACTERS,
    Dispatcher,
    backoff_s,
    check_webhook_url,
    delivery_summary,
    describe_delivery,
)
from producer.client import Client
from producer.stack import LocalStack, RedisServer, free_port
from tests.conftest import ROOT, settings_for

SECRET = "whsec-correct-horse-battery-staple"


# -- a real receiver -----------------------------------------------------------------------------------------
class Receiver:
    """An HTTP server on a loopback port that records every POST and answers from ``answers`` (then 200)."""

    def __init__(self, port: int | None = None, answers: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.port = port or free_port()
        self.answers = list(answers or [])
        self.delay_s = delay_s
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/fluxfleet?source=test"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(receiver.delay_s)
                with receiver.lock:
                    receiver.requests.append((dict(self.headers), body))
                    code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", "file:///etc/passwd")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def jobs(redis_server: RedisServer) -> JobStore:
    return JobStore(redis_client(BrokerSettings(url=redis_server.url)))


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return open_storage(StorageSettings(url=f"file://{tmp_path / 'store'}"))


def webhook_settings(**overrides: Any) -> WebhookSettings:
    values = {"secret": SecretStr(SECRET), "poll_interval_s": 0.05, "max_backoff_s": 1.0, **overrides}
    return WebhookSettings.model_validate(values)


def finish_job(jobs: JobStore, storage: Storage, job_id: str, url: str) -> None:
    """A one-item job with a webhook that ends (failed, so no image is needed) the way a worker ends it."""
    jobs.create(job_id=job_id, preset="tiny", model="m", tasks=[], webhook=url)
    jobs.r.hset(jobs.webhook_keys(job_id)[0], mapping={"total": 1, "state": "running"})
    jobs.record_failed(ItemFailure(job_id=job_id, index=0, key="k0", reason="boom", finished_at=time.time()))
    assert Outcomes(storage, jobs).finish(job_id)  # writes the manifest, queues the webhook
    assert not jobs.finish_if_complete(job_id)  # exactly once


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def summary_when(jobs: JobStore, job_id: str, ready: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """The job's webhook summary, once ``ready`` holds for it."""
    return wait_for(lambda: (s := delivery_summary(jobs, job_id)) is not None and ready(s) and s, what=what)  # type: ignore[no-any-return]


def readme_verify() -> Callable[[bytes, Any, str], bool]:
    """The verification snippet of the README's Webhooks section, run as a receiver would copy it."""
    section = (ROOT / "README.md").read_text().split("## Webhooks", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the README's Webhooks section has no Python snippet"
    assert len(code.group(1).strip().splitlines()) <= 6
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)
    return namespace["verify"]  # type: ignore[no-any-return]


def fluxfleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_job_through_a_real_worker_is_announced_once_signed(
    make_stack: Callable[..., LocalStack], receiver: Receiver
) -> None:
    # Given a tiny worker holding the webhook secret, and a job that names the receiver
    stack = make_stack(FLUXFLEET_WEBHOOK__SECRET=SECRET, FLUXFLEET_WEBHOOK__POLL_INTERVAL_S="0.2")
    stack.start_redis()
    worker = stack.start_worker("tiny")
    worker.wait_ready(timeout=180)
    client = Client(settings_for(stack.env))
    job = client.submit(["a red fox in snow", "a lighthouse at dusk"], preset="tiny", webhook=receiver.url)
    # When the job ends
    assert job.wait(timeout=120).state == "done"
    wait_for(lambda: receiver.requests, what="the webhook")
    time.sleep(1.5)  # room for a second POST, which must not come
    # Then exactly one signed POST arrived, carrying the final counts and the manifest's location
    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    assert readme_verify()(body, headers, SECRET)
    assert abs(int(headers["X-Fluxfleet-Timestamp"]) - time.time()) < 60
    sent = json.loads(body)
    assert sent == {
        "job_id": job.id,
        "state": "done",
        "total": 2,
        "done": 2,
        "skipped": 0,
        "failed": 0,
        "cancelled": 0,
        "finished_at": job.status().finished_at,
        "manifest": job.manifest_location(),
    }
    assert len(Path(sent["manifest"]).read_text().splitlines()) == 2
    # and `fluxfleet status` says so in one line, the secret nowhere in its output or the worker's log
    shown = fluxfleet(stack.env, "status", job.id)
    assert shown.returncode == 0, shown.stderr
    assert "webhook: delivered after 1 attempt (HTTP 200)" in shown.stdout
    as_json = fluxfleet(stack.env, "status", job.id, "--json")
    assert json.loads(as_json.stdout)["webhook"]["state"] == "delivered"
    worker.stop()
    for text in (shown.stdout, shown.stderr, as_json.stdout, as_json.stderr, worker.log()):
        assert SECRET not in text


# -- delivery ------------------------------------------------------------------------------------------------
def test_the_signature_verifies_and_a_changed_body_does_not(
    jobs: JobStore, storage: Storage, receiver: Receiver
) -> None:
    # Given a finished job and a dispatcher
    finish_job(jobs, storage, "signed", receiver.url)
    # When it delivers
    assert Dispatcher(jobs, webhook_settings(), storage).deliver_due()
    # Then the README's verification accepts the body and refuses it changed or under another secret
    headers, body = receiver.requests[0]
    verify = readme_verify()
    assert verify(body, headers, SECRET)
    assert not verify(body.replace(b'"failed": 1', b'"failed": 0'), headers, SECRET)
    assert not verify(body, headers, SECRET + "x")
    assert json.loads(body)["state"] == "failed"
    assert json.loads(body)["manifest"] == storage.location(manifest_key("signed"))
    assert headers["Content-Type"] == "application/json"


def test_two_dispatchers_racing_deliver_each_job_once(
    jobs: JobStore, storage: Storage, redis_server: RedisServer
) -> None:
    # Given a slow receiver and twenty finished jobs
    slow = Receiver(delay_s=0.05).start()
    try:
        for n in range(20):
            finish_job(jobs, storage, f"race-{n}", slow.url)
        # When two dispatchers, each with its own Redis connection, run at once
        racers = [
            Dispatcher(JobStore(redis_client(BrokerSettings(url=redis_server.url))), webhook_settings(), storage)
            for _ in range(2)
        ]
        for racer in racers:
            racer.start()
        wait_for(lambda: len(slow.requests) >= 20, what="twenty deliveries")
        time.sleep(0.5)
        for racer in racers:
            racer.stop()
    finally:
        slow.stop()
    # Then every job was POSTed exactly once
    delivered = sorted(json.loads(body)["job_id"] for _headers, body in slow.requests)
    assert delivered == sorted(f"race-{n}" for n in range(20))
    assert jobs.r.zcard(jobs.webhook_keys("")[2]) == 0


def test_a_claim_a_dead_worker_held_is_delivered_once_its_lease_runs_out(
    jobs: JobStore, storage: Storage, receiver: Receiver
) -> None:
    # Given a delivery claimed by a worker that died before sending it
    finish_job(jobs, storage, "orphan", receiver.url)
    dead, alive = Dispatcher(jobs, webhook_settings(), storage), Dispatcher(jobs, webhook_settings(), storage)
    now = time.time()
    assert dead._claim(keys=[dead.pending], args=[now, now + dead.lease_s]) == "orphan"
    # Then no one takes it while the lease holds, and another worker delivers it once it has run out
    assert not alive.deliver_due(now=now + 1)
    assert alive.deliver_due(now=now + dead.lease_s + 1)
    assert len(receiver.requests) == 1
    assert delivery_summary(jobs, "orphan")["state"] == "delivered"  # type: ignore[index]
    # and the dead worker's claim, were it to come back, can no longer record anything
    dead._record("orphan", now + dead.lease_s, None, gave_up_at=now)
    assert delivery_summary(jobs, "orphan")["gave_up_at"] is None  # type: ignore[index]


def test_a_receiver_that_is_down_gets_it_once_it_is_up(jobs: JobStore, storage: Storage) -> None:
    # Given a job whose receiver is not listening yet
    late = Receiver()
    finish_job(jobs, storage, "down", late.url)
    dispatcher = Dispatcher(jobs, webhook_settings(), storage).start()
    try:
        # When attempts fail, the status says why and when the next one is
        summary = summary_when(jobs, "down", lambda s: s["attempts"] >= 2, "two refused attempts")
        assert summary["state"] == "retrying" and summary["last_error"] == "connection refused"
        assert re.fullmatch(
            r"webhook: retrying \(connection refused\), attempt \d+ in [01] s", describe_delivery(summary)
        )
        # and once the receiver is up, it gets the POST, once
        late.start()
        summary = summary_when(jobs, "down", lambda s: s["state"] == "delivered", "the delivery")
    finally:
        dispatcher.stop()
        late.stop()
    assert summary["attempts"] >= 3 and summary["last_status"] == 200
    assert len(late.requests) == 1
    assert describe_delivery(summary) == f"webhook: delivered after {summary['attempts']} attempts (HTTP 200)"


def test_a_redirect_and_a_500_are_retried_until_a_200(jobs: JobStore, storage: Storage) -> None:
    # Given a receiver that answers a redirect to file:, then 500, then 200
    flaky = Receiver(answers=[302, 500]).start()
    try:
        finish_job(jobs, storage, "flaky", flaky.url)
        dispatcher = Dispatcher(jobs, webhook_settings(), storage).start()
        summary_when(jobs, "flaky", lambda s: s["state"] == "delivered", "the delivery")
        dispatcher.stop()
    finally:
        flaky.stop()
    # Then it took three attempts with the same signed body, and the redirect was not followed
    summary = delivery_summary(jobs, "flaky")
    assert summary is not None and summary["attempts"] == 3 and summary["last_status"] == 200
    assert len(flaky.requests) == 3
    assert len({body for _headers, body in flaky.requests}) == 1
    assert {h["X-Fluxfleet-Signature"] for h, _body in flaky.requests} == {
        flaky.requests[0][0]["X-Fluxfleet-Signature"]
    }


def test_deliveries_are_given_up_after_the_bound(jobs: JobStore, storage: Storage) -> None:
    # Given a receiver that always fails, and a bound of 1.5 s
    broken = Receiver(answers=[503] * 100).start()
    try:
        finish_job(jobs, storage, "hopeless", broken.url)
        dispatcher = Dispatcher(jobs, webhook_settings(give_up_after_s=1.5), storage).start()
        summary = summary_when(jobs, "hopeless", lambda s: s["gave_up_at"] is not None, "giving up")
        seen = len(broken.requests)
        time.sleep(1.5)
        dispatcher.stop()
    finally:
        broken.stop()
    # Then it tried a few times within the bound, stopped, and says so
    assert 2 <= summary["attempts"] == seen == len(broken.requests)
    assert summary["gave_up_at"] - summary["queued_at"] < 1.5 + 1.0
    assert describe_delivery(summary) == f"webhook: gave up after {seen} attempts (HTTP 503)"
    assert jobs.r.zcard(jobs.webhook_keys("")[2]) == 0


def test_the_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_s(n, 60.0) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff_s(10_000, 60.0) == 60


def test_a_job_without_a_webhook_queues_nothing(jobs: JobStore, storage: Storage) -> None:
    jobs.create(job_id="quiet", preset="tiny", model="m", tasks=[])
    jobs.r.hset(jobs.webhook_keys("quiet")[0], mapping={"total": 0, "state": "running"})
    assert Outcomes(storage, jobs).finish("quiet")
    assert jobs.r.zcard(jobs.webhook_keys("")[2]) == 0
    assert delivery_summary(jobs, "quiet") is None


# -- hostile URLs --------------------------------------------------------------------------------------------
NASTY = [
    "",
    "file:///etc/passwd",
    "ftp://example.com/x",
    "gopher://example.com:70/_SET",
    "javascript:alert(1)",
    "data:text/plain,hi",
    "http://",
    "https://",
    "http:///path",
    "http://:8080/",
    "//example.com/path",
    "example.com/path",
    "https://user:s3cr3tpw@example.com/",
    "https://user@example.com/",
    "https://:pw@example.com/",
    "http://example.com/\r\nX-Injected: 1",
    "http://example.com/\x00",
    "http://example.com/\x7f",
    "http://exa mple.com/",
    " http://example.com/",
    "http://example.com/ ",
    "http://example.com\\@evil.com/",
    "http://ex\u0430mple.com/",
    "http://example.com/caf\u00e9",
    "http://example.com:99999/",
    "http://example.com:0/",
    "http://example.com:port/",
    "http://[::1/",
    "http://-bad-.example/",
    "http://a..b/",
    "https://example.com/" + "a" * MAX_URL_CHARS,
    "http://example.com/\u202eevil",
    "http://example.com/<script>",
]


@pytest.mark.parametrize("url", NASTY)
def test_a_nasty_url_is_refused_naming_the_field(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        check_webhook_url(url)
    assert refused.value.field == "webhook"
    assert "s3cr3tpw" not in str(refused.value) and "\n" not in str(refused.value)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(st.text(max_size=80), st.builds(lambda s, r: s + r, st.sampled_from(["http://", "https://"]), st.text()))
)
def test_any_text_is_accepted_only_as_a_clean_http_url(url: str) -> None:
    try:
        checked = check_webhook_url(url)
    except ValidationError as e:
        assert e.field == "webhook"
        return
    assert checked == url and len(url) <= MAX_URL_CHARS and set(url) <= URL_CHARACTERS
    assert url.lower().startswith(("http://", "https://")) and "@" not in urlsplit(url).netloc


def hostile(url: str, position: int, poison: str) -> str:
    return url[:position] + poison + url[position:]


HOSTILE_URLS = st.one_of(
    st.sampled_from(NASTY),
    st.builds(
        hostile,
        st.just("https://hooks.example.com/fluxfleet?x=1"),
        st.integers(0, 38),
        st.text(st.characters(codec="utf-8", exclude_characters=list(URL_CHARACTERS)), min_size=1, max_size=3),
    ),
    st.builds(lambda s, rest: f"{s}://{rest}", st.sampled_from(["file", "ftp", "ws", "ssh", "redis"]), st.text()),
    st.builds(lambda user: f"https://{user}:x@example.com/", st.from_regex(r"[a-z]{1,8}", fullmatch=True)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=HOSTILE_URLS)
def test_a_hostile_url_is_refused_at_submit_before_anything_is_enqueued(
    redis_server: RedisServer, tmp_path: Path, url: str
) -> None:
    store = tmp_path / "store"
    client = Client(
        Settings(
            broker=BrokerSettings(url=redis_server.url),
            storage=StorageSettings(url=f"file://{store}"),
            webhook=webhook_settings(),
        )
    )
    with pytest.raises(ValidationError) as refused:
        client.submit(["a cat"], preset="tiny", webhook=url)
    assert refused.value.field == "webhook"
    assert client.jobs.r.dbsize() == 0
    assert not store.exists() or not any(store.rglob("*"))


def test_a_webhook_without_a_secret_is_refused_naming_the_setting(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"FLUXFLEET_BROKER__URL": redis_server.url, "FLUXFLEET_STORAGE__URL": f"file://{tmp_path / 'store'}"}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    refused = fluxfleet(env, "submit", str(prompts), "--preset", "tiny", "--webhook", "https://example.com/h")
    assert refused.returncode == 1
    assert "FLUXFLEET_WEBHOOK__SECRET" in refused.stderr and "(field 'webhook')" in refused.stderr
    assert "Traceback" not in refused.stderr
    hostile_cli = fluxfleet(
        {**env, "FLUXFLEET_WEBHOOK__SECRET": SECRET},
        "submit",
        str(prompts),
        "--preset",
        "tiny",
        "--webhook",
        "file:///x",
    )
    assert hostile_cli.returncode == 1 and "'file:'" in hostile_cli.stderr
    assert redis_client(BrokerSettings(url=redis_server.url)).dbsize() == 0


# -- the secret stays secret ---------------------------------------------------------------------------------
def test_the_secret_is_never_printed_by_status_or_logged(
    jobs: JobStore, storage: Storage, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a failing delivery, then a good one, logged at DEBUG
    flaky = Receiver(answers=[500]).start()
    try:
        finish_job(jobs, storage, "quiet-secret", flaky.url)
        dispatcher = Dispatcher(jobs, webhook_settings(), storage)
        with caplog.at_level("DEBUG"):
            assert dispatcher.deliver_due()
            summary = delivery_summary(jobs, "quiet-secret")
            assert summary is not None and summary["state"] == "retrying"
            assert dispatcher.deliver_due(now=time.time() + 5)
    finally:
        flaky.stop()
    assert "webhook delivered" in caplog.text and "failed (HTTP 500)" in caplog.text
    # When status is asked for with the secret in the environment, in text and JSON, and settings fail to load
    env = {"FLUXFLEET_BROKER__URL": redis_server.url, "FLUXFLEET_WEBHOOK__SECRET": SECRET}
    shown = fluxfleet(env, "status", "quiet-secret")
    as_json = fluxfleet(env, "status", "quiet-secret", "--json")
    broken = fluxfleet({**env, "FLUXFLEET_WEBHOOK__TIMEOUT_S": SECRET}, "status", "quiet-secret")
    # Then the secret appears nowhere
    assert "webhook: delivered after 2 attempts (HTTP 200)" in shown.stdout
    assert broken.returncode != 0 and "FLUXFLEET_WEBHOOK__TIMEOUT_S" in broken.stderr
    for text in (caplog.text, shown.stdout, shown.stderr, as_json.stdout, as_json.stderr, broken.stderr):
        assert SECRET not in text
    assert SECRET in Settings(webhook=webhook_settings()).secret_values()
