"""LoRA adapters at submit: how they are written, what a file must hold, which presets run them, and the refusals
``Client.submit`` gives (with the file, line and field) before anything reaches Redis. Keys and grouping by
adapter set. The worker's side is in tests/test_adapters_worker.py."""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxfleet.adapters import (
    AdapterFileError,
    AdapterSpec,
    parse_adapters,
    preset_refusal,
    read_header,
    storage_key,
)
from fluxfleet.errors import ValidationError
from fluxfleet.presets import load_preset
from fluxfleet.settings import GenerationDefaults, LimitSettings, Settings, StorageSettings
from producer.batching import build_items, split_tasks
from producer.client import Client
from producer.inputs import PromptSpec, read_prompts
from producer.stack import RedisServer

PRESETS = Settings().presets_dir
TINY = load_preset("tiny", PRESETS)
DEFAULTS = GenerationDefaults(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=64)


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of zeros with these (dtype, shape) tensors, written by hand: no torch here."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


LORA = {
    "transformer.proj_out.lora_A.weight": ("F32", [4, 8]),
    "transformer.proj_out.lora_B.weight": ("F32", [8, 4]),
}


def lora_bytes(rank: int = 4, prefix: str = "transformer.transformer_blocks.0.attn.to_q") -> bytes:
    return safetensors_bytes(
        {f"{prefix}.lora_A.weight": ("F32", [rank, 32]), f"{prefix}.lora_B.weight": ("F32", [32, rank])}
    )


# -- how adapters are written ---------------------------------------------------------------------------------
def test_compact_text_json_objects_and_specs_read_the_same() -> None:
    expected = (AdapterSpec("ink.safetensors", 0.8), AdapterSpec("s3://b/brand.safetensors", 1.0))
    assert parse_adapters(" ink.safetensors@0.8 ; s3://b/brand.safetensors ") == expected
    assert (
        parse_adapters([{"source": "ink.safetensors", "scale": 0.8}, {"source": "s3://b/brand.safetensors"}])
        == expected
    )
    assert parse_adapters(["ink.safetensors@0.8", "s3://b/brand.safetensors@1"]) == expected
    assert parse_adapters(expected) == expected
    assert parse_adapters("") == () and parse_adapters([]) == ()
    assert parse_adapters("a@b.safetensors@-0") == (AdapterSpec("a@b.safetensors", 0.0),)  # the last '@' splits


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("a@1; b@1; c@1; d@1; e@1", "5 adapters, over the limit of 4"),
        ("a@4.5", "outside -4..4"),
        ("a@-inf", "is not a number"),
        ("a@nan", "is not a number"),
        ("a@0x1", "is not a number"),
        ("a@", "is not a number"),
        ("@1", "non-empty text"),
        ([{"source": "a", "scale": True}], "is not a number"),
        ([{"source": "a", "weight": 1}], "'weight'"),
        ([{"scale": 1}], "needs a 'source'"),
        ("a@1; a@0.5", "given twice"),
        ("a\x07b@1", "control character"),
        (7, "must be a list"),
        ([3], "must be a {source, scale} object"),
    ],
)
def test_malformed_adapters_are_refused_with_the_reason(value: Any, why: str) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_adapters(value, where="p.jsonl:3")
    assert (refused.value.where, refused.value.field) == ("p.jsonl:3", "adapters") and why in str(refused.value)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_parses_or_is_refused_by_field(text: str) -> None:
    try:
        adapters = parse_adapters(text, where="x:1")
    except ValidationError as e:
        assert e.field == "adapters"
        return
    assert len(adapters) <= 4 and all(-4 <= a.scale <= 4 for a in adapters)


# -- what a file must hold ------------------------------------------------------------------------------------
def header(data: bytes) -> Any:
    return read_header(io.BytesIO(data), len(data))


def test_header_gives_the_largest_rank_of_every_key_style() -> None:
    assert header(lora_bytes(rank=8)).rank == 8
    kohya = safetensors_bytes(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": ("BF16", [16, 32]),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": ("BF16", [96, 16]),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": ("F32", []),
        }
    )
    assert header(kohya).rank == 16
    peft = safetensors_bytes(
        {"single_transformer_blocks.0.proj_out.lora.down.weight": ("F16", [2, 8]), "x.lora.up.weight": ("F16", [8, 2])}
    )
    assert header(peft).rank == 2


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01\x02", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 10**9) + b"{}", "header claims"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (safetensors_bytes({"transformer.x.weight": ("F32", [4, 4])}), "no LoRA weights for the FLUX transformer"),
        (lora_bytes(prefix="text_encoder.text_model.encoder.layers.0.q_proj"), "no LoRA weights"),
        (
            lora_bytes(prefix="lora_unet_down_blocks_0_attentions_0_proj_in"),
            "name other modules, such as 'lora_unet_down",
        ),
        (lora_bytes()[:-8], "lies outside the file"),
        (
            safetensors_bytes({**LORA, "transformer.transformer_blocks.0.attn.norm_q.weight": ("F32", [8])}),
            "a full weight rather than a LoRA matrix",
        ),
        (safetensors_bytes({"a.lora_A.weight": ("Q9", [2, 2]), "a.lora_B.weight": ("F32", [2, 2])}), "unknown dtype"),
        (safetensors_bytes({"a.lora_A.weight": ("F32", [4]), "a.lora_B.weight": ("F32", [2, 2])}), "not a matrix"),
    ],
)
def test_files_that_are_not_flux_loras_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(AdapterFileError, match=why):
        header(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda b: struct.pack("<Q", len(b)) + b)))
def test_hostile_bytes_are_refused_never_crash(data: bytes) -> None:
    with contextlib.suppress(AdapterFileError):
        header(data)


def test_s3_sources_must_lie_in_the_jobs_storage() -> None:
    assert storage_key("s3://bkt/pre/styles/ink.safetensors", "bkt", "pre") == "styles/ink.safetensors"
    for source, bucket, why in [
        ("s3://other/pre/ink.safetensors", "bkt", "not in the job's bucket"),
        ("s3://bkt/elsewhere/ink.safetensors", "bkt", "not under the job's storage prefix"),
        ("s3://bkt/pre/../secret", "bkt", "does not name an object"),
        ("s3://bkt/pre/ink.safetensors", None, "storage is not S3"),
    ]:
        with pytest.raises(AdapterFileError, match=why):
            storage_key(source, bucket, "pre")


def test_presets_that_cannot_run_lora_say_why() -> None:
    assert preset_refusal(TINY) is None and preset_refusal(load_preset("bf16", PRESETS)) is None
    assert "float8 ones that peft cannot wrap" in (preset_refusal(load_preset("fast", PRESETS)) or "")
    for name in ("bnb-nf4", "gguf-q8-0", "torchao-int8wo", "quanto-int8", "fp8-layerwise"):
        assert "not verified" in (preset_refusal(load_preset(name, PRESETS)) or ""), name


def test_a_worker_refuses_what_a_message_claims_beyond_the_limits() -> None:
    from fluxfleet.adapters import check_adapters
    from fluxfleet.schema import AdapterRef

    refs = [AdapterRef(source=f"/a{i}", sha256=f"{i}" * 64, scale=1.0) for i in range(5)]
    for adapters, preset, why in [
        (refs, TINY, "5 adapters"),
        ([refs[0].model_copy(update={"scale": 7.5})], TINY, "outside -4..4"),
        (refs[:1], load_preset("fast", PRESETS), "peft cannot wrap"),
    ]:
        with pytest.raises(ValidationError, match=why) as refused:
            check_adapters(adapters, preset, where="p:1")
        assert refused.value.field == "adapters"
    check_adapters(refs[:4], TINY)


# -- keys and grouping ----------------------------------------------------------------------------------------
SHA_A, SHA_B = "a" * 64, "b" * 64
RESOLVED = {"a.safetensors": ("/abs/a.safetensors", SHA_A), "b.safetensors": ("/abs/b.safetensors", SHA_B)}


def items_for(overrides: list[dict[str, Any]]) -> list[Any]:
    specs = [PromptSpec("a fox", o, f"p:{i + 1}") for i, o in enumerate(overrides)]
    return build_items(
        specs, preset=TINY, model="m", defaults=DEFAULTS, limits=LimitSettings(), resolved_adapters=RESOLVED
    )


def test_keys_hash_each_adapters_content_and_scale_and_tasks_group_by_adapter_set() -> None:
    written: list[dict[str, Any]] = [
        {"seed": 1},
        {"seed": 1, "adapters": ""},
        {"seed": 1, "adapters": "a.safetensors@0.8"},
        {"seed": 1, "adapters": "a.safetensors@1"},
        {"seed": 1, "adapters": "b.safetensors@0.8"},
        {"seed": 1, "adapters": "a.safetensors@0.8; b.safetensors@1"},
        {"seed": 2, "adapters": [{"source": "a.safetensors", "scale": 0.8}]},
    ]
    items = items_for(written)
    assert items[0].key == items[1].key and not items[0].params.adapters
    assert len({i.key for i in items}) == len(items) - 1
    assert items[2].params.adapters[0].model_dump() == {"source": "/abs/a.safetensors", "sha256": SHA_A, "scale": 0.8}
    groups = [sorted(i.index for i in t.items) for t in split_tasks(items, job_id="j", preset=TINY, model="m")]
    assert sorted(groups) == [[0, 1], [2, 6], [3], [4], [5]]
    # One content under two names (a copy): refused, as the same source twice is.
    with pytest.raises(ValidationError, match="are the same file") as refused:
        build_items(
            [PromptSpec("a fox", {"adapters": "a.safetensors@0.5; copy.safetensors"}, "p:9")],
            preset=TINY,
            model="m",
            defaults=DEFAULTS,
            limits=LimitSettings(),
            resolved_adapters={**RESOLVED, "copy.safetensors": ("/abs/copy.safetensors", SHA_A)},
        )
    assert (refused.value.where, refused.value.field) == ("p:9", "adapters")


def test_the_job_default_applies_to_items_without_their_own() -> None:
    specs = [
        PromptSpec("a", {}, "p:1"),
        PromptSpec("b", {"adapters": []}, "p:2"),
        PromptSpec("c", {"adapters": "b.safetensors"}, "p:3"),
    ]
    items = build_items(
        specs,
        preset=TINY,
        model="m",
        defaults=DEFAULTS,
        limits=LimitSettings(),
        adapters=parse_adapters("a.safetensors@0.5"),
        resolved_adapters=RESOLVED,
    )
    assert [[a.sha256[0] for a in i.params.adapters] for i in items] == [["a"], [], ["b"]]


# -- refusals at submit ---------------------------------------------------------------------------------------
@pytest.fixture
def submitter(tmp_path: Path) -> Any:
    """A Client on a real Redis and local storage, and a check that a refused submit left Redis empty."""
    server = RedisServer(directory=tmp_path / "redis").start()
    presets = tmp_path / "presets"
    presets.mkdir()
    for name in ("tiny", "fast", "bnb-nf4"):
        (presets / f"{name}.toml").write_text((PRESETS / f"{name}.toml").read_text())
    (presets / "tiny-r4.toml").write_text((PRESETS / "tiny.toml").read_text() + "\n[adapters]\nmax_rank = 4\n")
    client = Client(
        Settings(
            presets_dir=presets,
            model_dir=tmp_path,
            broker={"url": server.url},
            storage=StorageSettings(url=f"file://{tmp_path / 'store'}"),
        )
    )

    def refused(prompts: Any, preset: str = "tiny", **params: Any) -> ValidationError:
        with pytest.raises(ValidationError) as caught:
            client.submit(prompts, preset=preset, **params)
        assert client.jobs.r.dbsize() == 0, "a refused submit left records in Redis"
        return caught.value

    yield refused
    server.stop()


def jsonl(path: Path, *adapters: Any) -> Path:
    lines = [{"prompt": "a fox"}] + [{"prompt": f"fox {i}", "adapters": a} for i, a in enumerate(adapters)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_every_bad_adapter_is_refused_at_submit_with_its_line_and_field(submitter: Any, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(lora_bytes(rank=8))
    (tmp_path / "notes.txt").write_text("not a LoRA at all, just some words" * 3)
    (tmp_path / "plain.safetensors").write_bytes(safetensors_bytes({"transformer.x.weight": ("F32", [2, 2])}))
    prompts = tmp_path / "p.jsonl"
    cases = [
        (str(tmp_path / "missing.safetensors"), "tiny", "no such file"),
        (str(tmp_path / "notes.txt"), "tiny", "not a safetensors file"),
        (str(tmp_path / "plain.safetensors"), "tiny", "no LoRA weights"),
        (f"{good}@1.5", "tiny-r4", "rank 8, over the preset's [adapters] max_rank of 4"),
        (f"{good}@9", "tiny", "outside -4..4"),
        ("; ".join(f"{good}{i}@1" for i in range(5)), "tiny", "5 adapters"),
        ([{"source": str(good), "scale": 0.5}], "fast", "float8 ones that peft cannot wrap"),
        (str(good), "bnb-nf4", "not verified by fluxfleet's tests"),
        ("someone/some-style", "tiny", "Hugging Face hub id"),
        ("s3://bucket/ink.safetensors", "tiny", "the job's storage is not S3"),
    ]
    for value, preset, why in cases:
        error = submitter(jsonl(prompts, value), preset=preset)
        assert (error.where, error.field) == (f"{prompts}:2", "adapters"), (value, error)
        assert why in str(error), (value, str(error))
    # The job default, and a CSV's compact text.
    error = submitter(["a fox"], adapters=str(tmp_path / "missing.safetensors"))
    assert (error.where, error.field) == ("Client.submit", "adapters") and "no such file" in str(error)
    csv_file = tmp_path / "p.csv"
    csv_file.write_text(f'prompt,adapters\na fox,\nan owl,"{good}@0.5; {good}@-5"\n')
    error = submitter(csv_file)
    assert (error.where, error.field) == (f"{csv_file}:3", "adapters") and "outside -4..4" in str(error)


def test_s3_adapters_are_read_and_hashed_through_the_jobs_storage(s3_endpoint: str, s3_bucket: str) -> None:
    import hashlib

    from fluxfleet.storage import open_storage
    from producer.adapters import resolve_adapters

    settings = Settings(storage=StorageSettings(url=f"s3://{s3_bucket}/fleet", endpoint_url=s3_endpoint))
    storage = open_storage(settings.storage)
    data = lora_bytes(rank=16)
    storage.put("loras/ink.safetensors", data, "application/octet-stream")
    storage.put("loras/notes.safetensors", b"just text, no header here", "application/octet-stream")
    source = f"s3://{s3_bucket}/fleet/loras/ink.safetensors"
    specs = [PromptSpec("a", {"adapters": f"{source}@0.5"}, "p.jsonl:1")]
    job_adapters, resolved = resolve_adapters(specs, {}, TINY, settings, lambda: storage)
    assert job_adapters == () and resolved == {source: (source, hashlib.sha256(data).hexdigest())}
    for name, why in [("gone", "no such object in the job's storage"), ("notes", "not a safetensors file")]:
        bad = [PromptSpec("a", {"adapters": source.replace("ink", name)}, "p.jsonl:2")]
        with pytest.raises(ValidationError, match=why) as refused:
            resolve_adapters(bad, {}, TINY, settings, lambda: storage)
        assert (refused.value.where, refused.value.field) == ("p.jsonl:2", "adapters")
    with pytest.raises(ValidationError, match="not in the job's bucket") as refused:
        resolve_adapters(
            [], {"adapters": parse_adapters("s3://elsewhere/fleet/x.safetensors")}, TINY, settings, lambda: storage
        )
    assert refused.value.where == "Client.submit"


def test_a_prompt_file_reads_adapters_as_specs(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "p.jsonl", "x.safetensors@0.25", [{"source": "y.safetensors"}])
    specs = read_prompts(path)
    assert specs[1].overrides["adapters"] == (AdapterSpec("x.safetensors", 0.25),)
    assert specs[2].overrides["adapters"] == (AdapterSpec("y.safetensors", 1.0),)


def test_the_command_line_takes_repeated_adapters_and_refuses_in_one_sentence(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    good = tmp_path / "good.safetensors"
    good.write_bytes(lora_bytes())
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    server = RedisServer(directory=tmp_path / "redis").start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXFLEET_")}
        env |= {"FLUXFLEET_BROKER__URL": server.url, "FLUXFLEET_STORAGE__URL": f"file://{tmp_path / 'store'}"}
        env |= {"FLUXFLEET_MODEL_DIR": str(tmp_path)}
        for adapters, why in [
            ([f"{good}@0.5", str(tmp_path / "gone.safetensors")], "no such file"),
            ([f"{good}@0.5", f"{good}@2"], "given twice"),
        ]:
            flags = [arg for source in adapters for arg in ("--adapter", source)]
            command = [sys.executable, "-m", "producer.cli", "submit", str(prompts), "--preset", "tiny", *flags]
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            (line,) = proc.stderr.strip().splitlines()
            assert line.startswith("error: Client.submit: ") and why in line and line.endswith("(field 'adapters')")
        assert keys_in_redis(server.url) == 0
    finally:
        server.stop()


def keys_in_redis(url: str) -> int:
    import redis

    return int(redis.Redis.from_url(url).dbsize())
