"""Storage on real file systems and a real S3 server: links, escapes, full and read-only disks, modes,
and which faults are permanent (fail the item at once) or transient (retried by the task)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxfleet import retry
from fluxfleet.errors import ConfigurationError, PermanentStorageError, StorageError
from fluxfleet.settings import BrokerSettings, StorageSettings
from fluxfleet.storage.local import LocalStorage
from fluxfleet.storage.s3 import S3Storage
from tests.conftest import ROOT, settings_for
from tests.diskkit import fill, leftovers, remount, small_tmpfs, tree
from tests.faultkit import StorageProxy

PNG_KEY = "images/ab/abcdef.png"

# Path components a hostile or careless key may hold.
COMPONENTS = st.sampled_from(["..", ".", "", "images", "ab", "x.png", "jobs", "...", "a b", "é", "\0", "~"])


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(COMPONENTS | st.text(st.characters(exclude_categories=["Cs"]), max_size=6), min_size=1, max_size=6),
    absolute=st.booleans(),
)
def test_no_key_reaches_outside_the_root(parts: list[str], absolute: bool) -> None:
    key = ("/" if absolute else "") + "/".join(parts)
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        storage = LocalStorage((base / "root").resolve())
        storage.check()
        try:
            storage.put(key, b"data", "text/plain")
        except PermanentStorageError as e:
            # Given a key with '..', '.', an empty part, a NUL or a leading '/', it is refused by name,
            assert "escapes the storage root" in str(e) or "is not a directory" in str(e)
        except StorageError as e:  # a name the file system itself refuses (too long)
            assert "cannot write" in str(e)
        else:
            # and any other key is stored under the root and read back unchanged;
            assert storage.get(key) == b"data"
        # nothing is ever written beside the root.
        assert sorted(p.name for p in base.iterdir()) == ["root"]


@pytest.mark.parametrize("link_at", ["images", "images/ab", PNG_KEY])
@pytest.mark.parametrize("target", ["outside", "inside"])
def test_links_inside_the_root_are_refused_and_never_followed(tmp_path: Path, link_at: str, target: str) -> None:
    # Given a storage root where a directory or the object itself is a link, to a directory or file
    # outside the root or to another object inside it,
    root = (tmp_path / "root").resolve()
    storage = LocalStorage(root)
    storage.put("jobs/other/victim.png", b"another job's image", "image/png")
    outside = tmp_path / "outside"
    (outside / "ab").mkdir(parents=True)
    (outside / "ab" / "abcdef.png").write_bytes(b"outside file")
    link = root / link_at
    link.parent.mkdir(parents=True, exist_ok=True)
    if target == "outside":
        destination = outside / Path(link_at).relative_to("images") if link_at != "images" else outside
    else:
        destination = root / "jobs/other/victim.png" if link_at == PNG_KEY else root / "jobs/other"
    link.symlink_to(destination)
    before_outside, before_root = tree(outside), tree(root)

    # when any operation reaches it, then it is refused with a permanent error naming the link,
    operations: dict[str, Callable[[], Any]] = {
        "put": lambda: storage.put(PNG_KEY, b"new", "image/png"),
        "put_if_absent": lambda: storage.put_if_absent(PNG_KEY, b"new", "image/png"),
        "get": lambda: storage.get(PNG_KEY),
        "exists": lambda: storage.exists(PNG_KEY),
        "digest": lambda: storage.digest(PNG_KEY),
    }
    for name, operation in operations.items():
        with pytest.raises(PermanentStorageError, match="is a symbolic link") as refused:
            operation()
        assert str(link) in str(refused.value), name
    # and neither the linked file nor anything outside the root changed; no temporary file is left.
    assert tree(outside) == before_outside
    assert tree(root) == before_root
    assert leftovers(root) == []


def test_a_manifest_path_linked_to_an_image_leaves_the_image_alone(tmp_path: Path) -> None:
    # The manifest write once overwrote another job's PNG through a link.
    root = (tmp_path / "root").resolve()
    storage = LocalStorage(root)
    storage.put_if_absent(PNG_KEY, b"the PNG of job a", "image/png")
    (root / "jobs" / "b").mkdir(parents=True)
    (root / "jobs" / "b" / "manifest.jsonl").symlink_to(root / PNG_KEY)
    with pytest.raises(PermanentStorageError, match=r"manifest\.jsonl is a symbolic link"):
        storage.put("jobs/b/manifest.jsonl", b"{}\n", "application/x-ndjson")
    assert (root / PNG_KEY).read_bytes() == b"the PNG of job a"
    assert list(storage.list("jobs/b/")) == []  # a link is not an object


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_and_directories_honour_the_umask(tmp_path: Path, umask: int) -> None:
    # Images and job.json were once 0600 (mkstemp), unreadable by the group.
    previous = os.umask(umask)
    try:
        storage = LocalStorage((tmp_path / "root").resolve())
        storage.put_if_absent(PNG_KEY, b"png", "image/png")
        storage.put("jobs/j/job.json", b"{}", "application/json")
    finally:
        os.umask(previous)
    for key in (PNG_KEY, "jobs/j/job.json"):
        assert stat.S_IMODE((storage.root / key).stat().st_mode) == 0o666 & ~umask, key
    for directory in ("images", "images/ab", "jobs/j"):
        assert stat.S_IMODE((storage.root / directory).stat().st_mode) == 0o777 & ~umask, directory


def test_full_and_read_only_file_systems_fail_for_good_and_leave_no_temporary_file(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        storage = LocalStorage(disk.resolve())
        storage.check()
        storage.put_if_absent("images/aa/small.png", b"fits", "image/png")
        # Given a full disk, a write fails at once as permanent, naming the path and the cause,
        with pytest.raises(PermanentStorageError, match=r"No space left on device \(ENOSPC\)") as full:
            storage.put_if_absent(PNG_KEY, os.urandom(512 * 1024), "image/png")
        assert str(disk / PNG_KEY) in str(full.value)
        assert retry.is_permanent(full.value)
        # and leaves no temporary file (a full disk once left 216 of them);
        assert leftovers(disk) == []
        assert not storage.exists(PNG_KEY)
        filler = fill(disk)
        with pytest.raises(PermanentStorageError, match="ENOSPC"):
            storage.put("jobs/j/manifest.jsonl", b"x" * 8192, "application/x-ndjson")
        with pytest.raises(PermanentStorageError, match="is not writable"):
            storage.check()  # a full disk still has inodes: the check writes bytes
        assert leftovers(disk) == []
        filler.unlink()
        # given a read-only file system, writes and the start-up check fail for good (EROFS),
        remount(disk, "ro")
        try:
            with pytest.raises(PermanentStorageError, match="EROFS"):
                storage.put_if_absent(PNG_KEY, b"png", "image/png")
            with pytest.raises(PermanentStorageError, match="is not writable"):
                storage.check()
            # while reads still work.
            assert storage.get("images/aa/small.png") == b"fits"
        finally:
            remount(disk, "rw")
        assert storage.put_if_absent(PNG_KEY, b"png", "image/png")


def test_the_retry_policy_is_bounded_and_sorts_faults() -> None:
    # One policy, stated bound: 6 runs of a task, at most 112 s of countdowns, far under the default
    # visibility timeout; each countdown capped at a quarter of a short one.
    assert retry.TASK_ATTEMPTS == 6 and retry.MAX_WAIT_S == 112
    assert BrokerSettings().visibility_timeout_s / 10 > retry.MAX_WAIT_S
    assert [retry.countdown(n, 3600) for n in range(retry.TASK_RETRIES)] == list(retry.TASK_COUNTDOWNS_S)
    assert [retry.countdown(n, 12) for n in range(retry.TASK_RETRIES)] == [2, 3, 3, 3, 3]
    for number in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ELOOP):
        assert retry.is_permanent(OSError(number, os.strerror(number)))
    for number in (errno.EACCES, errno.EPERM, errno.EIO, errno.ETIMEDOUT):  # a flipped mode comes back
        assert not retry.is_permanent(OSError(number, os.strerror(number)))
    assert retry.is_permanent(PermanentStorageError("x")) and not retry.is_permanent(StorageError("x"))


def test_s3_faults_are_sorted_into_permanent_and_transient(s3_endpoint: str, s3_bucket: str) -> None:
    from moto import settings as moto_settings

    def s3(bucket: str, endpoint: str = s3_endpoint) -> S3Storage:
        url = f"s3://{bucket}/fleet"
        return S3Storage.from_settings(
            StorageSettings(url=url, endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing")
        )

    storage = s3(s3_bucket)
    assert storage.put_if_absent(PNG_KEY, b"png", "image/png")
    # A bucket that does not exist: permanent, at the start-up check and on a write.
    missing = s3("fluxfleet-no-such-bucket")
    with pytest.raises(PermanentStorageError, match="does not exist"):
        missing.check()
    with pytest.raises(PermanentStorageError, match="NoSuchBucket"):
        missing.put_if_absent(PNG_KEY, b"png", "image/png")
    # Credentials the server does not know: permanent (moto checks them once auth is on).
    saved = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        with pytest.raises(PermanentStorageError, match="InvalidAccessKeyId"):
            storage.put_if_absent("images/cd/other.png", b"png", "image/png")
        with pytest.raises(PermanentStorageError, match="403"):
            storage.exists(PNG_KEY)
    finally:
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
    # Throttling (503 SlowDown) and dropped connections: transient, left to the task's retries.
    proxy = StorageProxy(s3_endpoint)
    try:
        throttled = S3Storage.from_settings(
            StorageSettings(
                url=f"s3://{s3_bucket}/fleet",
                endpoint_url=proxy.url,
                access_key_id="testing",
                secret_access_key="testing",
                max_attempts=1,
            )
        )
        for mode, cause in (("503", "SlowDown"), ("down", "failed")):
            proxy.mode = mode
            with pytest.raises(StorageError, match=cause) as transient:
                throttled.put_if_absent("images/ef/x.png", b"png", "image/png")
            assert not retry.is_permanent(transient.value), mode
        proxy.mode = "ok"
        assert throttled.put_if_absent("images/ef/x.png", b"png", "image/png")
    finally:
        proxy.close()


def test_an_empty_tls_ca_file_setting_is_unset(tmp_path: Path) -> None:
    # FLUXFLEET_BROKER__TLS_CA_FILE="" once became Path("") == "." ("Is a directory").
    env = {"FLUXFLEET_BROKER__URL": "rediss://127.0.0.1:1/0", "FLUXFLEET_BROKER__TLS_CA_FILE": ""}
    broker = settings_for(env).broker
    assert broker.tls_ca_file is None
    assert broker.tls_options() == {"ssl_cert_reqs": "required"}
    # A CA file that is a directory is refused with a sentence naming the setting.
    with pytest.raises(ConfigurationError, match=r"FLUXFLEET_BROKER__TLS_CA_FILE .* is not a file"):
        settings_for({**env, "FLUXFLEET_BROKER__TLS_CA_FILE": str(tmp_path)}).broker.tls_options()
    # And a real command with the empty setting gets as far as the (absent) server.
    result = subprocess.run(
        [str(ROOT / ".venv/bin/fluxfleet"), "status", "some-job"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Is a directory" not in output, output[-2000:]
