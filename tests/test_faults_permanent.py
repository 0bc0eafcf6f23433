"""Permanent storage faults against real workers.

Each permanent fault (a link in the storage root, a full or read-only disk, a bucket that is gone,
credentials the server refuses) fails the items it touches at once with the reason; every job reaches
a terminal state and ``wait`` returns; no temporary file survives and nothing is written outside the
root. A transient fault that outlasts the retry policy fails its items with the reason too; the hard
time limit records its failures where ``submit --resume`` reads them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from fluxfleet.errors import PermanentStorageError
from fluxfleet.keys import failure_key, image_key, job_spec_key, manifest_key, record_key
from fluxfleet.storage import open_storage
from tests.conftest import ROOT, s3_env
from tests.diskkit import fill, leftovers, remount, small_tmpfs, tree
from tests.faultkit import StorageProxy, check_end_state, prompts, running_fleet

pytestmark = pytest.mark.faults

FAULTS = "slow_on=SLOW,step_delay=0.5,hang_on=STUCK,fail_on=BOOM"
"""Batches with 'SLOW' in a prompt take about 2 s (time to break the storage under them); 'STUCK' hangs;
'BOOM' raises an error nothing expects."""


def _reasons(job: object) -> list[str]:
    return [f.reason for f in job.failures()]  # type: ignore[attr-defined]


def test_local_permanent_faults_fail_at_once_and_every_job_ends(tmp_path: Path, tiny_model_dir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with (
        small_tmpfs(tmp_path / "store", "4m") as store,
        running_fleet(tmp_path, tiny_model_dir, f"file://{store}", FLUXFLEET_TEST_FAULTS=FAULTS) as fleet,
    ):
        worker, client = fleet.worker, fleet.client
        storage = open_storage(client.settings.storage)

        # 10. Given a job's manifest path linked to another job's PNG,
        first = client.submit(prompts(2, "first"), preset="tiny", job_id="first")
        assert first.wait(timeout=60).state == "done"
        png = store / image_key(first.results()[0].key)
        png_bytes = png.read_bytes()
        (store / "jobs" / "second").mkdir(parents=True)
        (store / "jobs" / "second" / "manifest.jsonl").symlink_to(png)
        second = client.submit(prompts(2, "second"), preset="tiny", job_id="second")
        # the job still ends, its manifest is refused naming the link, and the PNG is unchanged.
        assert second.wait(timeout=60).state == "done"
        assert png.read_bytes() == png_bytes
        with pytest.raises(PermanentStorageError, match=r"jobs/second/manifest\.jsonl is a symbolic link"):
            second.manifest_location()
        assert "manifest could not be written" in worker.log()
        (store / "jobs" / "second" / "manifest.jsonl").unlink()
        assert second.manifest_location() == str(store / manifest_key("second"))

        # 2. Given the images directory linked outside the root, every item fails at once with the
        # reason, nothing is generated, nothing is written outside.
        (store / "images").rename(store / "images.real")
        (store / "images").symlink_to(outside)
        escape = client.submit(prompts(3, "escape"), preset="tiny", job_id="escape")
        status = escape.wait(timeout=30)
        assert (status.state, status.failed) == ("failed", 3)
        assert all("images is a symbolic link" in r for r in _reasons(escape)), _reasons(escape)
        assert client.jobs.item_starts("escape") == {}, "failed before generating"
        assert tree(outside) == {}
        (store / "images").unlink()
        (store / "images.real").rename(store / "images")

        # 2. Given the disk filling up under a running task,
        full = client.submit(prompts(4, "SLOW full"), preset="tiny", job_id="full")
        filler = fill(store)
        started = time.monotonic()
        status = full.wait(timeout=60)
        # every item fails at once with the reason (no retries), and no temporary file is left.
        assert (status.state, status.failed) == ("failed", 4)
        assert time.monotonic() - started < 20
        assert all("No space left on device (ENOSPC)" in r for r in _reasons(full)), _reasons(full)
        assert "retry 1 of" not in worker.log()
        assert leftovers(store) == []
        assert not any(storage.exists(image_key(f.key)) for f in full.failures())

        # 4. A submit while the disk is full records nothing; the same command once space is freed
        # submits the job (it used to say "already submitted ... nothing enqueued").
        prompts_file = tmp_path / "retry.txt"
        prompts_file.write_text("\n".join(prompts(2, "resubmitted")) + "\n")
        command = [str(ROOT / ".venv/bin/fluxfleet"), "submit", str(prompts_file), "--preset", "tiny"]
        command += ["--job-id", "resubmitted"]
        env = {**os.environ, **fleet.stack.env}
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert "No space left on device" in refused.stdout + refused.stderr
        assert not client.jobs.exists("resubmitted")
        filler.unlink()
        accepted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert "already submitted" not in accepted.stdout
        assert client.job("resubmitted").wait(timeout=60).state == "done"
        check_end_state(client, "resubmitted", done=2)

        # 4. A job id left 'aborted' by a submit that failed half-way may be submitted again.
        client.jobs.create(job_id="half", preset="tiny", model="x", tasks=[])
        client.jobs.set_state("half", "aborted")
        half = client.submit(prompts(2, "half"), preset="tiny", job_id="half")
        assert not half.already_submitted
        assert half.wait(timeout=60).state == "done"

        # 2. Given the file system turning read-only under a running task, the items fail at once.
        readonly = client.submit(prompts(3, "SLOW readonly"), preset="tiny", job_id="readonly")
        remount(store, "ro")
        try:
            status = readonly.wait(timeout=60)
        finally:
            remount(store, "rw")
        assert (status.state, status.failed) == ("failed", 3)
        assert all("Read-only file system (EROFS)" in r for r in _reasons(readonly)), _reasons(readonly)
        assert leftovers(store) == []

        # 2. An error nobody planned for still gives every item of the task an outcome.
        boom = client.submit(["a BOOM box", "a quiet box"], preset="tiny", job_id="boom")
        status = boom.wait(timeout=30)
        assert (status.state, status.failed) == ("failed", 2)
        assert all("RuntimeError: injected failure" in r for r in _reasons(boom)), _reasons(boom)

        # 15. The worker serves on, and what it writes is readable by the group (0666 less the umask).
        last = client.submit(prompts(2, "last"), preset="tiny", job_id="last")
        assert last.wait(timeout=60).state == "done"
        check_end_state(client, "last", done=2)
        umask = os.umask(0)
        os.umask(umask)
        record = last.results()[0]
        for key in (image_key(record.key), record_key("last", record.key), job_spec_key("last"), manifest_key("last")):
            assert stat.S_IMODE((store / key).stat().st_mode) == 0o666 & ~umask, key

        # 2. The hard time limit's failures are also in storage, so a resume after Redis lost the job
        # does not run the hung items again.
        stuck = client.submit(["a STUCK clock", "a STUCK door"], preset="tiny", job_id="stuck")
        assert stuck.wait(timeout=90).state == "failed"
        for failure in stuck.failures():
            assert storage.exists(failure_key("stuck", failure.key))
        client.jobs.r.flushall()  # Redis restarted without its data
        assert client.resume_items("stuck") == (0, 0)
        assert client.job("stuck").status().failed == 2
        assert worker.stop() == 0
    shutil.rmtree(outside)


def test_s3_permanent_faults_and_exhausted_retries_end_every_job(
    tmp_path: Path, tiny_model_dir: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    import boto3
    from moto import settings as moto_settings

    s3 = boto3.resource("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    proxy = StorageProxy(s3_endpoint)
    env = {**s3_env(proxy.url), "FLUXFLEET_STORAGE__MAX_ATTEMPTS": "1", "FLUXFLEET_TEST_FAULTS": FAULTS}
    try:
        with running_fleet(tmp_path, tiny_model_dir, f"s3://{s3_bucket}/fleet", **env) as fleet:
            worker, client = fleet.worker, fleet.client

            # 2. Given credentials the server stops accepting under a running task,
            creds = client.submit(prompts(2, "SLOW creds"), preset="tiny", job_id="creds")
            saved = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
            moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
            try:
                status = creds.wait(timeout=30)
            finally:
                moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
            # the items fail at once with the server's reason.
            assert (status.state, status.failed) == ("failed", 2)
            assert all("InvalidAccessKeyId" in r or "403" in r for r in _reasons(creds)), _reasons(creds)

            # 2. Given the bucket deleted under a running task, the same.
            gone = client.submit(prompts(2, "SLOW gone"), preset="tiny", job_id="gone")
            bucket = s3.Bucket(s3_bucket)
            bucket.objects.all().delete()
            bucket.delete()
            status = gone.wait(timeout=30)
            assert (status.state, status.failed) == ("failed", 2)
            assert all("NoSuchBucket" in r for r in _reasons(gone)), _reasons(gone)
            s3.create_bucket(Bucket=s3_bucket)

            # 2. Given image writes that fail for longer than the retry policy waits, the task is
            # retried 5 times (countdowns capped at a quarter of the 12 s visibility timeout), then
            # its items fail with the reason and the job ends.
            proxy.mode = "down"
            outage = client.submit(prompts(3, "outage"), preset="tiny", job_id="outage")
            status = outage.wait(timeout=90)
            proxy.mode = "ok"
            assert (status.state, status.failed) == ("failed", 3)
            assert all("gave up after 6 attempts over a transient fault" in r for r in _reasons(outage))
            assert "retry 5 of 5" in worker.log() and "retry 6" not in worker.log()
            storage = open_storage(client.settings.storage)
            assert all(storage.exists(failure_key("outage", f.key)) for f in outage.failures())

            # A brief 503 burst is still retried and ends well; the worker serves on.
            proxy.mode = "503"
            burst = client.submit(prompts(2, "burst"), preset="tiny", job_id="burst")
            time.sleep(1.5)
            proxy.mode = "ok"
            assert burst.wait(timeout=60).state == "done"
            check_end_state(client, "burst", done=2, started_once=False)
            digest = hashlib.sha256(storage.get(image_key(burst.results()[0].key))).hexdigest()
            assert digest == burst.results()[0].sha256
            assert worker.stop() == 0
    finally:
        proxy.close()
