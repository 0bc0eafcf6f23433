"""Storage records each object's sha256 when writing it, so a skipped item's record needs no download.

Real services: moto's S3 server over HTTP and a redis-server; GetObject calls are counted with a
boto3 event hook on the very client the storage uses.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import boto3
import pytest

from fluxfleet.jobs import JobStore
from fluxfleet.keys import image_key
from fluxfleet.presets import Preset, effective_defaults, load_preset
from fluxfleet.schema import Item
from fluxfleet.settings import Settings
from fluxfleet.storage import open_storage
from fluxfleet.storage.local import LocalStorage
from fluxfleet.storage.s3 import S3Storage
from producer.batching import build_items, split_tasks
from producer.inputs import PromptSpec
from producer.stack import RedisServer
from tests.conftest import s3_env, settings_for
from tests.enginekit import run_task


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_settings(s3_endpoint: str, s3_bucket: str, **env: str) -> Settings:
    return settings_for({"FLUXFLEET_STORAGE__URL": f"s3://{s3_bucket}/fleet", **s3_env(s3_endpoint), **env})


def count_gets(storage: S3Storage) -> list[str]:
    """The keys of every GetObject the storage's client sends from now on."""
    keys: list[str] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        keys.append(params["Key"])

    storage.client.meta.events.register("provide-client-params.s3.GetObject", hook)
    return keys


def put_without_digest(s3_endpoint: str, bucket: str, key: str, data: bytes) -> None:
    """An object as writes made it before they recorded the digest."""
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    raw.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/png")


def test_s3_writes_record_the_digest_and_digest_reads_only_metadata(s3_endpoint: str, s3_bucket: str) -> None:
    storage = open_storage(s3_settings(s3_endpoint, s3_bucket).storage)
    assert isinstance(storage, S3Storage)
    gets = count_gets(storage)
    storage.put_if_absent("images/ab/one.png", b"first image", "image/png")
    storage.put("jobs/j/manifest.jsonl", b"a manifest\n", "application/x-ndjson")

    assert storage.digest("images/ab/one.png") == sha(b"first image")
    assert storage.digest("jobs/j/manifest.jsonl") == sha(b"a manifest\n")
    assert gets == [], "the digest comes from HEAD metadata, never a download"
    head = storage.client.head_object(Bucket=s3_bucket, Key="fleet/images/ab/one.png")
    assert head["Metadata"] == {"sha256": sha(b"first image")}
    with pytest.raises(KeyError):
        storage.digest("images/ab/missing.png")


def test_s3_digest_of_an_object_without_metadata_reads_it_once(s3_endpoint: str, s3_bucket: str) -> None:
    storage = open_storage(s3_settings(s3_endpoint, s3_bucket).storage)
    assert isinstance(storage, S3Storage)
    put_without_digest(s3_endpoint, s3_bucket, "fleet/images/cd/old.png", b"an older image")
    gets = count_gets(storage)

    assert storage.digest("images/cd/old.png") == sha(b"an older image")
    assert gets == ["fleet/images/cd/old.png"]


def test_local_digest_hashes_the_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put_if_absent("images/ef/one.png", b"local image", "image/png")
    assert storage.digest("images/ef/one.png") == sha(b"local image")
    with pytest.raises(KeyError):
        storage.digest("images/ef/missing.png")


def tiny_items(settings: Settings, prompts: list[str]) -> tuple[Preset, list[Item]]:
    preset = load_preset("tiny", settings.presets_dir)
    items = build_items(
        [PromptSpec(p) for p in prompts],
        preset=preset,
        model=preset.model,
        defaults=effective_defaults(preset, settings),
        limits=settings.limits,
        job_seed=5,
    )
    return preset, items


def never_generate(items: list[Item], stop: Any) -> list[Any]:
    raise AssertionError(f"every image is stored already; nothing should be generated, got {items}")


def test_skipped_items_are_recorded_without_downloading_their_images(
    redis_server: RedisServer, s3_endpoint: str, s3_bucket: str
) -> None:
    settings = s3_settings(s3_endpoint, s3_bucket, FLUXFLEET_BROKER__URL=redis_server.url)
    storage = open_storage(settings.storage)
    assert isinstance(storage, S3Storage)
    jobs = JobStore.from_settings(settings.broker)
    preset, items = tiny_items(settings, ["a red fox", "an old lighthouse"])
    model = preset.model
    (task,) = split_tasks(items, job_id="skips", preset=preset, model=model)
    jobs.create(job_id="skips", preset="tiny", model=model, tasks=[task])
    # Given one image stored with its digest and one stored by an older version, without it,
    new, old = items
    storage.put_if_absent(image_key(new.key), b"new png bytes", "image/png")
    put_without_digest(s3_endpoint, s3_bucket, f"fleet/{image_key(old.key)}", b"old png bytes")
    gets = count_gets(storage)
    # when the task runs, both are skipped with the stored object's sha256,
    outcome = run_task(
        task, generate=never_generate, preset=preset, model=model, settings=settings, storage=storage, jobs=jobs
    )
    assert (outcome.skipped, outcome.generated, outcome.failed) == (2, 0, 0)
    records = {r.key: r for r in jobs.records("skips")}
    assert records[new.key].sha256 == sha(b"new png bytes") and records[new.key].skipped
    assert records[old.key].sha256 == sha(b"old png bytes") and records[old.key].skipped
    # and only the image without a recorded digest is downloaded.
    assert [k for k in gets if "/images/" in k] == [f"fleet/{image_key(old.key)}"]
