"""The producer side runs without torch: importing it must not import torch."""

from __future__ import annotations

import subprocess
import sys


def test_producer_and_contract_do_not_import_torch() -> None:
    code = (
        "import sys, producer, producer.cli, producer.client, producer.stack, fluxfleet.jobs, "
        "fluxfleet.storage.local, fluxfleet.storage.s3, fluxfleet.celery_config, fluxfleet.manifest; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'workers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
