"""Real small file systems for storage fault tests: a tmpfs mounted under the test's directory.

Mounting needs root (CAP_SYS_ADMIN), which the test containers and CI machines have; elsewhere the
tests that need it are skipped with the reason. A full disk and a read-only file system are then the
kernel's own ENOSPC and EROFS, not an imitation.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(directory: Path) -> Path:
    """Write one file in ``directory`` until its file system has no space left; returns the file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    block = b"\0" * 65536
    try:
        while True:
            os.write(fd, block)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def remount(path: Path, mode: str) -> None:
    """``mode`` 'ro' or 'rw' for the tmpfs at ``path``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def leftovers(root: Path) -> list[str]:
    """Temporary files (``.<name>.<hex>``) anywhere under ``root``."""
    return sorted(
        str(Path(top, name).relative_to(root))
        for top, _, files in os.walk(root)
        for name in files
        if name.startswith(".")
    )


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (links not followed)."""
    found = {}
    for top, _, files in os.walk(root):
        for name in files:
            path = Path(top, name)
            if not path.is_symlink():
                found[str(path.relative_to(root))] = path.read_bytes()
    return found
