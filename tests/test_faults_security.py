"""Security: JSON only (pickle rejected and counted), keys cannot escape their prefix, limits in
producer and worker, credentials kept out of logs, manifests and PNGs, loopback by default."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from fluxfleet.celery_config import make_celery
from fluxfleet.errors import ValidationError
from fluxfleet.keys import TASK_GENERATE, manifest_key
from fluxfleet.settings import Settings
from fluxfleet.storage import open_storage
from tests.conftest import s3_env
from tests.faultkit import prompts, running_fleet, wait_for

pytestmark = pytest.mark.faults

SECRET = "s3cr3t-NEVER-LOGGED-0042"


class Exploit:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def test_job_ids_and_limits_are_checked_in_the_producer() -> None:
    from producer.client import Client

    client = Client(Settings().with_overrides(broker__url="redis://127.0.0.1:1/0", limits__max_prompt_chars=50))
    for bad in ("../escape", "a/b", "/abs", "..", "x/../../y"):
        with pytest.raises(ValidationError, match="job id"):
            client.submit(["a cat"], preset="tiny", job_id=bad)
    with pytest.raises(ValidationError, match="characters"):
        client.submit(["a cat " * 20], preset="tiny", job_id="ok")
    with pytest.raises(ValidationError, match="images_per_prompt"):
        client.submit(["a cat"], preset="tiny", images_per_prompt=100)
    with pytest.raises(ValidationError, match="steps"):
        client.submit(["a cat"], preset="tiny", steps=10_000)
    with pytest.raises(ValidationError, match="width"):
        client.submit(["a cat"], preset="tiny", width=8192)
    assert Settings().worker.metrics_address == "127.0.0.1"


def test_worker_rejects_pickle_escaping_keys_and_oversized_payloads(
    tmp_path: Path, tiny_model_dir: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    s3 = {**s3_env(s3_endpoint, secret=SECRET), "FLUXFLEET_LIMITS__MAX_PAYLOAD_BYTES": "20000"}
    debug = {"FLUXFLEET_LOGLEVEL": "DEBUG"}
    with running_fleet(tmp_path, tiny_model_dir, f"s3://{s3_bucket}/fleet", worker_env=debug, **s3) as fleet:
        worker, client = fleet.worker, fleet.client
        app = make_celery(client.settings, ["tiny"])
        app.conf.accept_content = ["json", "pickle"]  # this sender is hostile

        # A pickle payload is refused (never deserialized, so never executed) and counted.
        marker = tmp_path / "pwned"
        app.send_task(TASK_GENERATE, args=[Exploit(marker)], queue="fluxfleet.tiny", serializer="pickle")
        # A job id that would escape the storage prefix, and an oversized payload, are rejected too.
        job = client.submit(prompts(1), preset="tiny", job_id="real")
        assert job.wait(timeout=60).state == "done"
        evil = client.jobs.task_payloads("real")[0].model_dump(mode="json")
        evil["job_id"] = "../../outside"
        app.send_task(TASK_GENERATE, args=[evil], queue="fluxfleet.tiny")
        huge = {**client.jobs.task_payloads("real")[0].model_dump(mode="json"), "job_id": "huge"}
        huge["items"] = huge["items"] * 200
        app.send_task(TASK_GENERATE, args=[huge], queue="fluxfleet.tiny")
        wait_for(lambda: sum(client.jobs.rejected().values()) >= 3, 60, "three rejections")
        assert client.jobs.rejected() == {"content_type": 1, "invalid": 1, "too_large": 1}
        assert not marker.exists()
        log = worker.log()
        assert "job id '../../outside' is not allowed" in log
        assert "over the limit of 20000" in log
        storage = open_storage(client.settings.storage)
        assert not [k for k in storage.list("") if "outside" in k or k.startswith("huge")]

        # The worker still serves; credentials appear nowhere: logs, manifest, records, PNG metadata.
        time.sleep(0.5)
        manifest = storage.get(manifest_key("real")).decode()
        record = job.results()[0]
        png = tmp_path / "image.png"
        png.write_bytes(storage.get(record.image_key))
        with Image.open(png) as image:
            metadata = str(image.info)
        for text in (worker.log(), manifest, record.model_dump_json(), metadata):
            assert SECRET not in text
        assert worker.stop() == 0
