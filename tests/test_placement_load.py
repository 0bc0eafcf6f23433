"""What ``from_pretrained`` is told at load time for each placement (workers/pipeline/placement.py)."""

from __future__ import annotations

import pytest

from fluxfleet.planner import Placement
from workers.pipeline.placement import load_kwargs


@pytest.mark.parametrize(
    "policy, device, expected",
    [
        ("gpu", "cuda", {"device_map": "cuda"}),  # straight onto the worker's GPU, no host copy first
        ("gpu", "cuda:1", {}),  # diffusers takes only the bare device type: load, then move
        ("gpu", "cpu", {}),
        ("balanced", "cuda", {"device_map": "balanced"}),
        ("model_offload", "cuda", {}),  # offload hooks need the components on the CPU first
        ("group_offload", "cuda", {}),
        ("cpu", "cpu", {}),
    ],
)
def test_load_kwargs(policy: str, device: str, expected: dict) -> None:
    assert load_kwargs(Placement(policy=policy), device) == expected  # type: ignore[arg-type]
