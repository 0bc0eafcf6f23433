"""The whole path for real: producer → Redis → Celery worker → tiny FLUX pipeline → storage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
from PIL import Image

from fluxfleet.keys import image_key, manifest_key
from fluxfleet.storage import open_storage
from producer.client import Client
from tests.conftest import SharedStack, s3_env, settings_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def stored_files(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (root / "images").rglob("*.png")}


def test_batch_round_trip_through_local_storage(shared_stack: SharedStack) -> None:
    # Given the example prompts file, when it is submitted and waited for,
    client = shared_stack.client()
    job = client.submit(EXAMPLES / "prompts.txt", preset="tiny", seed=101)
    status = job.wait(timeout=180)

    # then every item has exactly one stored PNG and one manifest line.
    assert status.state == "done"
    assert (status.total, status.done, status.failed) == (8, 8, 0)
    records = job.results()
    assert [r.index for r in records] == list(range(8))
    assert len({r.key for r in records}) == 8
    manifest = (shared_stack.storage_root / manifest_key(job.id)).read_text().splitlines()
    assert [json.loads(line)["key"] for line in manifest] == [r.key for r in records]
    for record in records:
        path = Path(record.location)
        assert path == shared_stack.storage_root / image_key(record.key)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256
        assert record.params.width == 64 and record.params.steps == 4
        assert record.timings.generate_s > 0 and record.worker.startswith("tiny-gpu0@")
        with Image.open(path) as image:
            assert image.size == (64, 64)
            parameters = image.info["parameters"]
        assert parameters.startswith(record.prompt)
        assert f"Seed: {record.seed}" in parameters and f"Key: {record.key}" in parameters


def test_per_item_overrides_from_csv_and_jsonl(shared_stack: SharedStack) -> None:
    client = shared_stack.client()
    csv_job = client.submit(EXAMPLES / "prompts.csv", preset="tiny")
    jsonl_job = client.submit(EXAMPLES / "prompts.jsonl", preset="tiny")
    assert csv_job.wait(timeout=180).done == 3
    assert jsonl_job.wait(timeout=180).done == 3

    by_prompt = {r.prompt: r for r in csv_job.results()}
    assert by_prompt["a red cat on a blue sofa"].seed == 7
    assert by_prompt["a green forest river at night"].params.width == 96
    assert by_prompt["a silver moon over a quiet sea"].params.steps == 3
    assert by_prompt["a silver moon over a quiet sea"].params.guidance == 2.0
    with Image.open(by_prompt["a green forest river at night"].location) as image:
        assert image.size == (96, 64)
    horses = [r for r in jsonl_job.results() if r.prompt.startswith("a black horse")]
    assert len(horses) == 2 and len({r.seed for r in horses}) == 2


def test_resubmission_writes_nothing_new(shared_stack: SharedStack) -> None:
    client = shared_stack.client()
    prompts = ["a blue bird over the sea", "a stone tower at night"]
    first = client.submit(prompts, preset="tiny", seed=7, job_id="resubmit-a")
    assert first.wait(timeout=120).done == 2
    before = stored_files(shared_stack.storage_root)

    # The same items under a new job id: found in storage, skipped, nothing rewritten.
    second = client.submit(prompts, preset="tiny", seed=7, job_id="resubmit-b")
    status = second.wait(timeout=120)
    assert (status.done, status.skipped) == (2, 2)
    assert [r.key for r in second.results()] == [r.key for r in first.results()]
    assert stored_files(shared_stack.storage_root) == before

    # The same job id again: recognised, nothing enqueued.
    again = client.submit(prompts, preset="tiny", seed=7, job_id="resubmit-a")
    assert again.already_submitted
    assert again.status().total == 2


def test_batch_round_trip_through_s3(make_stack, s3_endpoint: str, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(f"s3://{s3_bucket}/fleet", **s3_env(s3_endpoint))
    stack.start_redis()
    stack.start_worker("tiny").wait_ready(timeout=180)
    client = Client(settings_for(stack.env))

    job = client.submit(["a red cat", "a green tree", "a gold moon"], preset="tiny", seed=3)
    status = job.wait(timeout=180)

    assert status.done == 3
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    for record in job.results():
        assert f"fleet/{image_key(record.key)}" in keys
        assert record.location == f"s3://{s3_bucket}/fleet/{image_key(record.key)}"
        body = s3.get_object(Bucket=s3_bucket, Key=f"fleet/{image_key(record.key)}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == record.sha256
        # The worker recorded the digest at write time, so a later skip of this item needs no GET.
        head = s3.head_object(Bucket=s3_bucket, Key=f"fleet/{image_key(record.key)}")
        assert head["Metadata"]["sha256"] == record.sha256
    manifest = s3.get_object(Bucket=s3_bucket, Key=f"fleet/{manifest_key(job.id)}")["Body"].read().decode()
    assert len(manifest.splitlines()) == 3
    # The storage interface sees the same objects.
    storage = open_storage(client.settings.storage)
    assert storage.exists(image_key(job.results()[0].key))
