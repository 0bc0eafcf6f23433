"""Bad input is refused in the producer, naming the file, line and field, with nothing enqueued."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from fluxfleet.errors import BrokerUnavailable, InputFileError, UnknownPresetError, ValidationError
from fluxfleet.settings import Settings
from producer.client import Client
from producer.inputs import read_prompts
from producer.stack import RedisServer, free_port


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.txt", "", "no prompts in file"),
        (
            "p.jsonl",
            '{"prompt": "ok"}\n{"prompt": "x", "steps": "many"}\n',
            "p.jsonl:2: 'many' is not a valid int (field 'steps')",
        ),
        ("p.jsonl", '{"prompt": "ok"}\n{bad json\n', "p.jsonl:2: invalid JSON"),
        ("p.jsonl", '["a list"]\n', "p.jsonl:1: each line must be a JSON object"),
        ("p.csv", "text,seed\nhello,1\n", "p.csv:1: the header must have a 'prompt' column"),
        ("p.csv", "prompt,seed\nhello,1\nworld,1.5\n", "p.csv:3: '1.5' is not a valid int (field 'seed')"),
        ("p.csv", "prompt,colour\nhello,red\n", "p.csv:2: unknown column 'colour'"),
        ("p.yaml", "prompt: x\n", "unsupported prompts file type '.yaml'"),
    ],
)
def test_malformed_files_name_the_line(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputFileError) as error:
        read_prompts(path)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"prompt": "   "}', "prompt"),
        ('{"prompt": "ok", "width": 100}', "width"),
        ('{"prompt": "ok", "height": 4096}', "height"),
        ('{"prompt": "ok", "steps": 0}', "steps"),
        ('{"prompt": "ok", "guidance": -1}', "guidance"),
        ('{"prompt": "' + "word " * 300 + '"}', "prompt"),
        ('{"prompt": "ok", "images_per_prompt": 99}', "images_per_prompt"),
    ],
)
def test_out_of_range_items_are_refused_before_anything_is_enqueued(
    tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path, line: str, field: str
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a fine first line"}\n' + line + "\n")
    settings = Settings(model_dir=tiny_model_dir).with_overrides(broker__url=redis_server.url)
    with pytest.raises(ValidationError) as error:
        Client(settings).submit(path, preset="tiny")
    assert f"{path}:2" in str(error.value) and error.value.field == field
    assert redis.Redis(port=redis_server.port).dbsize() == 0


def test_cli_reports_bad_input_and_exits_non_zero(
    tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,width\na cat,64\na dog,65\n")
    env = {"FLUXFLEET_BROKER__URL": redis_server.url, "FLUXFLEET_MODEL_DIR": str(tiny_model_dir)}
    result = cli("submit", str(path), "--preset", "tiny", env=env)
    assert result.returncode == 1
    assert "prompts.csv:3" in result.stderr and "width 65 is not a multiple of 16" in result.stderr
    assert redis.Redis(port=redis_server.port).dbsize() == 0


def test_unknown_preset_lists_the_known_ones(tiny_model_dir: Path) -> None:
    with pytest.raises(UnknownPresetError) as error:
        Client(Settings(model_dir=tiny_model_dir)).submit(["a cat"], preset="no-such-preset")
    assert "known presets:" in str(error.value) and "tiny" in str(error.value)


def test_redis_down_at_submit_fails_fast(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {
        "FLUXFLEET_BROKER__URL": f"redis://127.0.0.1:{free_port()}/0",
        "FLUXFLEET_MODEL_DIR": str(tiny_model_dir),
        "FLUXFLEET_STORAGE__URL": f"file://{tmp_path / 'store'}",
    }
    started = time.monotonic()
    result = cli("submit", str(Path(__file__).parent.parent / "examples" / "prompts.txt"), "--preset", "tiny", env=env)
    assert time.monotonic() - started < 20
    assert result.returncode == 1 and "cannot reach Redis" in result.stderr
    assert not (tmp_path / "store").exists()

    settings = Settings(model_dir=tiny_model_dir).with_overrides(broker__url=env["FLUXFLEET_BROKER__URL"])
    with pytest.raises(BrokerUnavailable):
        Client(settings).submit(["a cat"], preset="tiny")
