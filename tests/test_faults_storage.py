"""Faults 14 and 15: storage outage, throttling and slow responses; two workers writing one key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import s3_env
from tests.faultkit import StorageProxy, check_end_state, prompts, running_fleet, wait_for

pytestmark = pytest.mark.faults


def test_storage_outage_throttling_and_slowness(
    tmp_path: Path, tiny_model_dir: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    proxy = StorageProxy(s3_endpoint)
    s3 = {**s3_env(proxy.url), "FLUXFLEET_STORAGE__MAX_ATTEMPTS": "2"}
    try:
        with running_fleet(tmp_path, tiny_model_dir, f"s3://{s3_bucket}/fleet", **s3) as fleet:
            worker, client = fleet.worker, fleet.client

            # 14. Given image writes answered 503 SlowDown, then unreachable, then slow:
            for mode, job_id in (("503", "throttled"), ("down", "outage"), ("slow", "slow-store")):
                proxy.mode, proxy.delay = mode, 0.5
                job = client.submit(prompts(4, mode), preset="tiny", job_id=job_id)
                if mode != "slow":
                    wait_for(lambda: proxy.failed > 0, 30, f"a {mode} storage answer")
                    time.sleep(3)
                    proxy.mode = "ok"  # the outage ends
                # then every image is stored once, after retries with backoff, and none is lost.
                assert job.wait(timeout=120).state == "done", mode
                check_end_state(client, job.id, done=4, started_once=False)
            assert proxy.stored and set(proxy.stored.values()) == {1}, "one successful write per image"
            assert "retry 1" in worker.log()  # retried with backoff (task retries: 2 s, 5 s, ...)
            assert worker.stop() == 0
    finally:
        proxy.close()


def test_two_workers_write_the_same_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 15. Two jobs with the same items run at once on two workers (both generate: neither finds the
    # image yet); the conditional write keeps one object, and both jobs end successfully.
    with running_fleet(tmp_path, tiny_model_dir, gpus=("0", "1"), FLUXFLEET_TEST_FAULTS="step_delay=0.3") as fleet:
        workers, client = fleet.workers, fleet.client
        a = client.submit(prompts(4), preset="tiny", seed=5, job_id="same-a")
        b = client.submit(prompts(4), preset="tiny", seed=5, job_id="same-b")
        assert a.wait(timeout=60).state == "done" and b.wait(timeout=60).state == "done"
        first = check_end_state(client, a.id, done=4)
        second = check_end_state(client, b.id, done=4)
        assert [r.key for r in first["records"]] == [r.key for r in second["records"]]
        assert {r.sha256 for r in first["records"]} == {r.sha256 for r in second["records"]}
        assert not any(r.skipped for r in first["records"] + second["records"]), "both generated"
        images = list((tmp_path / "store" / "images").rglob("*.png"))
        assert len(images) == 4
        assert sum(w.log().count("already stored by another attempt") for w in workers) == 4
        for w in workers:
            assert w.stop() == 0
