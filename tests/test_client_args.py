"""``Client.submit`` refuses what it cannot take exactly, by name and place, before Redis sees anything:
unknown keywords, a file name passed as a str, no prompts, values of the wrong type."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from fluxfleet.errors import ValidationError
from fluxfleet.settings import Settings
from producer.client import Client
from producer.inputs import PromptSpec
from producer.stack import RedisServer


@pytest.fixture
def client(tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path) -> Client:
    (tmp_path / "store").mkdir()
    settings = Settings(model_dir=tiny_model_dir).with_overrides(
        broker__url=redis_server.url, storage__url=f"file://{tmp_path / 'store'}"
    )
    return Client(settings)


def nothing_written(redis_server: RedisServer) -> bool:
    return redis.Redis(port=redis_server.port).dbsize() == 0


def submitted_items(client: Client, job_id: str) -> list[Any]:
    return sorted((i for t in client.jobs.task_payloads(job_id) for i in t.items), key=lambda i: i.index)


def test_unknown_keywords_are_refused_by_name(client: Client, redis_server: RedisServer) -> None:
    with pytest.raises(ValidationError) as error:
        client.submit(["a cat"], preset="tiny", num_inference_step=50, colour="red")
    assert error.value.field == "num_inference_step"
    assert "unknown keyword argument(s) 'num_inference_step', 'colour'" in str(error.value)
    assert nothing_written(redis_server)


def test_diffusers_names_are_accepted_as_aliases(client: Client) -> None:
    job = client.submit(["a cat"], preset="tiny", num_inference_steps=6, guidance_scale=2, width=64, height=64)
    [item] = submitted_items(client, job.id)
    assert item.params.steps == 6 and item.params.guidance == 2.0 and type(item.params.guidance) is float


def test_a_field_given_twice_is_refused(client: Client, redis_server: RedisServer) -> None:
    with pytest.raises(ValidationError) as error:
        client.submit(["a cat"], preset="tiny", steps=4, num_inference_steps=50)
    assert error.value.field == "steps" and "both" in str(error.value)
    assert nothing_written(redis_server)


def test_a_str_naming_a_prompts_file_is_refused(client: Client, redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\n")
    for text in (str(path), "missing-prompts.csv", " batch.jsonl "):
        with pytest.raises(ValidationError) as error:
            client.submit(text, preset="tiny")
        assert "pass Path(" in str(error.value) and error.value.field == "prompts"
    assert nothing_written(redis_server)
    # The file as a Path is read; the name inside a list is a prompt.
    assert [i.prompt for i in submitted_items(client, client.submit(path, preset="tiny").id)] == ["a cat", "a dog"]
    job = client.submit([str(path)], preset="tiny")
    assert [i.prompt for i in submitted_items(client, job.id)] == [str(path)]
    # A sentence that merely ends like a file name, with no such file, is a prompt.
    job = client.submit("a poem about notes.txt", preset="tiny")
    assert [i.prompt for i in submitted_items(client, job.id)] == ["a poem about notes.txt"]


@pytest.mark.parametrize("prompts", [[], (), iter([]), (p for p in "")])
def test_no_prompts_is_refused(client: Client, redis_server: RedisServer, prompts: Any) -> None:
    with pytest.raises(ValidationError, match="no prompts"):
        client.submit(prompts, preset="tiny")
    assert nothing_written(redis_server)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "where", "field"),
    [
        ([{"prompt": "a", "width": "wide"}], {}, "prompt 1", "width"),
        (["ok", {"prompt": "b", "width": 64.5}], {}, "prompt 2", "width"),
        (["ok", "ok", {"prompt": "c", "steps": True}], {}, "prompt 3", "steps"),
        ([{"prompt": "a", "guidance": float("nan")}], {}, "prompt 1", "guidance"),
        ([{"prompt": "a", "seed": 2**64}], {}, "prompt 1", "seed"),
        ([{"prompt": "a", "seed": -1}], {}, "prompt 1", "seed"),
        ([{"prompt": "a", "colour": "red"}], {}, "prompt 1", "colour"),
        ([{"prompt": 5}], {}, "prompt 1", "prompt"),
        ([{"width": 64}], {}, "prompt 1", "prompt"),
        (["ok", 5], {}, "prompt 2", "prompt"),
        (["ok", None], {}, "prompt 2", "prompt"),
        ([PromptSpec("a", {"steps": "many"})], {}, "prompt 1", "steps"),
        ([PromptSpec(b"a")], {}, "prompt 1", "prompt"),  # type: ignore[arg-type]
        (["a\x00b"], {}, "prompt 1", "prompt"),
        (["ok"], {"width": 64.5}, "Client.submit", "width"),
        (["ok"], {"width": "64px"}, "Client.submit", "width"),
        (["ok"], {"steps": True}, "Client.submit", "steps"),
        (["ok"], {"guidance": float("inf")}, "Client.submit", "guidance"),
        (["ok"], {"seed": True}, "Client.submit", "seed"),
        (["ok"], {"seed": -5}, "Client.submit", "seed"),
        (["ok"], {"images_per_prompt": 1.5}, "Client.submit", "images_per_prompt"),
        (["ok"], {"job_id": 5}, "Client.submit", "job_id"),
        (["ok"], {"job_id": "../x"}, "", "job_id"),
        (["ok"], {"preset": None}, "Client.submit", "preset"),
        (None, {}, "Client.submit", "prompts"),
        (42, {}, "Client.submit", "prompts"),
        (b"a cat", {}, "Client.submit", "prompts"),
        ({"prompt": "a cat"}, {}, "Client.submit", "prompts"),
    ],
)
def test_bad_values_are_refused_with_their_place_and_field(
    client: Client, redis_server: RedisServer, prompts: Any, kwargs: dict[str, Any], where: str, field: str
) -> None:
    with pytest.raises(ValidationError) as error:
        client.submit(prompts, **{"preset": "tiny", **kwargs})
    assert (error.value.where, error.value.field) == (where, field), error.value
    assert str(error.value).startswith(f"{where}: " if where else "") and "\n" not in str(error.value)
    assert nothing_written(redis_server)


def test_numbers_of_other_types_are_kept_exactly(client: Client) -> None:
    job = client.submit(
        [{"prompt": "a", "seed": Decimal("18446744073709551615"), "width": 64.0}, {"prompt": "b", "seed": 2**63 - 1}],
        preset="tiny",
        height="64",
        seed=2**64 - 1,
    )
    items = submitted_items(client, job.id)
    assert [i.seed for i in items] == [2**64 - 1, 2**63 - 1]
    assert all(type(i.params.width) is int and i.params.width == 64 and i.params.height == 64 for i in items)


def test_none_keeps_the_defaults(client: Client) -> None:
    from fluxfleet.keys import derive_seed

    job = client.submit(["a cat"], preset="tiny", seed=None, images_per_prompt=None, width=None, steps=None)
    [item] = submitted_items(client, job.id)
    assert item.seed == derive_seed(0, 0, 0) and item.params.width == 64 and item.params.steps == 4
