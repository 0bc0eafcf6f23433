"""Settings from the environment, as a sloppy or hostile operator sets them: every ``FLUXFLEET_*`` value is
kept or refused with the variable's name; a misspelt name is refused, not ignored; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxfleet.errors import ConfigurationError
from fluxfleet.settings import NOT_SETTINGS, Settings, setting_names
from tests.conftest import ROOT

NESTED = [name for name in setting_names() if "__" in name]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("FLUXFLEET_"):
            monkeypatch.delenv(name)
    return monkeypatch


def value_of(settings_: Settings, name: str) -> object:
    section, field = name.removeprefix("FLUXFLEET_").lower().split("__")
    return getattr(getattr(settings_, section), field)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(NESTED),
    text=st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=40),
)
def test_any_value_is_kept_or_refused_by_name(clean_env: pytest.MonkeyPatch, name: str, text: str) -> None:
    # Given any text in any setting
    clean_env.setenv(name, text)
    # When the settings are read, they load, or the error names that variable
    try:
        loaded = Settings()
    except ConfigurationError as e:
        assert name in str(e)
        if any(word in name for word in ("PASSWORD", "SECRET", "KEY_ID")) and len(text) > 3:
            assert text not in str(e), "a secret's value was repeated in the error"
        return
    finally:
        clean_env.delenv(name)
    value = value_of(loaded, name)
    if isinstance(value, str):
        assert value == text  # a text setting keeps the text exactly


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("FLUXFLEET_LIMITS__MAX_ITEMS_PER_JOB", "FLUXFLEET_LIMITS__MAX_IMAGES_PER_JOB"),
        ("FLUXFLEET_BROKER__PASWORD", "FLUXFLEET_BROKER__PASSWORD"),
        ("FLUXFLEET_WORKER__TASK_TIME_LIMIT", "FLUXFLEET_WORKER__TASK_TIME_LIMIT_S"),
        ("FLUXFLEET_STORAGE_URL", "FLUXFLEET_STORAGE__URL"),
    ],
)
def test_a_misspelt_setting_is_refused_with_the_right_name(
    clean_env: pytest.MonkeyPatch, name: str, suggestion: str
) -> None:
    clean_env.setenv(name, "5")
    with pytest.raises(ConfigurationError) as e:
        Settings()
    assert name in str(e.value)
    assert f"did you mean {suggestion}?" in str(e.value)


def test_names_unlike_any_setting_pass(clean_env: pytest.MonkeyPatch) -> None:
    # What Kubernetes injects for a Service named `fluxfleet`, and the variables read outside the settings
    for name in ("FLUXFLEET_PORT", "FLUXFLEET_SERVICE_HOST", "FLUXFLEET_PORT_9090_TCP_ADDR", *NOT_SETTINGS):
        clean_env.setenv(name, "10.0.0.1")
    assert Settings().broker.url.startswith("redis://")


@pytest.mark.parametrize("command", [["presets"], ["plan", "--preset", "tiny"], ["status", "job1"], ["top", "--once"]])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FLUXFLEET_WORKER__TASK_TIME_LIMIT_S", "abc"),
        ("FLUXFLEET_LIMITS__MAX_SIZE", "1e400"),
        ("FLUXFLEET_BROKER", "{"),
    ],
)
def test_commands_refuse_bad_settings_in_one_sentence(command: list[str], name: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXFLEET_")}
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", *command],
        cwd=ROOT,
        env={**env, name: value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FLUXFLEET_" in lines[0], lines
