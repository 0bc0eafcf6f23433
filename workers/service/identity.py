"""A worker's name: its preset, its GPU(s) and its host, as Celery, the metrics and the logs show it."""

from __future__ import annotations

import socket

from fluxfleet.presets import Preset


def worker_name(preset: Preset, gpu: str) -> str:
    return f"{preset.name}-gpu{gpu.replace(',', '_')}@{socket.gethostname()}"
