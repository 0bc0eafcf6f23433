"""The example environment file lists every setting, and every line in it is a real setting."""

from __future__ import annotations

import re
from pathlib import Path

from fluxfleet.envfile import env_lines

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "fluxfleet.env.example"
VARIABLE = re.compile(r"^#? ?(FLUXFLEET_[A-Z0-9_]+)=")


def variables(lines: list[str]) -> set[str]:
    return {m.group(1) for line in lines if (m := VARIABLE.match(line))}


def test_example_env_file_is_complete_and_current() -> None:
    expected = list(env_lines())
    assert variables(EXAMPLE.read_text().splitlines()) == variables(expected)
    assert "FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S" in variables(expected)
    assert "FLUXFLEET_WORKER__TASK_TIME_LIMIT_S" in variables(expected)
