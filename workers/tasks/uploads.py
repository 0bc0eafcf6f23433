"""Images handed to background threads (PNG encoding and upload) while the next pipeline call runs."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Uploads:
    """A thread pool that keeps what it was handed until someone waits for it."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="upload")
        self.in_flight: list[Future[bool]] = []

    def submit(self, store: Callable[..., bool], *args: Any) -> None:
        """Run ``store(*args)`` on a thread; it returns False when the item was refused and failed."""
        self.in_flight.append(self.pool.submit(store, *args))

    def drain(self) -> int:
        """Wait for every upload handed out; returns how many were refused, or raises the first error
        once all have ended. An interruption of the wait itself (Celery's soft limit) propagates at
        once and leaves the rest here, for the next ``drain``."""
        error: BaseException | None = None
        refused = 0
        while self.in_flight:
            future = self.in_flight[0]
            failed = future.exception()  # waits
            self.in_flight.pop(0)
            if failed is not None:
                error = error or failed
            elif not future.result():
                refused += 1
        if error is not None:
            raise error
        return refused

    def shutdown(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait)
