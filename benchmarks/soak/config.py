"""What one soak is: its sizes, bounds and fault plan, the workers' settings, and the jobs it submits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.soak.chaos import Plan
from fluxfleet.settings import BrokerSettings, Settings, StorageSettings
from producer.client import Client

ROOT = Path(__file__).resolve().parent.parent.parent
SUBJECTS = ["a red fox", "a lighthouse", "a bowl of pears", "a sailing ship", "a snowy owl", "a stone bridge"]

FULL_PLAN = Plan(
    window_s=300.0,
    worker_kills=4,
    child_kills=10,
    redis_restarts=2,
    s3_outages=2,
    outage_s=12.0,
    bursts_503=4,
    burst_s=10.0,
    junk_bursts=4,
    disk_full=2,
    disk_full_s=10.0,
)


@dataclass
class SoakConfig:
    """Sizes, bounds and fault counts of one soak; the defaults are the full run."""

    items: int = 3000
    workers: int = 3
    file_workers: int = 1
    jobs: int = 4
    file_share: float = 0.2
    cancel_items: int = 40
    max_duration_s: float = 900.0
    seed: int = 1
    visibility_s: int = 30
    disk_mib: int = 48
    step_delay_s: float = 0.25
    """Sleep per denoising step (the fault hook's slow GPU): a 4-item task takes about a second instead of
    0.1 s, so kills land mid-task and a full-disk spell finds the file job writing."""
    plan: Plan = field(default_factory=lambda: FULL_PLAN)
    model_dir: Path = ROOT / ".cache" / "tiny-flux"


def worker_env(config: SoakConfig, broker_url: str, presets: Path) -> dict[str, str]:
    limit = config.visibility_s * 2 // 3
    return {
        "FLUXFLEET_BROKER__URL": broker_url,
        "FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S": str(config.visibility_s),
        "FLUXFLEET_BROKER__RESTORE_INTERVAL_S": "1",
        "FLUXFLEET_WORKER__TASK_TIME_LIMIT_S": str(limit),
        "FLUXFLEET_WORKER__TASK_SOFT_TIME_LIMIT_S": str(limit - 3),
        "FLUXFLEET_WORKER__DEVICE": "cpu",
        "FLUXFLEET_WORKER__WARMUP": "false",
        "FLUXFLEET_MODEL_DIR": str(config.model_dir),
        "FLUXFLEET_PRESETS_DIR": str(presets),
        "OMP_NUM_THREADS": "1",
        "FLUXFLEET_TEST_FAULTS": f"step_delay={config.step_delay_s}" if config.step_delay_s else "",
    }


def s3_settings(endpoint: str, bucket: str) -> dict[str, str]:
    return {
        "FLUXFLEET_STORAGE__URL": f"s3://{bucket}/fleet",
        "FLUXFLEET_STORAGE__ENDPOINT_URL": endpoint,
        "FLUXFLEET_STORAGE__ACCESS_KEY_ID": "testing",
        "FLUXFLEET_STORAGE__SECRET_ACCESS_KEY": "testing",
        "FLUXFLEET_STORAGE__REGION": "us-east-1",
    }


def client_for(broker_url: str, storage: dict[str, str], config: SoakConfig, presets: Path) -> Client:
    """A producer; S3 jobs' producer talks to moto directly (the proxy's faults are the workers')."""
    fields = {k.removeprefix("FLUXFLEET_STORAGE__").lower(): v for k, v in storage.items()}
    return Client(
        Settings(
            broker=BrokerSettings(url=broker_url),
            storage=StorageSettings(**fields),
            presets_dir=presets,
            model_dir=config.model_dir,
        )
    )


def job_sizes(config: SoakConfig) -> dict[str, int]:
    """Items per job id: ``config.jobs`` S3 jobs, one file-storage job, one small job to cancel."""
    on_file = round(config.items * config.file_share) if config.file_workers else 0
    on_s3 = config.items - on_file - config.cancel_items
    s3_jobs = [(f"s3-{n}", on_s3 // config.jobs + (n < on_s3 % config.jobs)) for n in range(config.jobs)]
    # The file job first, so the full-disk spell (early in the window) finds it running.
    jobs = [("disk-0", on_file), *s3_jobs[:1], ("cancel-0", config.cancel_items), *s3_jobs[1:]]
    return {job_id: size for job_id, size in jobs if size}
