"""The worker transport's envelope check, with generated inputs (hypothesis), in this process.

Whatever bytes arrive, ``check_envelope`` admits or refuses them and raises nothing else; what it admits,
kombu builds a message from and Celery builds a request from, raising at most Celery's own refusals
(which the worker's consumer counts). A real envelope, made by Celery over kombu's in-memory transport,
passes unchanged. The worker-level version of this is ``test_hostile_queue``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import InvalidTaskError
from celery.worker.request import Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import loads
from kombu.transport.virtual import Message

from fluxfleet.keys import TASK_GENERATE
from workers.service.transport import Refused, check_envelope

REASONS = {"too_large", "undecodable", "malformed", "content_type"}
CELERY_REFUSALS = (InvalidTaskError, ContentDisallowed, DecodeError)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def celery_app() -> Celery:
    app = Celery("envelope-test", broker="memory://", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_backend=None)

    @app.task(name=TASK_GENERATE)
    def generate(*args: Any, **kwargs: Any) -> None:
        return None

    return app


@pytest.fixture(scope="module")
def real_envelope(celery_app: Celery) -> dict[str, Any]:
    """What Celery sends for ``fluxfleet.generate({...})``, as kombu stores it (kombu's memory transport)."""
    celery_app.send_task(TASK_GENERATE, args=[{"job_id": "j"}], queue="fluxfleet.tiny")
    with celery_app.connection() as connection:
        envelope = connection.default_channel._get("fluxfleet.tiny")
    return dict(json.loads(json.dumps(envelope)))


def admit(raw: bytes) -> dict[str, Any] | None:
    try:
        return check_envelope(raw)
    except Refused as refusal:
        assert refusal.reason in REASONS, refusal.reason
        assert str(refusal)
        return None


def celery_reads(app: Celery, envelope: dict[str, Any]) -> None:
    """Build kombu's message and Celery's request as the worker's strategy does (protocol 2)."""
    with app.connection() as connection:
        message = Message(envelope, channel=connection.default_channel)
        try:
            assert not (isinstance(message.payload, dict) and "args" in message.payload)
            request = Request(
                message,
                app=app,
                task=app.tasks[TASK_GENERATE],
                hostname="test",
                body=message.body,
                headers=message.headers,
                decoded=False,
                utc=True,
            )
        except CELERY_REFUSALS:
            return  # the worker's consumer refuses and counts these
        # What the parent reads before handing the request to the pool (Request.execute_using_pool),
        assert not request.revoked()
        time_limit, soft_time_limit = request.time_limits
        assert (time_limit, soft_time_limit) == (None, None)
        # and what the pool child unpacks (celery.app.trace) before calling the task.
        args, kwargs, embed = loads(
            request.body, request.content_type, request.content_encoding, accept={"application/json"}
        )
        assert isinstance(args, list) and isinstance(kwargs, dict)
        assert not {**(embed or {})}.get("callbacks")


def set_path(value: Any, path: list[Any], new: Any) -> None:
    for key in path[:-1]:
        value = value[key]
    value[path[-1]] = new


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[list[Any]]:
    found: list[list[Any]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        found.append([*prefix, key])
        found.extend(paths_of(child, (*prefix, key)))
    return found


def test_a_real_envelope_passes_unchanged(celery_app: Celery, real_envelope: dict[str, Any]) -> None:
    raw = json.dumps(real_envelope).encode()
    assert check_envelope(raw) == real_envelope
    celery_reads(celery_app, real_envelope)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_admitted_or_refused(raw: bytes) -> None:
    envelope = admit(raw)
    assert envelope is None, envelope  # random bytes are never a task message


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_is_refused(value: Any) -> None:
    assert admit(json.dumps(value).encode()) is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), new=json_values)
def test_an_envelope_with_one_part_changed_is_refused_or_read_by_celery(
    celery_app: Celery, real_envelope: dict[str, Any], data: st.DataObject, new: Any
) -> None:
    # Given a real envelope with one part (of the envelope or of its decoded body) replaced,
    envelope = json.loads(json.dumps(real_envelope))
    body = json.loads(base64.b64decode(envelope["body"]))
    target = data.draw(st.sampled_from(["envelope", "body"]))
    root = envelope if target == "envelope" else body
    path = data.draw(st.sampled_from(paths_of(root)))
    set_path(root, path, new)
    if target == "body":
        envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    # when the transport checks it, it is refused with a reason, or kombu and Celery read it.
    admitted = admit(json.dumps(envelope).encode())
    if admitted is not None:
        celery_reads(celery_app, admitted)
