"""The one retry policy: which faults are retried, where, how often, and when an item fails instead.

Where: only the task. A transient fault (``TransientError``, or an ``OSError`` that is not permanent)
that escapes a task's run sends the task back to the queue after a countdown; on the next attempt its
stored items are skipped, so only the unstored ones run again. Nothing else in fluxfleet loops on a
failure: the engine does not repeat a write and the storage backends make one call per operation.
(Inside one S3 call, boto3's standard retry mode resends a request that was throttled, got a 5xx or
no answer, up to ``FLUXFLEET_STORAGE__MAX_ATTEMPTS`` times: that is the SDK's transport, not a
fluxfleet layer, and it never resends an authentication or missing-bucket error.)

Bound: a task runs at most ``TASK_ATTEMPTS`` (6) times, with the ``TASK_COUNTDOWNS_S`` between runs:
at most ``MAX_WAIT_S`` (112 s) of waiting in all. Each countdown is also capped at a quarter of the
visibility timeout, because a retry waits unacknowledged in worker memory and Redis would deliver it a
second time past that timeout (3600 s by default, so the cap only bites in tests). When the attempts
run out, every item of the task without an outcome fails with the last error as its reason, and the
job finishes: no item is left without an outcome.

Permanent faults are never retried: the item fails at once with the reason. They are
``PermanentStorageError`` (raised by the storage backends: a key or link leading out of the root,
access denied, no such bucket) and the ``OSError`` numbers in ``PERMANENT_ERRNOS`` (no space, quota,
read-only file system, a link or a file where a directory was expected, a file too large).
A permission error (EACCES, EPERM) is retried: a directory's mode flipped for a moment comes back.
"""

from __future__ import annotations

import errno

from fluxfleet.errors import PermanentStorageError, StorageError

TASK_COUNTDOWNS_S: tuple[float, ...] = (2.0, 5.0, 15.0, 30.0, 60.0)
"""Seconds before the 2nd, 3rd, ... run of a task that hit a transient fault."""

TASK_RETRIES = len(TASK_COUNTDOWNS_S)
"""Retries of one task (Celery's ``max_retries``; its own default of 3 would cut this schedule)."""

TASK_ATTEMPTS = TASK_RETRIES + 1
"""Runs of one task at most: the first and its retries."""

MAX_WAIT_S = sum(TASK_COUNTDOWNS_S)
"""Seconds of countdowns at most before the items of a task fail (112 s)."""

PERMANENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ELOOP, errno.EFBIG, errno.ENOTDIR, errno.EISDIR}
)
"""File system errors that retrying cannot fix until someone acts."""


def countdown(retries_done: int, visibility_timeout_s: float) -> float:
    """Seconds before the next run of a task that has been retried ``retries_done`` times."""
    return min(TASK_COUNTDOWNS_S[retries_done], visibility_timeout_s / 4)


def is_permanent(error: BaseException) -> bool:
    """Whether ``error`` should fail the item at once instead of being retried."""
    if isinstance(error, PermanentStorageError):
        return True
    return isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS


def storage_error(message: str, error: OSError) -> StorageError | PermanentStorageError:
    """``message`` with the OS's reason, as a permanent or a transient storage error."""
    name = errno.errorcode.get(error.errno or 0, "")
    text = f"{message}: {error.strerror or error}" + (f" ({name})" if name else "")
    if error.errno in PERMANENT_ERRNOS:
        return PermanentStorageError(text)
    return StorageError(text)


def gave_up_reason(error: BaseException, attempts: int) -> str:
    """The failure reason of an item whose task ran out of attempts on a transient fault."""
    return f"gave up after {attempts} attempts over a transient fault (fluxfleet.retry): {error}"
