"""Image-to-image items: reading and checking inputs at submit (every refusal with file:line:field, nothing
enqueued), keys, default sizes and grouping; the worker's img2img pipeline on the tiny model (strength at its
ends, stage timing, an input changed after submit); and one job through a real worker.

Real things only: a redis-server, an HTTP server on loopback (tests/imagekit.py), moto's S3 server, the tiny
random-weight pipeline, a real Celery worker.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fluxfleet.caching import parse_policy, schedule
from fluxfleet.errors import ValidationError
from fluxfleet.input_images import as_strength, default_size, denoising_steps, parse_source, source_kind
from fluxfleet.keys import manifest_key
from fluxfleet.presets import effective_defaults, load_preset
from fluxfleet.settings import LimitSettings, Settings
from producer.batching import build_items, split_tasks
from producer.client import Client
from producer.input_images import read_input_images
from producer.inputs import PromptSpec, read_prompts
from producer.stack import RedisServer
from tests.conftest import SharedStack, base_env, s3_env, settings_for
from tests.enginekit import run_task
from tests.imagekit import SLOW, ImageServer, bomb_png, png_bytes, solid_png

PRESET = load_preset("tiny", Settings().presets_dir)
LIMITS = LimitSettings()


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer() as running:
        yield running


def submit_settings(redis_server: RedisServer, tmp_path: Path, tiny_model_dir: Path, **env: str) -> Settings:
    return settings_for(
        {**base_env(tiny_model_dir, f"file://{tmp_path / 'store'}"), "FLUXFLEET_BROKER__URL": redis_server.url, **env}
    )


def items_of(
    specs: list[PromptSpec], job: dict[str, Any] | None = None, storage: Any = None, model: str = "m"
) -> list[Any]:
    """Items as ``Client.submit`` builds them, without Redis: inputs read, then ``build_items``."""
    read, job_params = read_input_images(specs, job or {}, storage=lambda: storage, limits=LIMITS)
    defaults = effective_defaults(PRESET, Settings()).model_copy(update=job_params)
    return build_items(read, preset=PRESET, model=model, defaults=defaults, limits=LIMITS, job_seed=1)


# -- strength --------------------------------------------------------------------------------------------------
class _Schedule:
    """Just enough of a pipeline for diffusers' own ``get_timesteps``."""

    def __init__(self, steps: int) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.scheduler.set_timesteps(steps)


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 28, 50])
@pytest.mark.parametrize("strength", [1e-12, 0.01, 0.2, 0.25, 0.6, 0.99, 1.0])
def test_the_steps_an_img2img_call_runs_are_diffusers_own(steps: int, strength: float) -> None:
    from diffusers import FluxImg2ImgPipeline

    _timesteps, expected = FluxImg2ImgPipeline.get_timesteps(_Schedule(steps), steps, strength, "cpu")
    assert denoising_steps(steps, strength) == expected


def test_strength_zero_is_refused_because_diffusers_would_run_no_step() -> None:
    # diffusers raises for a call of no step ("the number of pipeline steps is 0"); fluxfleet refuses at submit.
    with pytest.raises(ValidationError, match="strength 0 would keep the input image as it is") as error:
        as_strength("0", where="p.csv:3")
    assert (error.value.where, error.value.field) == ("p.csv:3", "strength")
    for bad in ("1.5", -0.1, True, "nan", "high"):
        with pytest.raises(ValidationError) as error:
            as_strength(bad, where="p.csv:3")
        assert error.value.field == "strength"
    assert as_strength("0.25") == 0.25 and as_strength(1) == 1.0


# -- sources ---------------------------------------------------------------------------------------------------
HOSTILE_PIECES = st.sampled_from(
    ["file://", "FILE:", "ftp://", "gopher://", "data:", "javascript:", "jar:", "s3://", "http://", "https://",
     "HTTP://", "//", "../", "..", "/", "~", "\\", "%00", "%2e%2e/", "\x00", "\n", "\r", "\u202e", "\ufeff",
     "@", ":", "#", "?", " ", "127.0.0.1", "[::1]", ":0", ":99999", "\U0001f98a", "a" * 300]
)  # fmt: skip
HOSTILE_SOURCE = st.lists(st.one_of(HOSTILE_PIECES, st.text(max_size=6)), min_size=1, max_size=6).map("".join)


@settings(max_examples=300, deadline=None, database=None)
@given(source=HOSTILE_SOURCE)
def test_any_written_source_is_kept_as_one_of_three_kinds_or_refused_as_the_image_field(source: str) -> None:
    try:
        parsed = parse_source(source, where="p.jsonl:4")
    except ValidationError as e:
        assert (e.where, e.field) == ("p.jsonl:4", "image") and len(str(e).splitlines()) == 1
        return
    kind = source_kind(parsed)
    scheme = parsed.split(":", 1)[0].lower()
    assert kind == {"s3": "s3", "http": "http", "https": "http"}.get(scheme, "local")
    assert parsed.isprintable() and "\x00" not in parsed


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.one_of(HOSTILE_PIECES, st.text(max_size=4)), max_size=4).map("".join))
def test_hostile_urls_on_a_real_server_are_read_or_refused_with_their_place(server: ImageServer, path: str) -> None:
    image = server.serve("/cat.png", png_bytes(32, 32))
    server.serve("/to-file", b"", status=302, Location="file:///etc/passwd")
    url = server.base + "/" + path
    try:
        (item,) = items_of([PromptSpec("a cat", {"image": url}, "p.jsonl:4")])
    except ValidationError as e:
        assert (e.where, e.field) == ("p.jsonl:4", "image"), e
        return
    # Only a URL that reaches the image is read (the server answers 404 for every other path).
    assert item.params.image is not None and item.params.image.sha256 == hashlib.sha256(png_bytes(32, 32)).hexdigest()
    assert url.split("#")[0].split("?")[0] == image or url.startswith(image)


def refusal_cases(tmp_path: Path, server: ImageServer) -> dict[str, tuple[Any, str, str]]:
    """name -> (line 2's fields besides the prompt, the field refused, words of the sentence)."""
    (tmp_path / "text.png").write_bytes(b"just some text, not an image")
    (tmp_path / "large.png").write_bytes(bomb_png(5000, 5000))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "ok.png").write_bytes(solid_png(64, 64))
    (tmp_path / "bomb.png").write_bytes(bomb_png(50_000, 50_000))
    (tmp_path / "big.png").write_bytes(png_bytes(64, 64))
    return {
        "missing file": ({"image": str(tmp_path / "nope.png")}, "image", "no such file"),
        "a directory": ({"image": str(tmp_path)}, "image", "is a directory"),
        "a named pipe": ({"image": str(tmp_path / "pipe.png")}, "image", "is not a regular file"),
        "not an image": ({"image": str(tmp_path / "text.png")}, "image", "not an image Pillow can decode"),
        "too many pixels": ({"image": str(tmp_path / "large.png")}, "image", "5000x5000 pixels, over the limit of"),
        "a bomb's header": ({"image": str(tmp_path / "bomb.png")}, "image", "over the limit of 16777216 pixels"),
        "over the byte limit": ({"image": str(tmp_path / "big.png")}, "image", "over the limit of 4000 bytes"),
        "file url": ({"image": "file:///etc/passwd"}, "image", "the URL scheme 'file:' is not read"),
        "ftp url": ({"image": "ftp://127.0.0.1/x.png"}, "image", "the URL scheme 'ftp:' is not read"),
        "404": ({"image": server.base + "/gone.png"}, "image", "answered HTTP 404"),
        "http non-image": ({"image": server.serve("/page", b"<html>hello</html>")}, "image", "not an image"),
        "huge declared body": ({"image": server.serve("/huge", b"x" * 5000)}, "image", "is 5000 bytes, over the limit"),
        "huge undeclared body": (
            {"image": server.serve("/stream", b"x" * 50_000, Content_Length="omit")},
            "image",
            "over the limit of 4000 bytes",
        ),
        "redirect to file://": (
            {"image": server.serve("/to-file", b"", status=302, Location="file:///etc/passwd")},
            "image",
            "redirects to a 'file:' URL",
        ),
        "a server that never finishes": ({"image": server.serve("/slow", SLOW)}, "image", "took over 1 s"),
        "s3 without s3 storage": ({"image": "s3://some-bucket/cat.png"}, "image", "the job's storage is not"),
        "strength without image": ({"strength": 0.5}, "strength", "without an image"),
        "a hook cache policy": (
            {"image": str(tmp_path / "ok.png"), "cache": "fbcache"},
            "cache",
            "cannot run on image-to-image items",
        ),
        "strength 0": ({"image": str(tmp_path / "big.png"), "strength": 0}, "strength", "strength 0 would keep"),
        "strength over 1": ({"image": str(tmp_path / "big.png"), "strength": 1.5}, "strength", "outside 0..1"),
    }


CASES = [
    "missing file", "a directory", "a named pipe", "not an image", "too many pixels", "a bomb's header",
    "over the byte limit", "file url", "ftp url", "404", "http non-image", "huge declared body",
    "huge undeclared body", "redirect to file://", "a server that never finishes", "s3 without s3 storage",
    "strength without image", "a hook cache policy", "strength 0", "strength over 1",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_every_refusal_names_file_line_and_field_and_enqueues_nothing(
    case: str, redis_server: RedisServer, tmp_path: Path, tiny_model_dir: Path, server: ImageServer
) -> None:
    fields, field, words = refusal_cases(tmp_path, server)[case]
    prompts = tmp_path / "restyle.jsonl"
    lines = [{"prompt": "a lighthouse"}, {"prompt": "a lighthouse, in ink", **fields}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    limits = {"FLUXFLEET_LIMITS__MAX_INPUT_IMAGE_BYTES": "4000", "FLUXFLEET_LIMITS__INPUT_IMAGE_TIMEOUT_S": "1"}
    client = Client(submit_settings(redis_server, tmp_path, tiny_model_dir, **limits))

    with pytest.raises(ValidationError) as error:
        client.submit(prompts, preset="tiny")

    assert (error.value.where, error.value.field) == (f"{prompts}:2", field), error.value
    assert words in str(error.value) and len(str(error.value).splitlines()) == 1
    assert redis.Redis(port=redis_server.port).dbsize() == 0  # nothing recorded, nothing enqueued


def test_job_strength_without_any_image_is_refused_at_submit(
    redis_server: RedisServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    client = Client(submit_settings(redis_server, tmp_path, tiny_model_dir))
    with pytest.raises(ValidationError, match="no item has an image") as error:
        client.submit(["a lighthouse"], preset="tiny", strength=0.5)
    assert (error.value.where, error.value.field) == ("Client.submit", "strength")
    assert redis.Redis(port=redis_server.port).dbsize() == 0


# -- keys, sizes, grouping ---------------------------------------------------------------------------------------
def test_keys_hash_the_content_and_strength_not_the_source(
    tmp_path: Path, server: ImageServer, s3_endpoint: str, s3_bucket: str
) -> None:
    import boto3

    from fluxfleet.storage import open_storage

    cat, dog = png_bytes(96, 64, seed=1), png_bytes(96, 64, seed=2)
    (tmp_path / "cat.png").write_bytes(cat)
    (tmp_path / "dog.png").write_bytes(dog)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key="inputs/cat.png", Body=cat
    )
    storage = open_storage(
        settings_for({**s3_env(s3_endpoint), "FLUXFLEET_STORAGE__URL": f"s3://{s3_bucket}/x"}).storage
    )
    sources = [str(tmp_path / "cat.png"), server.serve("/cat.png", cat), f"s3://{s3_bucket}/inputs/cat.png"]
    specs = [PromptSpec("a cat", {"image": s, "seed": 7}, f"p:{i}") for i, s in enumerate(sources)]
    specs += [
        PromptSpec("a cat", {"image": str(tmp_path / "cat.png"), "strength": 0.3, "seed": 7}, "p:3"),
        PromptSpec("a cat", {"image": str(tmp_path / "dog.png"), "seed": 7}, "p:4"),
        PromptSpec("a cat", {"seed": 7, "width": 96, "height": 64}, "p:5"),
    ]
    items = items_of(specs, storage=storage)

    same = {item.key for item in items[:3]}
    assert len(same) == 1, "the same bytes from a path, a URL and an S3 object are one request"
    assert len({items[0].key, items[3].key, items[4].key, items[5].key}) == 4
    assert [i.params.image.source for i in items[:3]] == sources  # type: ignore[union-attr]
    assert items[0].params.strength == 0.6 and items[5].params.image is None and items[5].params.strength is None
    assert "image" not in items[5].params.request()  # text-to-image keys are as before


def test_width_and_height_default_to_the_input_rounded_to_16(tmp_path: Path) -> None:
    (tmp_path / "wide.png").write_bytes(solid_png(100, 70))
    (tmp_path / "huge.png").write_bytes(solid_png(4100, 2000))
    wide = str(tmp_path / "wide.png")
    items = items_of(
        [
            PromptSpec("a", {"image": wide}, "p:1"),
            PromptSpec("a", {"image": wide, "width": 128}, "p:2"),  # the other side keeps the aspect
            PromptSpec("a", {"image": wide, "width": 64, "height": 64}, "p:3"),
            PromptSpec("a", {"image": str(tmp_path / "huge.png")}, "p:4"),  # scaled to fit max_size first
            PromptSpec("a", {}, "p:5"),  # text-to-image: the preset's size
        ]
    )
    assert [(i.params.width, i.params.height) for i in items] == [(96, 64), (128, 96), (64, 64), (2048, 992), (64, 64)]
    assert default_size(100, 70, LIMITS) == (96, 64)
    # The job's own width is the item's unless the item says otherwise; the height then follows the input.
    (job_item,) = items_of([PromptSpec("a", {"image": wide}, "p:1")], {"width": 256})
    assert (job_item.params.width, job_item.params.height) == (256, 176)


def test_image_and_strength_come_from_the_line_the_job_or_the_default(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(64, 64, 1))
    (tmp_path / "b.png").write_bytes(png_bytes(64, 64, 2))
    prompts = tmp_path / "p.csv"
    prompts.write_text(f"prompt,image,strength\none,,\ntwo,{tmp_path / 'b.png'},0.8\nthree,{tmp_path / 'b.png'},\n")
    specs = read_prompts(prompts)
    items = items_of(specs, {"image": str(tmp_path / "a.png"), "strength": 0.4})
    a, b = (hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.png", "b.png"))
    assert [(i.params.image.sha256, i.params.strength) for i in items] == [(a, 0.4), (b, 0.8), (b, 0.4)]  # type: ignore[union-attr]
    # A relative path is kept absolute: workers do not share the producer's working directory.
    os.chdir(tmp_path)
    (item,) = items_of([PromptSpec("a", {"image": "a.png"}, "p:1")])
    assert item.params.image is not None and item.params.image.source == str(tmp_path / "a.png")


def test_img2img_items_group_by_strength_apart_from_text_to_image(tmp_path: Path) -> None:
    for n in range(3):
        (tmp_path / f"{n}.png").write_bytes(png_bytes(64, 64, n))
    specs = [PromptSpec("t2i", {}, "p:1"), PromptSpec("t2i 2", {}, "p:2")]
    specs += [PromptSpec(f"i2i {n}", {"image": str(tmp_path / f"{n}.png")}, f"p:{3 + n}") for n in range(3)]
    specs += [PromptSpec("i2i strong", {"image": str(tmp_path / "0.png"), "strength": 0.9}, "p:6")]
    tasks = split_tasks(items_of(specs), job_id="groups", preset=PRESET, model="m")
    groups = sorted(sorted(i.prompt for i in t.items) for t in tasks)
    assert groups == [["i2i 0", "i2i 1", "i2i 2"], ["i2i strong"], ["t2i", "t2i 2"]]


# -- the worker ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    from fluxfleet.settings import WorkerSettings
    from workers.pipeline.build import build_pipeline

    settings = Settings(model_dir=tiny_model_dir, worker=WorkerSettings(device="cpu"))
    return build_pipeline(load_preset("tiny", settings.presets_dir), settings)


def img2img_items(
    tmp_path: Path, names: list[str], strength: float, steps: int = 8, seed: int = 3, model: str = "m"
) -> list[Any]:
    specs = [PromptSpec("a red cat", {"image": str(tmp_path / n), "strength": strength, "steps": steps, "seed": seed},
                        f"p:{i}") for i, n in enumerate(names)]  # fmt: skip
    return items_of(specs, model=model)


class Stages:
    def __init__(self) -> None:
        self.stages: list[tuple[str, int]] = []
        self.steps = 0

    def stage(self, stage: str, seconds: float, images: int = 1) -> None:
        self.stages.append((stage, images))

    def denoising_steps(self, steps: int, seconds: float) -> None:
        self.steps += steps

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def test_strength_one_ignores_the_input_and_less_keeps_it(loaded: Any, tmp_path: Path) -> None:
    from workers.tasks.generation import pipeline_generate

    (tmp_path / "a.png").write_bytes(png_bytes(64, 64, 1))
    (tmp_path / "b.png").write_bytes(png_bytes(64, 64, 2))
    observer = Stages()
    generate = pipeline_generate(loaded, observer, limits=LIMITS)  # type: ignore[arg-type]
    full = generate(img2img_items(tmp_path, ["a.png", "b.png"], 1.0), lambda: False)
    assert np.array_equal(np.asarray(full[0]), np.asarray(full[1])), "strength 1 starts from noise alone"
    half = generate(img2img_items(tmp_path, ["a.png", "b.png"], 0.5), lambda: False)
    assert not np.array_equal(np.asarray(half[0]), np.asarray(half[1]))
    # Each call kept its three timed stages; 0.5 of 8 steps runs the last 4, and the step cache counted them.
    assert [s for s, _n in observer.stages] == ["text_encoding", "denoising", "vae_decode"] * 2
    assert observer.steps == 2 * 8 + 2 * 4 and half[0].info["fluxfleet_steps"] == (4, 0)


def test_the_smallest_strength_returns_the_input_as_the_vae_sees_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from fluxfleet.settings import WorkerSettings
    from workers.pipeline.build import build_pipeline
    from workers.tasks.generation import pipeline_generate

    # Random weights denoise toward nothing, so the transformer is made to predict no change: what is left is
    # where fluxfleet starts each item, the input noised as far as its strength says.
    settings = Settings(model_dir=tiny_model_dir, worker=WorkerSettings(device="cpu", warmup=False))
    still = build_pipeline(load_preset("tiny", settings.presets_dir), settings)
    with torch.no_grad():
        still.pipe.transformer.proj_out.weight.zero_()
        still.pipe.transformer.proj_out.bias.zero_()
    (tmp_path / "a.png").write_bytes(png_bytes(64, 64, 1))
    generate = pipeline_generate(still, limits=LIMITS)
    (low,) = generate(img2img_items(tmp_path, ["a.png"], 0.05, steps=20), lambda: False)
    (high,) = generate(img2img_items(tmp_path, ["a.png"], 1.0, steps=20), lambda: False)
    # The input through the VAE with the item's seed, as the pipeline encodes it.
    with torch.inference_mode():
        image = still.pipe.image_processor.preprocess(Image.open(tmp_path / "a.png"), height=64, width=64)
        from diffusers import FluxImg2ImgPipeline

        img2img = FluxImg2ImgPipeline.from_pipe(still.pipe)
        latents = img2img._encode_vae_image(image, [torch.Generator("cpu").manual_seed(3)])
        vae = still.pipe.vae
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        seen = np.asarray(still.pipe.image_processor.postprocess(decoded, output_type="pil")[0], dtype=float)
    low_error = ((np.asarray(low, dtype=float) - seen) ** 2).mean()
    high_error = ((np.asarray(high, dtype=float) - seen) ** 2).mean()
    assert low_error < 0.1 * high_error, (low_error, high_error)


def test_the_img2img_pipeline_is_built_once_from_the_loaded_components(loaded: Any, tiny_model_dir: Path) -> None:
    import torch
    from diffusers import FluxPipeline

    from workers.pipeline.img2img import Img2Img

    img2img = Img2Img(loaded.pipe, None, LIMITS)
    first = img2img.pipeline()
    assert img2img.pipeline() is first
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        assert getattr(first, name) is getattr(loaded.pipe, name), name
    # The shared modules keep their dtype (diffusers' from_pipe would cast them to float32 in place).
    bf16 = FluxPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    Img2Img(bf16, None, LIMITS).pipeline()
    assert {bf16.transformer.dtype, bf16.vae.dtype, bf16.text_encoder_2.dtype} == {torch.bfloat16}


def test_png_parameters_name_the_input_by_content_and_the_strength(tmp_path: Path) -> None:
    from workers.tasks.png import parameters_text

    (tmp_path / "a.png").write_bytes(png_bytes(64, 64, 1))
    (item,) = img2img_items(tmp_path, ["a.png"], 0.35)
    sha = hashlib.sha256(png_bytes(64, 64, 1)).hexdigest()
    assert parameters_text(item, "tiny", "m").endswith(f", Init image: {sha[:12]}, Strength: 0.35")


def test_an_input_changed_after_submit_fails_only_its_item(
    loaded: Any, tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    from fluxfleet.jobs import JobStore
    from fluxfleet.storage import open_storage
    from workers.tasks.generation import pipeline_generate

    settings = submit_settings(redis_server, tmp_path, tiny_model_dir)
    storage = open_storage(settings.storage)
    jobs = JobStore.from_settings(settings.broker)
    for n in ("a", "b", "c"):
        (tmp_path / f"{n}.png").write_bytes(png_bytes(64, 64, ord(n)))
    items = img2img_items(tmp_path, ["a.png", "b.png", "c.png"], 0.6, steps=4, model=loaded.model)
    (task,) = split_tasks(items, job_id="changed", preset=PRESET, model=loaded.model)
    jobs.create(job_id="changed", preset="tiny", model=loaded.model, tasks=[task])
    # Given b.png rewritten after the job was submitted,
    (tmp_path / "b.png").write_bytes(png_bytes(64, 64, 99))
    # when the task runs,
    outcome = run_task(
        task,
        generate=pipeline_generate(loaded, storage=lambda: storage, limits=settings.limits),
        preset=PRESET,
        model=loaded.model,
        settings=settings,
        storage=storage,
        jobs=jobs,
    )
    # then only b's item fails, saying why, and the other two are stored.
    assert (outcome.generated, outcome.failed) == (2, 1)
    (failure,) = jobs.failures("changed")
    assert failure.index == 1 and "changed since the job was submitted" in failure.reason
    assert sorted(r.index for r in jobs.records("changed")) == [0, 2]


def test_the_worker_reads_s3_inputs_from_its_own_storage(s3_endpoint: str, s3_bucket: str) -> None:
    import boto3

    from fluxfleet.schema import InputImageRef
    from fluxfleet.storage import open_storage
    from workers.pipeline.img2img import Img2Img

    data = png_bytes(100, 70, 5)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key="in/a.png", Body=data
    )
    storage = open_storage(
        settings_for({**s3_env(s3_endpoint), "FLUXFLEET_STORAGE__URL": f"s3://{s3_bucket}/out"}).storage
    )
    items = items_of([PromptSpec("a", {"image": f"s3://{s3_bucket}/in/a.png"}, "p:1")], storage=storage)
    missing = InputImageRef(source=f"s3://{s3_bucket}/in/gone.png", sha256="0" * 64, width=100, height=70)
    gone = items[0].model_copy(update={"index": 1, "params": items[0].params.model_copy(update={"image": missing})})
    images, refused = Img2Img(None, lambda: storage, LIMITS).inputs([items[0], gone])
    assert [i.size for i in images] == [(96, 64)] and list(refused) == [1]
    assert "no object" in refused[1]


def test_an_s3_input_over_the_byte_limit_or_missing_is_refused_at_submit(s3_endpoint: str, s3_bucket: str) -> None:
    import boto3

    from fluxfleet.storage import open_storage

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key="in/big.png", Body=png_bytes(100, 70, 5)
    )
    storage = open_storage(
        settings_for({**s3_env(s3_endpoint), "FLUXFLEET_STORAGE__URL": f"s3://{s3_bucket}/out"}).storage
    )
    small = LimitSettings(max_input_image_bytes=4000)
    cases = {"in/big.png": "bytes, over the limit of 4000 bytes", "in/gone.png": "no object"}
    for key, expected in cases.items():
        spec = PromptSpec("a", {"image": f"s3://{s3_bucket}/{key}"}, "p.csv:2")
        with pytest.raises(ValidationError) as refused:
            read_input_images([spec], {}, storage=lambda: storage, limits=small)
        assert expected in str(refused.value) and "p.csv:2" in str(refused.value)


# -- through a real worker ----------------------------------------------------------------------------------------
def test_a_job_mixing_text_to_image_and_image_to_image_through_a_real_worker(
    shared_stack: SharedStack, tmp_path: Path, server: ImageServer
) -> None:
    local, remote = png_bytes(100, 70, 11), png_bytes(64, 96, 12)
    (tmp_path / "local.png").write_bytes(local)
    url = server.serve("/remote.png", remote)
    prompts = tmp_path / "restyle.jsonl"
    lines = [
        {"prompt": "a lamp in the fog"},
        {"prompt": "a lamp in the fog, as a woodcut", "image": str(tmp_path / "local.png"), "strength": 0.5},
        {"prompt": "a lamp in the fog, as a woodcut", "image": url},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))

    job = shared_stack.client().submit(prompts, preset="tiny", seed=5)
    status = job.wait(timeout=180)

    assert (status.done, status.failed) == (3, 0)
    records = sorted(job.results(), key=lambda r: r.index)
    assert [r.params.strength for r in records] == [None, 0.5, 0.6]
    shas = [hashlib.sha256(b).hexdigest() for b in (local, remote)]
    assert [r.params.image.sha256 for r in records[1:]] == shas  # type: ignore[union-attr]
    with Image.open(records[0].location) as image:
        assert image.size == (64, 64) and "Init image" not in image.info["parameters"]
    for record, sha, size, strength in zip(records[1:], shas, [(96, 64), (64, 96)], [0.5, 0.6], strict=True):
        with Image.open(record.location) as image:
            assert image.size == size
            assert image.info["parameters"].endswith(f", Init image: {sha[:12]}, Strength: {strength}")
    manifest = (shared_stack.storage_root / manifest_key(job.id)).read_text().splitlines()
    assert [json.loads(line)["params"].get("strength") for line in manifest] == [None, 0.5, 0.6]
    assert server.requests.count("/remote.png") == 2  # once at submit, once by the worker


def test_the_command_line_takes_image_and_strength_and_refuses_in_one_sentence(
    redis_server: RedisServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from tests.test_cli_errors import cli_env, fluxfleet, one_sentence

    (tmp_path / "a.png").write_bytes(png_bytes(100, 70, 3))
    prompts = tmp_path / "catalogue.csv"
    prompts.write_text(f"prompt,image,strength\nas ink,,\nas chalk,{tmp_path / 'a.png'},0.9\n")
    env = cli_env(tmp_path, tiny_model_dir, redis_server.url)

    refused = fluxfleet(env, "submit", str(prompts), "--preset", "tiny", "--strength", "0")
    assert "(field 'strength')" in one_sentence(refused) and redis.Redis(port=redis_server.port).dbsize() == 0
    missing = fluxfleet(env, "submit", str(prompts), "--preset", "tiny", "--image", str(tmp_path / "gone.png"))
    assert f"{prompts}:2: no such file" in one_sentence(missing) and "(field 'image')" in one_sentence(missing)

    done = fluxfleet(
        env,
        "submit",
        str(prompts),
        "--preset",
        "tiny",
        "--image",
        str(tmp_path / "a.png"),
        "--strength",
        "0.4",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    job = Client(submit_settings(redis_server, tmp_path, tiny_model_dir)).job(json.loads(done.stdout)["job_id"])
    tasks = job.client.jobs.task_payloads(job.id)
    # The job's image and strength for the line without its own, the line's own for the other: two tasks.
    assert sorted(item.params.strength for task in tasks for item in task.items) == [0.4, 0.9]
    assert {(i.params.width, i.params.height) for t in tasks for i in t.items} == {(96, 64)}


def test_a_cache_policy_runs_the_img2img_steps(loaded: Any, tmp_path: Path) -> None:
    from workers.tasks.generation import pipeline_generate

    (tmp_path / "a.png").write_bytes(png_bytes(64, 64, 1))
    (item,) = img2img_items(tmp_path, ["a.png"], 0.5, steps=24)
    policy = parse_policy("magcache:threshold=0.5")
    cached = item.model_copy(update={"params": item.params.model_copy(update={"cache": policy.canonical()})})
    (image,) = pipeline_generate(loaded, limits=LIMITS)([cached], lambda: False)
    # Half of 24 steps run, and MagCache's schedule is the one for those 12.
    plan = schedule(policy, 12) or []
    assert image.info["fluxfleet_steps"] == (sum(plan), 12 - sum(plan)) and sum(plan) < 12


def test_a_producer_without_pillow_names_the_extra(tmp_path: Path) -> None:
    from tests.conftest import run_python

    (tmp_path / "a.png").write_bytes(png_bytes(64, 64, 1))
    code = (
        "import sys; sys.modules['PIL'] = None\n"
        "from fluxfleet.errors import ValidationError\n"
        "from fluxfleet.settings import LimitSettings\n"
        "from producer.input_images import read_input_images\n"
        "from producer.inputs import PromptSpec\n"
        "try:\n"
        "    read_input_images([PromptSpec('a', {'image': sys.argv[1]}, 'p.csv:2')], {}, storage=None, "
        "limits=LimitSettings())\n"
        "except ValidationError as e:\n"
        "    print(e)\n"
    )
    last = run_python(code, str(tmp_path / "a.png"))
    assert last == (
        "p.csv:2: image-to-image needs Pillow, which is not installed. Run `pip install 'fluxfleet[img2img]'` "
        "(field 'image')"
    )


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_img2img_replays_the_captured_graph_of_a_bf16_gpu_pipeline(tmp_path: Path) -> None:
    import torch

    from fluxfleet.presets import Preset
    from fluxfleet.settings import WorkerSettings
    from workers.pipeline.build import build_pipeline
    from workers.tasks.generation import pipeline_generate
    from workers.tools.tiny_model import build_tiny_pipeline

    # Given the tiny pipeline on the GPU in bf16 with the cuda_graph lever (its warm-up captures the graph),
    preset = Preset.model_validate(
        {
            "name": "graphed",
            "model": "unused",
            "dtype": "bfloat16",
            "placement": {"policy": "gpu"},
            "speed": {"cuda_graph": True},
            "warmup": {"steps": 2, "shapes": [[64, 64]]},
        }
    )
    settings = Settings(model_dir=build_tiny_pipeline(tmp_path / "model"), worker=WorkerSettings(device="cuda"))
    loaded = build_pipeline(preset, settings)
    graphed = loaded.pipe.transformer.forward
    generate = pipeline_generate(loaded, limits=LIMITS)
    (tmp_path / "a.png").write_bytes(png_bytes(64, 64, 1))
    (text,) = items_of([PromptSpec("a red cat", {"steps": 8, "seed": 3}, "p:1")])
    before_t2i = np.asarray(generate([text], lambda: False)[0])
    replays = graphed.replays
    # when an image-to-image item runs half of 8 steps,
    images = generate(img2img_items(tmp_path, ["a.png"], 0.5), lambda: False)
    # then each of the 4 steps replays the graph, the shared modules stay bf16, and text-to-image is unchanged.
    assert graphed.replays - replays == 4 and [i.size for i in images] == [(64, 64)]
    assert {loaded.pipe.transformer.dtype, loaded.pipe.vae.dtype, loaded.pipe.text_encoder_2.dtype} == {torch.bfloat16}
    assert np.array_equal(np.asarray(generate([text], lambda: False)[0]), before_t2i)
