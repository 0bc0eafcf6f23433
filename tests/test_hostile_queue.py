"""Hostile queue traffic against one real tiny worker: junk bytes, junk JSON, Celery envelopes with wrong
parts or wrong bodies, tasks for another model or over the preset's limits.

Whatever arrives, the worker stays up (same process), refuses it without running it, counts it once in
``fluxfleet:rejected``, keeps the newest ``DEADLETTER_MAX`` in ``fluxfleet:deadletter``, and then still
completes a normal job. All three tests share one worker, as a fleet left running overnight would.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fluxfleet import deadletter
from fluxfleet.keys import image_key, queue_name
from fluxfleet.presets import effective_defaults, load_preset
from fluxfleet.storage import open_storage
from producer.batching import build_items, split_tasks
from producer.client import Client
from producer.inputs import PromptSpec
from tests import hostile
from tests.faultkit import Fleet, check_end_state, prompts, queue_is_idle, running_fleet, wait_for

pytestmark = pytest.mark.faults

SEED = 14
QUEUE = queue_name("tiny")
SCHNELL = "black-forest-labs/FLUX.1-schnell"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("hostile"), tiny_model_dir) as fleet:
        yield fleet


def broker(fleet: Fleet) -> redis.Redis:
    return redis.Redis.from_url(fleet.client.settings.broker.url_with_password())


def rejected(fleet: Fleet) -> Counter[str]:
    return Counter(deadletter.rejected_counts(broker(fleet), "fluxfleet"))


def push_and_count(fleet: Fleet, messages: list[bytes], timeout: float = 60) -> Counter[str]:
    """Push ``messages`` in order; once the worker has refused as many, the refusals by reason."""
    before = rejected(fleet)
    r = broker(fleet)
    for start in range(0, len(messages), 200):
        r.lpush(QUEUE, *messages[start : start + 200])

    def delta() -> Counter[str]:
        return rejected(fleet) - before

    wait_for(lambda: delta().total() >= len(messages), timeout, f"{len(messages)} refusals", poll=0.1)
    time.sleep(0.5)  # a message counted twice would show up now
    assert delta().total() == len(messages), delta()
    wait_for(lambda: queue_is_idle(fleet.client.settings), 10, "nothing queued or unacknowledged")
    return delta()


def producer_with(fleet: Fleet, tmp: Path, **preset_fields: object) -> Client:
    """A client whose own copy of the tiny preset differs from the worker's (``model``, ``max_items_per_task``),
    as a producer with another presets directory or without ``FLUXFLEET_MODEL_DIR`` would have."""
    settings = fleet.client.settings
    text = (settings.presets_dir / "tiny.toml").read_text()
    lines = [line for line in text.splitlines() if not any(line.startswith(f"{name} =") for name in preset_fields)]
    head = [f"{name} = {value!r}".replace("'", '"') for name, value in preset_fields.items()]
    (tmp / "presets").mkdir(exist_ok=True)
    (tmp / "presets" / "tiny.toml").write_text("\n".join(head + lines) + "\n")
    update: dict[str, object] = {"presets_dir": tmp / "presets"}
    if "model" in preset_fields:
        update["model_dir"] = None  # or FLUXFLEET_MODEL_DIR would stand for the preset's model
    return Client(settings.model_copy(update=update))


def crafted_task(client: Client, job_id: str, n: int, model: str) -> dict[str, object]:
    """A well-formed task payload of ``n`` items for ``model`` (keys hash it), never submitted as a job."""
    settings = client.settings
    preset = load_preset("tiny", settings.presets_dir).model_copy(update={"max_items_per_task": n})
    items = build_items(
        [PromptSpec(p) for p in prompts(n)],
        preset=preset,
        model=model,
        defaults=effective_defaults(preset, settings),
        limits=settings.limits,
    )
    (task,) = split_tasks(items, job_id=job_id, preset=preset, model=model)
    return task.model_dump(mode="json")


def test_hostile_traffic_is_refused_counted_and_dead_lettered(fleet: Fleet) -> None:
    rng = random.Random(SEED)
    settings = fleet.client.settings
    assert fleet.worker.process is not None
    pid = fleet.worker.process.pid
    loaded = str(settings.model_dir)
    template = hostile.celery_envelope(settings, ["not a payload"], QUEUE)
    good = crafted_task(fleet.client, "never-submitted", 2, loaded)

    # Given the messages of the report and well-formed envelopes with wrong parts or wrong bodies,
    no_properties = {k: v for k, v in template.items() if k != "properties"}
    no_headers = {k: v for k, v in template.items() if k != "headers"}
    pickled = hostile.fresh(template) | {"content-type": "application/x-python-serialize", "content-encoding": "binary"}
    builtin = hostile.fresh(template)
    builtin["headers"]["task"] = "celery.accumulate"
    unknown = hostile.fresh(template)
    unknown["headers"]["task"] = "fluxfleet.no_such_task"
    raised_limit = hostile.fresh(template)
    raised_limit["headers"]["timelimit"] = [3600, 7200]
    callback = hostile.with_body(template, [[good], {}, {"callbacks": [{"task": "celery.accumulate"}]}])
    bad_eta = hostile.fresh(template)
    bad_eta["headers"]["eta"] = "the day after tomorrow"
    far_eta = hostile.fresh(template)
    far_eta["headers"]["eta"] = "2099-01-01T00:00:00+00:00"
    expiring = hostile.fresh(template)
    expiring["headers"]["expires"] = "2000-01-01T00:00:00+00:00"
    explicit: list[tuple[str, bytes | dict[str, object]]] = [
        *((hostile.ISSUE_REASONS[sample], sample) for sample in hostile.ISSUE_SAMPLES),
        ("malformed", no_properties),
        ("malformed", no_headers),
        ("content_type", pickled),
        ("malformed", raised_limit),
        ("malformed", callback),
        ("unknown_task", builtin),
        ("unknown_task", unknown),
        ("invalid_message", bad_eta),
        ("malformed", far_eta),
        ("malformed", expiring),
        ("wrong_arguments", hostile.with_task(template, [])),
        ("wrong_arguments", hostile.with_task(template, [good, good])),
        ("wrong_arguments", hostile.with_task(template, [good], {"priority": 1})),
        ("invalid", hostile.with_task(template, ["not a payload"])),
        ("invalid", hostile.with_task(template, [[good]])),
        ("invalid", hostile.with_task(template, [good | {"items": "everything"}])),
        ("invalid", hostile.with_task(template, [good | {"job_id": "../../outside"}])),
        ("too_many_items", hostile.with_task(template, [crafted_task(fleet.client, "huge", 200, loaded)])),
        ("wrong_model", hostile.with_task(template, [crafted_task(fleet.client, "schnell", 2, SCHNELL)])),
        ("wrong_preset", hostile.with_task(template, [good | {"preset": "fast"}])),
    ]
    # when they are pushed straight onto the worker's queue, each is refused under its reason;
    counts = push_and_count(fleet, [hostile.encode(m) for _, m in explicit])
    assert counts == Counter(reason for reason, _ in explicit)

    # and so are hundreds of random byte strings, JSON values and envelopes with one part changed,
    junk = [hostile.random_bytes(rng) for _ in range(600)]
    junk += [json.dumps(hostile.random_json(rng)).encode() for _ in range(300)]
    junk += [hostile.encode(hostile.mutate(rng, template)) for _ in range(150)]
    last = rng.randbytes(5000)
    push_and_count(fleet, [*junk, last])

    # while the worker stays the same process, serving,
    assert fleet.worker.process.poll() is None and fleet.worker.process.pid == pid
    assert "Unrecoverable error" not in fleet.worker.log()
    # the dead-letter list keeps only the newest entries, each with its reason, queue and first bytes,
    letters = deadletter.dead_letters(broker(fleet), "fluxfleet", count=10 * deadletter.DEADLETTER_MAX)
    assert len(letters) == deadletter.DEADLETTER_MAX
    assert letters[0]["size"] == len(last) and letters[0]["queue"] == QUEUE
    assert letters[0]["raw"] == last[: deadletter.RAW_MAX_BYTES].decode("utf-8", "backslashreplace")
    assert all(e["reason"] and e["detail"] and e["size"] >= 0 for e in letters)
    # nothing was recorded for any of it,
    storage = open_storage(settings.storage)
    hostile_jobs = ("never-submitted", "huge", "schnell", "outside")
    assert not [k for k in storage.list("jobs/") if k.split("/")[1] in hostile_jobs]
    assert all(fleet.client.jobs.status(j) is None for j in hostile_jobs)
    # and a normal job still completes.
    job = fleet.client.submit(prompts(2), preset="tiny", job_id="after-the-storm")
    assert job.wait(timeout=60).state == "done"
    check_end_state(fleet.client, "after-the-storm", done=2)


def test_a_task_for_another_model_is_never_generated(fleet: Fleet, tmp_path: Path) -> None:
    # Given a producer whose tiny preset names FLUX.1-schnell (keys hash schnell) and a tiny worker,
    before = rejected(fleet)
    schnell = producer_with(fleet, tmp_path, model=SCHNELL)
    # when it submits a job, every item fails with the reason instead of being made by the loaded model;
    job = schnell.submit(prompts(3, "claimed"), preset="tiny", job_id="claims-schnell")
    assert job.wait(timeout=60).state == "failed"
    failures = fleet.client.jobs.failures("claims-schnell")
    assert len(failures) == 3 and all(SCHNELL in f.reason and "FLUXFLEET_MODEL_DIR" in f.reason for f in failures)
    assert not fleet.client.jobs.records("claims-schnell")
    storage = open_storage(fleet.client.settings.storage)
    assert not any(storage.exists(image_key(f.key)) for f in failures)
    # and a hostile task claiming schnell for no job is refused without any record.
    template = hostile.celery_envelope(fleet.client.settings, ["x"], QUEUE)
    claim = hostile.with_task(template, [crafted_task(fleet.client, "ghost", 2, SCHNELL)])
    push_and_count(fleet, [hostile.encode(claim)])
    assert fleet.client.jobs.status("ghost") is None and not fleet.client.jobs.failures("ghost")
    assert rejected(fleet) - before == Counter(wrong_model=2)


def test_a_task_over_the_preset_item_limit_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    # Given a producer whose tiny preset allows 8 items per task where the worker's allows 4,
    before = rejected(fleet)
    loose = producer_with(fleet, tmp_path, max_items_per_task=8)
    # when it submits 8 items (one task), the worker refuses the task and fails its items with the reason,
    job = loose.submit(prompts(8, "crowded"), preset="tiny", job_id="crowded")
    assert job.wait(timeout=60).state == "failed"
    failures = fleet.client.jobs.failures("crowded")
    assert len(failures) == 8 and all("max_items_per_task of 4" in f.reason for f in failures)
    storage = open_storage(fleet.client.settings.storage)
    assert not any(storage.exists(image_key(f.key)) for f in failures)
    assert rejected(fleet) - before == Counter(too_many_items=1)
