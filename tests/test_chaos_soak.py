"""The chaos soak of ``benchmarks/chaos_soak.py`` at a small scale (one and a half to two minutes): the same
code and invariants as the full run, with every fault kind injected at least once while jobs are in progress."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.chaos_soak import SoakConfig, run_soak
from benchmarks.soak.chaos import Plan

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0, reason="the full-disk spell mounts a tmpfs"),
]

FAULT_KINDS = {
    "worker_kill",
    "child_kill",
    "redis_restart",
    "s3_outage",
    "s3_503_burst",
    "junk_messages",
    "disk_full",
}


@pytest.mark.timeout(280)
def test_small_chaos_soak_loses_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Given 3 tiny workers on S3 (behind a proxy that throttles) and 1 on a small tmpfs, 300 items over
    # 6 jobs submitted over the first 36 s, and every kind of fault inside the first 60 s:
    plan = Plan(window_s=60, worker_kills=1, child_kills=3, bursts_503=2, junk_bursts=2, outage_s=6, disk_full_s=6)
    config = SoakConfig(
        items=300,
        workers=3,
        file_workers=1,
        cancel_items=20,
        # The plan's last fault comes by 57 s (0.95 of the window), and the slowest recovery it plans is a
        # task in flight when Redis restarts (by 42 s): unacknowledged, Redis delivers it again after the
        # 30 s visibility timeout, so every job ends by about 80 s. On a 2-core machine the wall time was
        # 53-63 s, alone or beside 2-4 busy loops taking most of the CPU: it follows the fault plan and the
        # visibility timeout, not the CPU. A run that reaches this bound has lost a task, not run slowly.
        max_duration_s=150,
        seed=7,
        plan=plan,
        model_dir=tiny_model_dir,
    )
    result = run_soak(config, tmp_path)
    observed = result["observed"]

    # then every fault was injected,
    assert set(result["injected"]) == FAULT_KINDS, result["faults"]
    assert observed["pool_child_kills"] >= 1 and observed["worker_kills"] >= 1
    assert observed["s3_answered_503"] > 0
    # and every invariant holds: each item has an outcome, each stored object was written once and has a
    # record, each manifest matches its records, every job is terminal, no worker exited on its own, and
    # all of it within the bound.
    broken = [row for row in result["invariants"] if not row["ok"]]
    (tmp_path / "result.json").write_text(json.dumps(result, indent=2))  # the whole run, for a failure
    exits = observed["unexpected_worker_exits"]
    assert not broken, {
        "broken": broken,
        # A worker's own last log lines say why it exited; messages left say where a task was lost.
        "unexpected_exits": [(e["worker"], e["exit_code"], e["log_tail"][-3:]) for e in exits],
        "queues_at_end": observed["queue_lengths_at_end"],
        "unacked_at_end": observed["unacked_at_end"],
        "jobs": result["jobs"],
        "failures": result["summary"]["failure_reasons"],
    }
    summary = result["summary"]
    assert summary["submitted"] == summary["with_outcome"] == 300
    assert summary["cancelled"] > 0, "the cancelled job's queued items were cancelled"
    # Junk was refused and counted (an invariant row), and the dead-letter list kept every message of it.
    assert observed["dead_letter_entries"] == observed["junk_messages_pushed"] > 0
