"""LoRA adapters on the worker, with tiny random LoRAs made by peft for the tiny model: an adapter changes the image,
scale 0 and adapter-free items are bit-identical to an image made before any adapter was loaded, a broken adapter
fails only its items, the file cache evicts by bytes, a file changed after submit fails only the items using it,
and one job runs through a real worker."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxfleet.keys import manifest_key
from fluxfleet.schema import AdapterRef, GenerationParams, Item
from fluxfleet.settings import Settings, StorageSettings, WorkerSettings
from tests.conftest import SharedStack

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "ff.net.2"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    from fluxfleet.presets import load_preset
    from workers.pipeline.build import build_pipeline

    settings = Settings(model_dir=tiny_model_dir, worker=WorkerSettings(device="cpu"))
    return build_pipeline(load_preset("tiny", settings.presets_dir), settings)


@pytest.fixture(scope="module")
def make_lora(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``make_lora(name, seed, rank)``: a random LoRA for the tiny transformer, saved by diffusers as safetensors."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    base = FluxTransformer2DModel.from_pretrained(tiny_model_dir / "transformer", torch_dtype=torch.float32)
    directory = tmp_path_factory.mktemp("loras")

    def make(name: str, seed: int = 0, rank: int = 4) -> Path:
        transformer = copy.deepcopy(base)
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
        layers = get_peft_model_state_dict(transformer)
        FluxPipeline.save_lora_weights(directory, transformer_lora_layers=layers, weight_name=f"{name}.safetensors")
        return directory / f"{name}.safetensors"

    return make


def ref(path: Path, scale: float = 1.0) -> AdapterRef:
    return AdapterRef(source=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), scale=scale)


def run(generate: Any, *adapters: AdapterRef, seed: int = 7) -> bytes:
    params = GenerationParams(
        width=64, height=64, steps=3, guidance=3.5, max_sequence_length=64, adapters=tuple(adapters)
    )
    item = Item(index=0, prompt="a lighthouse", seed=seed, params=params, key="0" * 40)
    (image,) = generate([item], lambda: False)
    return bytes(image.tobytes())


def test_adapters_change_the_image_and_never_leak_into_other_items(loaded: Any, make_lora: Any, tmp_path: Path) -> None:
    import torch

    from workers.pipeline.adapters import AdapterCache, AdapterFailure, PipelineAdapters
    from workers.tasks.generation import pipeline_generate

    adapters = PipelineAdapters(loaded.pipe, AdapterCache(tmp_path / "cache", 2**30), max_loaded=4)
    generate = pipeline_generate(loaded, adapters=adapters)
    before = run(generate)  # no adapter has ever been loaded
    ink, brand = make_lora("ink", seed=1), make_lora("brand", seed=2)

    with_ink = run(generate, ref(ink))
    assert with_ink != before
    assert run(generate, ref(ink, 0.5)) not in (before, with_ink)
    assert run(generate, ref(ink, 0.0)) == before  # scale 0: the adapter-free image, bit for bit
    assert run(generate) == before  # an adapter-free item after an adapter
    both = run(generate, ref(ink), ref(brand, -0.7))
    assert both not in (before, with_ink)

    # Files that are LoRAs by their header but that diffusers cannot load, or that would widen the transformer's
    # input (a Control LoRA): only their items fail, and the pipeline is left as it was.
    from safetensors.torch import load_file, save_file

    state = load_file(ink)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({k: v[:, :2].contiguous() if "lora_B" in k else v for k, v in state.items()}, mismatched)
    with pytest.raises(AdapterFailure, match="cannot be loaded"):
        run(generate, ref(mismatched))
    x_embedder = loaded.pipe.transformer.x_embedder
    wider = tmp_path / "control.safetensors"
    save_file(
        {
            **state,
            "transformer.x_embedder.lora_A.weight": torch.ones(4, 2 * x_embedder.in_features),
            "transformer.x_embedder.lora_B.weight": torch.ones(x_embedder.out_features, 4),
        },
        wider,
    )
    with pytest.raises(AdapterFailure, match="changes the transformer's own weights or shapes"):
        run(generate, ref(wider))
    assert loaded.pipe.transformer.x_embedder.in_features == x_embedder.in_features
    assert run(generate) == before
    assert run(generate, ref(ink)) == with_ink
    assert run(generate, ref(ink), ref(brand, -0.7)) == both

    # More adapters than may stay loaded: the least recently used are deleted, and load again the same.
    for seed in range(3, 7):
        run(generate, ref(make_lora(f"extra{seed}", seed=seed)))
    assert len(adapters.loaded) == 4 and len(loaded.pipe.transformer.peft_config) == 4
    assert ink.name and ref(ink).sha256 not in adapters.loaded.values()
    assert run(generate, ref(ink)) == with_ink
    assert run(generate) == before


def test_an_image_to_image_item_takes_its_adapters_too(loaded: Any, make_lora: Any, tmp_path: Path) -> None:
    from fluxfleet.schema import InputImageRef
    from tests.imagekit import png_bytes
    from workers.pipeline.adapters import AdapterCache, PipelineAdapters
    from workers.tasks.generation import pipeline_generate

    source = tmp_path / "street.png"
    source.write_bytes(png_bytes(64, 64, 1))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    image = InputImageRef(source=str(source), sha256=digest, width=64, height=64)
    adapters = PipelineAdapters(loaded.pipe, AdapterCache(tmp_path / "cache", 2**30), max_loaded=4)
    generate = pipeline_generate(loaded, adapters=adapters)

    def restyle(*refs: AdapterRef) -> bytes:
        params = GenerationParams(
            width=64, height=64, steps=4, guidance=3.5, max_sequence_length=64, image=image, strength=0.6, adapters=refs
        )
        (out,) = generate([Item(index=0, prompt="a woodcut", seed=3, params=params, key="0" * 40)], lambda: False)
        return bytes(out.tobytes())

    plain = restyle()
    styled = restyle(ref(make_lora("woodcut", seed=31)))
    assert styled != plain and restyle() == plain


def test_hot_swap_replaces_weights_without_new_compiled_graphs(
    tiny_model_dir: Path, make_lora: Any, tmp_path: Path
) -> None:
    """A [compile] preset's worker: adapters swap into fixed slots. Checked with dynamo's eager backend (the graph
    count is dynamo's, whatever compiles the graphs), so inductor on a GPU is not what runs here."""
    from torch._dynamo.utils import counters

    from fluxfleet.presets import CompileSpec, load_preset
    from workers.pipeline.adapters import AdapterCache, PipelineAdapters, hotswap_wanted, prepare_hotswap
    from workers.pipeline.build import build_pipeline
    from workers.tasks.generation import pipeline_generate

    settings = Settings(model_dir=tiny_model_dir, worker=WorkerSettings(device="cpu"))
    tiny = load_preset("tiny", settings.presets_dir)
    own = build_pipeline(tiny, settings)
    compiled = tiny.model_copy(update={"compile": CompileSpec(enabled=True)})
    assert hotswap_wanted(compiled) and not hotswap_wanted(tiny)
    prepare_hotswap(own.pipe, compiled)
    own.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    adapters = PipelineAdapters(own.pipe, AdapterCache(tmp_path / "cache", 2**30), 8, hotswap=True)
    generate = pipeline_generate(own, adapters=adapters)
    ink, brand, wide = ref(make_lora("ink", seed=1)), ref(make_lora("brand", seed=2)), ref(make_lora("r8", 3, 8))

    before = run(generate)
    with_ink = run(generate, ink)
    run(generate, brand.model_copy(update={"scale": 0.5}))
    graphs = counters["stats"]["unique_graphs"]
    swapped = [run(generate, wide), run(generate, ink.model_copy(update={"scale": 0.3})), run(generate, brand)]
    assert counters["stats"]["unique_graphs"] == graphs, "a swapped adapter compiled a new graph"
    assert len(set(swapped)) == 3 and before not in swapped and list(adapters.loaded) == ["slot_0"]
    assert run(generate, ink) == with_ink
    assert run(generate) == before


def test_the_file_cache_keeps_verified_files_and_evicts_the_least_recently_used_by_bytes(tmp_path: Path) -> None:
    from workers.pipeline.adapters import AdapterCache, AdapterFailure

    sources = []
    for index in range(3):
        path = tmp_path / f"a{index}.safetensors"
        path.write_bytes(bytes([index]) * 1000)
        sources.append(ref(path))
    cache = AdapterCache(tmp_path / "cache", limit_bytes=2500)
    first = cache.path(sources[0])
    time.sleep(0.01)
    cache.path(sources[1])
    time.sleep(0.01)
    cache.path(sources[0])  # used again: now the second is the least recently used
    time.sleep(0.01)
    cache.path(sources[2])
    assert {p.name[:1] for p in cache.files()} == {sources[0].sha256[0], sources[2].sha256[0]}
    assert first.read_bytes() == bytes([0]) * 1000 and sum(p.stat().st_size for p in cache.files()) <= 2500

    # Changed since submit, gone, or larger than the whole cache: refused with the reason, nothing cached.
    changed = tmp_path / "a1.safetensors"
    changed.write_bytes(b"edited")
    with pytest.raises(AdapterFailure, match="changed since the job was submitted"):
        cache.path(sources[1])
    changed.unlink()
    with pytest.raises(AdapterFailure, match="cannot be read on this worker"):
        cache.path(sources[1])
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"x" * 3000)
    with pytest.raises(AdapterFailure, match="larger than this worker's adapter cache"):
        cache.path(ref(big))
    assert len(cache.files()) == 2


def test_s3_adapters_are_read_through_the_jobs_storage(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    from fluxfleet.storage import open_storage
    from workers.pipeline.adapters import AdapterCache, AdapterFailure

    storage = open_storage(StorageSettings(url=f"s3://{s3_bucket}/jobs", endpoint_url=s3_endpoint))
    storage.put("styles/ink.safetensors", b"lora bytes", "application/octet-stream")
    digest = hashlib.sha256(b"lora bytes").hexdigest()
    cache = AdapterCache(tmp_path / "cache", 2**20, storage)
    source = f"s3://{s3_bucket}/jobs/styles/ink.safetensors"
    assert cache.path(AdapterRef(source=source, sha256=digest, scale=1.0)).read_bytes() == b"lora bytes"
    with pytest.raises(AdapterFailure, match="no longer exists"):
        cache.path(AdapterRef(source=source.replace("ink", "gone"), sha256="c" * 64, scale=1.0))


def test_a_file_changed_after_submit_fails_only_its_items(
    loaded: Any, make_lora: Any, tmp_path: Path, redis_server: Any, tiny_model_dir: Path
) -> None:
    from fluxfleet.jobs import JobStore
    from fluxfleet.presets import load_preset
    from fluxfleet.storage import open_storage
    from producer.client import Client
    from workers.pipeline.adapters import worker_adapters
    from workers.tasks.engine import Engine
    from workers.tasks.generation import pipeline_generate

    settings = Settings(
        model_dir=tiny_model_dir,
        broker={"url": redis_server.url},
        storage=StorageSettings(url=f"file://{tmp_path / 'store'}"),
        adapters={"cache_dir": tmp_path / "cache"},
        worker=WorkerSettings(device="cpu"),
    )
    kept, edited = make_lora("kept", seed=11), tmp_path / "edited.safetensors"
    edited.write_bytes(make_lora("edited", seed=12).read_bytes())
    prompts = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "a boat"},
        {"prompt": "a boat", "adapters": f"{kept}@0.8"},
        {"prompt": "a boat", "adapters": [{"source": str(edited)}]},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    client = Client(settings)
    job = client.submit(prompts, preset="tiny", steps=2, max_sequence_length=64)
    edited.write_bytes(make_lora("edited-again", seed=13).read_bytes())

    preset = load_preset("tiny", settings.presets_dir)
    storage = open_storage(settings.storage)
    engine = Engine(
        generate=pipeline_generate(loaded, adapters=worker_adapters(loaded.pipe, settings, preset, storage)),
        preset=preset,
        model=loaded.model,
        settings=settings,
        storage=storage,
        jobs=JobStore.from_settings(settings.broker),
        worker_name="test",
        gpu="cpu",
    )
    for payload in client.jobs.task_payloads(job.id):
        engine.run(payload)
    status = job.status()
    assert (status.done, status.failed) == (2, 1)
    (failure,) = job.failures()
    assert failure.index == 2 and "changed since the job was submitted" in failure.reason
    records = {r.index: r for r in job.results()}
    assert [a.scale for a in records[1].params.adapters] == [0.8] and not records[0].params.adapters
    assert os.listdir(tmp_path / "cache") == [f"{ref(kept).sha256}.safetensors"]


def test_a_job_with_an_adapter_through_a_real_worker(shared_stack: SharedStack, make_lora: Any, tmp_path: Path) -> None:
    lora = make_lora("e2e", seed=21)
    digest = ref(lora).sha256
    prompts = tmp_path / "lora.csv"
    prompts.write_text(f'prompt,adapters\na lamp in the fog,\na lamp in the fog,"{lora}@0.8"\n')
    job = shared_stack.client().submit(prompts, preset="tiny", seed=5)
    status = job.wait(timeout=180)
    assert (status.done, status.failed) == (2, 0), job.failures()
    records = sorted(job.results(), key=lambda r: r.index)
    assert records[0].key != records[1].key and records[0].sha256 != records[1].sha256
    manifest = [
        json.loads(line) for line in (shared_stack.storage_root / manifest_key(job.id)).read_text().splitlines()
    ]
    assert manifest[1]["params"]["adapters"] == [{"source": str(lora), "sha256": digest, "scale": 0.8}]
    assert "adapters" not in manifest[0]["params"] or manifest[0]["params"]["adapters"] == []
    with Image.open(records[0].location) as image:
        assert "LoRA:" not in image.info["parameters"]
    with Image.open(records[1].location) as image:
        assert image.info["parameters"].endswith(f", LoRA: {digest[:12]}@0.8")
