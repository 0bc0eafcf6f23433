"""Hook points the engine calls as work happens; metrics (and tests) implement them.

The base class does nothing, so the engine runs the same with or without an exporter.
"""

from __future__ import annotations


class Observer:
    def stage(self, stage: str, seconds: float, images: int = 1) -> None:
        """A stage finished: 'queue_wait', 'text_encoding', 'denoising', 'vae_decode', 'png_encode', 'upload'."""

    def denoising_steps(self, steps: int, seconds: float) -> None:
        """``steps`` denoising steps (summed over the batch) took ``seconds``."""

    def steps_reused(self, steps: int) -> None:
        """A cache policy reused ``steps`` denoising steps (summed over the batch) instead of computing them."""

    def item_done(self, seconds_end_to_end: float, skipped: bool) -> None:
        """An item was stored (or found already stored when ``skipped``)."""

    def item_failed(self, reason: str) -> None:
        """An item failed for good; ``reason`` is a short label such as 'invalid' or 'attempts'."""

    def task_retry(self, reason: str) -> None:
        """A task will be retried; ``reason`` is a short label such as 'storage' or 'oom'."""

    def generation_memory(self) -> None:
        """After each pipeline call: a chance to read device memory counters."""
