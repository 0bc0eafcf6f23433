"""What a soak prints and writes: the machine it ran on, the invariant table, the Markdown note."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

from producer.stack import redis_server_binary


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.machine(),
    )
    redis_version = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout.split()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": next((w.split("=", 1)[1] for w in redis_version if w.startswith("v=")), "?"),
        **{name: version(name) for name in ("celery", "kombu", "redis", "moto", "boto3", "torch", "diffusers")},
    }


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The run's figures as one record (the form ``benchmarks/summarize.py`` lists for CPU benchmarks)."""
    s = result["summary"]
    return {
        "items": s["submitted"],
        "done": s["done"],
        "failed": s["failed"],
        "cancelled": s["cancelled"],
        "without_outcome": s["without_outcome"],
        "duplicates": s["duplicates"],
        "jobs_not_terminal": s["jobs_not_terminal"],
        "wall_s": s["wall_s"],
        "bound_s": result["config"]["max_duration_s"],
        "invariants_held": result["ok"],
    }


def print_report(result: dict[str, Any]) -> None:
    print(f"\nfaults injected: {result['injected']}")
    print(f"{'invariant':<48} {'observed':>10} {'expected':>10}  ok")
    for row in result["invariants"]:
        print(f"{row['invariant']:<48} {row['observed']!s:>10} {row['expected']!s:>10}  {'yes' if row['ok'] else 'NO'}")
    s, o = result["summary"], result["observed"]
    print(
        f"junk pushed {o['junk_messages_pushed']}, rejected {o['rejected_by_reason']}, dead letters "
        f"{o['dead_letter_entries']}; queues at end {o['queue_lengths_at_end']}, unacked {o['unacked_at_end']}; "
        f"S3 503s {o['s3_answered_503']}, dropped {o['s3_requests_dropped']}; manifests missing at a job's end "
        f"{s['manifests_missing_at_end']}; start refusals {len(o['worker_start_refusals'])}; "
        f"failures {s['failure_reasons']}"
    )
    print(
        f"done {s['done']} (skipped {s['skipped']}), failed {s['failed']}, cancelled {s['cancelled']}; "
        f"{result['items_per_s']} items/s; {'PASSED' if result['ok'] else 'FAILED'}"
    )


def method(result: dict[str, Any]) -> str:
    """How the run was set up, in one paragraph."""
    c, plan, m = result["config"], result["config"]["plan"], result["machine"]
    limit = c["visibility_s"] * 2 // 3
    return (
        f"{c['workers']} `tiny` workers on S3 (moto behind a loopback proxy that answers 503 during bursts) and "
        f"{c['file_workers']} `tiny-disk` worker on file storage (a {c['disk_mib']} MiB tmpfs), CPU, "
        f"{c['step_delay_s']} s of sleep per denoising step (about a second per 4-item task); {c['items']} items in "
        f"{len(result['jobs'])} jobs submitted over the first {plan['window_s'] * plan['submit_span']:g} s, faults "
        f"at seeded random times in the first {plan['window_s']:g} s; visibility timeout {c['visibility_s']} s, "
        f"time limits {limit}/{limit - 3} s. A killed worker is started again after 1 s (as a container runtime "
        f"would). Machine: {m['cpu']}, {m['cores']} cores, shared with other work; redis-server {m['redis_server']}, "
        f"celery {m['celery']}, kombu {m['kombu']}, moto {m['moto']}."
    )


def note(result: dict[str, Any], json_name: str) -> str:
    """The short Markdown note written beside the JSON."""
    s, o, m = result["summary"], result["observed"], result["machine"]
    lines = [
        f"# Chaos soak, {result['date']} ({m['cores']}-core CPU, `tiny` preset)",
        "",
        f"`python benchmarks/chaos_soak.py {result['argv']}` — raw figures in `{json_name}`.",
        "",
        method(result),
        "",
        f"Injected (seed {result['config']['seed']}): {', '.join(f'{k} ×{v}' for k, v in result['injected'].items())}"
        " (times and targets in the JSON's `faults`).",
        "",
        "| invariant | observed | expected | holds |",
        "|---|---|---|---|",
        *(
            f"| {r['invariant']} | {r['observed']} | {r['expected']} | {'yes' if r['ok'] else '**no**'} |"
            for r in result["invariants"]
        ),
        "",
        f"Outcomes: {s['done']} done ({s['skipped']} found already stored), {s['failed']} failed, "
        f"{s['cancelled']} cancelled; {result['items_per_s']} items/s; workers ready after "
        f"{result['timings_s']['workers_ready']} s. S3: {o['s3_answered_503']} requests answered 503, "
        f"{o['s3_requests_dropped']} dropped while the server was down. {o['junk_messages_pushed']} junk messages "
        f"pushed; rejected counts {o['rejected_by_reason']}, dead-letter entries {o['dead_letter_entries']}; pool "
        f"children loaded {o['pool_children_loaded']}. Manifests missing when their job ended (storage full), "
        f"written when first read: {s['manifests_missing_at_end']}. Worker starts refused while Redis or storage "
        f"was down (exit 2, restarted by the soak's supervisor): {len(o['worker_start_refusals'])}.",
    ]
    reasons = result["summary"].get("failure_reasons") or {}
    if reasons:
        lines += ["", "Failure reasons (items):", *(f"- {n} × {reason}" for reason, n in reasons.items())]
    unexpected = o["unexpected_worker_exits"]
    if unexpected:
        lines += ["", f"Workers that exited without being killed: {len(unexpected)}; the last lines of the first:"]
        lines += ["", "```", *unexpected[0]["log_tail"][-6:], "```"]
    return "\n".join(lines) + "\n"
