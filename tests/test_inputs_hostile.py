"""Hostile prompts files and preset names: every value is kept exactly or refused with file:line:field.

Each test here is one way input used to be silently changed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxfleet.errors import InputFileError, UnknownPresetError, ValidationError
from fluxfleet.presets import load_preset, preset_names
from fluxfleet.schema import GenerationParams, Item, TaskPayload
from fluxfleet.settings import GenerationDefaults, LimitSettings, Settings
from producer.batching import build_items
from producer.inputs import PromptSpec, read_prompts
from workers.tasks.png import encode_png, parameters_text

ROOT = Path(__file__).resolve().parent.parent
PRESETS = Settings().presets_dir


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode())  # as written: no newline translation
    return path


def items_for(specs: list[PromptSpec], **kwargs: object) -> list[Item]:
    defaults = GenerationDefaults(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=512)
    preset = load_preset("tiny", PRESETS)
    return build_items(specs, preset=preset, model="m", defaults=defaults, limits=LimitSettings(), **kwargs)  # type: ignore[arg-type]


def refused(path: Path) -> InputFileError:
    with pytest.raises(InputFileError) as error:
        read_prompts(path)
    return error.value


# -- text survives -----------------------------------------------------------------------------


def test_a_quoted_newline_in_a_csv_prompt_is_kept_and_lines_are_counted_from_the_record_start(tmp_path: Path) -> None:
    # Given a CSV whose second record spans three lines, and a bad width in the record after it
    path = write(tmp_path, "p.csv", 'prompt,width\r\n"one",64\r\n"two\nlines\r\nhere, ""quoted""",64\r\nthree,65\r\n')
    # When it is read, the multi-line prompt (lines 3-5) is whole and the next record is named by its line (6)
    specs = read_prompts(path)
    assert [s.prompt for s in specs] == ["one", 'two\nlines\r\nhere, "quoted"', "three"]
    assert [s.source for s in specs] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    with pytest.raises(ValidationError) as error:
        items_for(specs)
    assert error.value.where == f"{path}:6" and error.value.field == "width"


@pytest.mark.parametrize("name", ["p.txt", "p.csv", "p.jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path: Path, name: str) -> None:
    body = {"p.txt": "a fox\n", "p.csv": "prompt,seed\na fox,7\n", "p.jsonl": '{"prompt": "a fox", "seed": 7}\n'}[name]
    path = write(tmp_path, name, "\ufeff" + body)
    plain = write(tmp_path, "plain-" + name, body)
    assert read_prompts(path)[0].prompt == "a fox"
    assert [i.key for i in items_for(read_prompts(path))] == [i.key for i in items_for(read_prompts(plain))]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"])
def test_unicode_line_separators_stay_inside_a_txt_prompt(tmp_path: Path, separator: str) -> None:
    # str.splitlines() splits at every one of these; a .txt line ends at \n or \r\n only.
    path = write(tmp_path, "p.txt", f"left{separator}right\r\nsecond\n")
    specs = read_prompts(path)
    assert [s.prompt for s in specs] == [f"left{separator}right", "second"]
    assert specs[1].source == f"{path}:2"


@pytest.mark.parametrize("separator", ["\u2028", "\x85", "\x0c"])
def test_unicode_line_separators_stay_inside_jsonl_and_csv_prompts(tmp_path: Path, separator: str) -> None:
    prompt = f"a{separator}b"
    jsonl = write(tmp_path, "p.jsonl", json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n" + '{"prompt": "c"}\n')
    csv_file = write(tmp_path, "p.csv", f"prompt\n{prompt}\nc\n")
    for path in (jsonl, csv_file):
        specs = read_prompts(path)
        assert [s.prompt for s in specs] == [prompt, "c"]
        assert specs[1].source.endswith(":2" if path == jsonl else ":3")


def test_a_lone_carriage_return_in_a_txt_line_is_refused(tmp_path: Path) -> None:
    # An old-Mac file would otherwise be one long prompt made of every line.
    error = refused(write(tmp_path, "p.txt", "first\nsecond\rthird\n"))
    assert error.where.endswith("p.txt:2") and error.field == "prompt" and "carriage return" in str(error)


# -- numbers are exact or refused ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [9007199254740993, 2**63 - 1, 2**63, 2**64 - 1])
@pytest.mark.parametrize("name", ["p.csv", "p.jsonl"])
def test_explicit_seeds_are_kept_exactly(tmp_path: Path, name: str, seed: int) -> None:
    body = f"prompt,seed\na fox,{seed}\n" if name == "p.csv" else f'{{"prompt": "a fox", "seed": {seed}}}\n'
    [item] = items_for(read_prompts(write(tmp_path, name, body)))
    assert item.seed == seed
    # and they survive the message: the worker's schema takes what the producer made
    assert Item.model_validate_json(item.model_dump_json()).seed == seed


def test_seeds_outside_the_generators_range_are_refused(tmp_path: Path) -> None:
    for seed, count in ((2**64, 1), (-1, 1), (2**64 - 1, 2)):
        path = write(tmp_path, "p.jsonl", f'{{"prompt": "a fox", "seed": {seed}, "images_per_prompt": {count}}}\n')
        with pytest.raises(ValidationError) as error:
            items_for(read_prompts(path))
        assert error.value.where == f"{path}:1" and error.value.field == "seed", error.value


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("inf", "width"),
        ("1e400", "width"),
        ("-inf", "steps"),
        ("nan", "height"),
        ("1" * 5000, "width"),
        ("1e400", "guidance"),
        ("nan", "guidance"),
        ("64.5", "width"),
        ("true", "steps"),
    ],
)
def test_non_finite_huge_fractional_and_boolean_numbers_are_refused_in_csv(
    tmp_path: Path, value: str, field: str
) -> None:
    error = refused(write(tmp_path, "p.csv", f"prompt,{field}\nok,64\nbad,{value}\n"))
    assert error.where.endswith("p.csv:3") and error.field == field


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("true", "width"),
        ("false", "steps"),
        ("NaN", "guidance"),
        ("Infinity", "width"),
        ("1e400", "width"),
        ("1" * 5000, "seed"),
        ("64.5", "width"),
        ("[64]", "width"),
        ('{"a": 1}', "height"),
    ],
)
def test_non_numbers_and_booleans_are_refused_in_jsonl(tmp_path: Path, value: str, field: str) -> None:
    error = refused(write(tmp_path, "p.jsonl", f'{{"prompt": "ok"}}\n{{"prompt": "bad", "{field}": {value}}}\n'))
    assert error.where.endswith("p.jsonl:2"), error
    assert error.field in (field, ""), error  # a JSON parse error names the line only


def test_whole_numbers_written_as_decimals_are_kept_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "seed": 9007199254740993.0, "width": 64.0, "steps": "4"}\n')
    [spec] = read_prompts(path)
    assert spec.overrides == {"seed": 9007199254740993, "width": 64, "steps": 4}
    assert all(type(v) is int for v in spec.overrides.values())


def test_repeated_keys_and_columns_are_refused_not_overwritten(tmp_path: Path) -> None:
    cases = {
        "a.jsonl": ('{"prompt": "a", "steps": 4, "steps": 50}\n', "steps"),
        "b.jsonl": ('{"prompt": "a", "steps": 4, "num_inference_steps": 50}\n', "steps"),
        "c.csv": ("prompt,seed,seed\na,1,2\n", ""),
        "d.csv": ("prompt,guidance,guidance_scale\na,1,2\n", "guidance"),
    }
    for name, (body, field) in cases.items():
        error = refused(write(tmp_path, name, body))
        assert error.field == field and ":" in error.where, error


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "p.txt", b"fine\nalso fine\nbad \xff byte\n"))
    assert error.where.endswith("p.txt:3") and "not UTF-8" in str(error)


# -- NUL and lone surrogates ----------------------------------------------------------------------


def test_a_nul_in_a_prompt_is_refused_at_submit(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{"prompt": "a\\u0000b"}\n')
    specs = read_prompts(path)  # the reader keeps it exactly ...
    assert specs[1].prompt == "a\x00b"
    with pytest.raises(ValidationError) as error:  # ... and the item check refuses it, naming the line
        items_for(specs)
    assert error.value.where == f"{path}:2" and error.value.field == "prompt" and "NUL" in str(error.value)


def test_a_lone_surrogate_is_refused_not_a_unicode_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "a\\ud800b"}\n')
    with pytest.raises(ValidationError) as error:
        items_for(read_prompts(path))
    assert error.value.where == f"{path}:1" and error.value.field == "prompt" and "surrogate" in str(error.value)


def test_the_png_parameters_chunk_keeps_the_prompt_whole_or_refuses() -> None:
    params = GenerationParams(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=64)
    prompt = 'a\u2028b\x0cc, "d" \u00e9 \U0001f98a'
    item = Item(index=0, prompt=prompt, seed=2**64 - 1, params=params, key="0" * 40, source="p.csv:2")
    data, _ = encode_png(Image.new("RGB", (8, 8)), item, "tiny", "m")
    import io

    text = Image.open(io.BytesIO(data)).text["parameters"]  # type: ignore[attr-defined]
    assert text.startswith(prompt + "\n") and "Seed: 18446744073709551615" in text
    with pytest.raises(ValidationError, match="NUL"):
        parameters_text(item.model_copy(update={"prompt": "a\x00b"}), "tiny", "m")


# -- the schema refuses what the readers refuse ------------------------------------------------------


@pytest.mark.parametrize("bad", [{"width": True}, {"steps": "4"}, {"guidance": float("inf")}, {"height": 64.5}])
def test_generation_params_are_strict(bad: dict[str, Any]) -> None:
    good: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "guidance": 3.5, "max_sequence_length": 64}
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        GenerationParams(**{**good, **bad})


# -- preset names are names -----------------------------------------------------------------


def test_a_preset_path_is_refused_with_the_known_presets(tmp_path: Path) -> None:
    # Given a preset file outside the presets directory that a relative name reaches
    evil = tmp_path / "evil.toml"
    evil.write_text((PRESETS / "tiny.toml").read_text())
    name = os.path.relpath(evil, PRESETS).removesuffix(".toml")
    assert (PRESETS / f"{name}.toml").resolve() == evil.resolve()
    for attempt in (name, "../tiny", "tiny/../tiny", "/tmp/evil", "Tiny", "tiny\n", ""):
        with pytest.raises(UnknownPresetError) as error:
            load_preset(attempt, PRESETS)
        assert "known presets:" in str(error.value) and "tiny" in error.value.known


def test_a_preset_file_cannot_name_itself_a_path(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text('model = "m"\nname = "../evil"\n')
    (tmp_path / "Bad.toml").write_text('model = "m"\n')
    with pytest.raises(Exception, match="not a preset name"):
        load_preset("good", tmp_path)
    assert preset_names(tmp_path) == ["good"]  # a file whose stem is no name is not listed


def test_a_task_naming_a_preset_path_is_refused_by_the_schema() -> None:
    payload = {"job_id": "j", "task_id": "t", "preset": "../../tmp/evil", "model": "m", "items": [], "enqueued_at": 0}
    with pytest.raises((ValueError, ValidationError)):
        TaskPayload.model_validate(payload)


def test_the_worker_refuses_a_preset_path(tmp_path: Path) -> None:
    evil = tmp_path / "evil.toml"
    evil.write_text((PRESETS / "tiny.toml").read_text())
    name = os.path.relpath(evil, PRESETS).removesuffix(".toml")
    env = {
        **os.environ,
        "FLUXFLEET_BROKER__URL": "redis://127.0.0.1:1/0",
        "FLUXFLEET_STORAGE__URL": f"file://{tmp_path}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "workers.main", "--preset", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "worker refuses to start: unknown preset" in result.stderr and "Traceback" not in result.stderr


def test_manifest_lines_with_unicode_line_separators_read_back(tmp_path: Path) -> None:
    # JSON keeps U+2028 and U+0085 raw; a reader splitting the manifest with splitlines() cut the line there.
    from fluxfleet.keys import manifest_key
    from fluxfleet.manifest import manifest_text
    from fluxfleet.schema import ItemRecord, Timings
    from fluxfleet.storage import open_storage
    from producer.cli_observe import _records

    params = GenerationParams(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=64)
    records = [
        ItemRecord(
            job_id="j",
            index=i,
            key=f"{i:040x}",
            image_key="images/x.png",
            location="x",
            prompt=prompt,
            seed=2**64 - 1,
            params=params,
            preset="tiny",
            model="m",
            worker="w",
            gpu="0",
            timings=Timings(),
            sha256="0" * 64,
            finished_at=0.0,
        )
        for i, prompt in enumerate(["a\u2028b", "c\x85d\x0ce", "f\r\ng"])
    ]
    (tmp_path / "store").mkdir()
    settings = Settings().with_overrides(
        storage__url=f"file://{tmp_path / 'store'}", broker__url="redis://127.0.0.1:1/0"
    )
    open_storage(settings.storage).put(manifest_key("j"), manifest_text(records).encode(), "application/x-ndjson")
    assert [r.prompt for r in _records(settings, "j")[0]] == ["a\u2028b", "c\x85d\x0ce", "f\r\ng"]


def test_the_generators_seed_range_is_the_one_accepted() -> None:
    torch = pytest.importorskip("torch")
    from fluxfleet.schema import SEED_LIMIT

    assert torch.Generator("cpu").manual_seed(SEED_LIMIT - 1).initial_seed() == SEED_LIMIT - 1
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator("cpu").manual_seed(SEED_LIMIT)


def test_hostile_text_and_edge_seeds_survive_a_real_worker(shared_stack: Any, tmp_path: Path) -> None:
    # Given a CSV with a quoted multi-line prompt, separators str.splitlines() knows, quotes and a BOM, and
    # seeds past 2^53 and 2^63
    prompts = ['two\nlines, "quoted"', "a\u2028b\x85c\x0cd \U0001f98a", "plain"]
    seeds = [2**64 - 1, 9007199254740993, 2**63 - 1]
    path = tmp_path / "hostile.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "seed"])
        writer.writerows(zip(prompts, seeds, strict=True))
    # When it runs through Redis, a tiny worker and storage
    job = shared_stack.client().submit(path, preset="tiny")
    assert job.wait(timeout=180).state == "done"
    # Then the records, the manifest and each PNG's parameters chunk carry the prompt and the seed exactly
    records = job.results()
    assert [(r.prompt, r.seed) for r in records] == list(zip(prompts, seeds, strict=True))
    manifest = (shared_stack.storage_root / f"jobs/{job.id}/manifest.jsonl").read_text(encoding="utf-8")
    assert [json.loads(line)["prompt"] for line in manifest.split("\n") if line] == prompts
    for record in records:
        with Image.open(record.location) as image:
            assert image.info["parameters"].startswith(record.prompt + "\n")
            assert f"Seed: {record.seed}," in image.info["parameters"]
