"""The alert rules fire on the situations they describe: promtool's rule unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULE_TESTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules.test.yml"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
def test_alert_rules_unit_tests_pass() -> None:
    result = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
