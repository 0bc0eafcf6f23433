"""Quantization backends on the CPU with the tiny pipeline, through the worker's own build_pipeline.

Each CPU-capable backend must really quantize (module/tensor types) and stay within TOLERANCE of the
unquantized output; CUDA-only ones are skipped here and run by benchmarks/gpu_presets_smoke.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluxfleet.errors import BackendMissingError, ConfigurationError, ModelLoadError
from fluxfleet.presets import Preset
from fluxfleet.settings import Settings, WorkerSettings

torch = pytest.importorskip("torch")

TOLERANCE = {8: 0.05, 4: 0.1, 2: 0.4}
"""Largest allowed absolute pixel difference from the float32 output, by bits per weight (pixels in
[0, 1], 64x64, 2 steps); the mean difference must also stay under a tenth of it."""


def assert_close(image: np.ndarray, reference: np.ndarray, bits: int) -> None:
    diff = np.abs(image - reference)
    assert diff.max() < TOLERANCE[bits] and diff.mean() < TOLERANCE[bits] / 10, (diff.max(), diff.mean())


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="session")
def tiny_model_for_backends(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tools.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-backends"))


def make_preset(backend: str = "none", options: dict[str, Any] | None = None, **fields: Any) -> Preset:
    data: dict[str, Any] = {
        "name": f"test-{backend}",
        "model": "unused: Settings.model_dir wins",
        "dtype": "float32",
        "quantization": {"backend": backend, "options": options or {}},
        "placement": {"policy": "cpu"},
    }
    data.update(fields)
    return Preset.model_validate(data)


def generate(preset: Preset, model_dir: Path) -> tuple[Any, np.ndarray]:
    from workers.pipeline.build import build_pipeline

    loaded = build_pipeline(preset, Settings(model_dir=model_dir, worker=WorkerSettings(device="cpu")))
    assert loaded.memory.components["transformer"] > 0
    image = loaded.pipe(
        "a red cat",
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    return loaded.pipe, image


@pytest.fixture(scope="session")
def reference(tiny_model_for_backends: Path) -> np.ndarray:
    return generate(make_preset(), tiny_model_for_backends)[1]


def weight_type(pipe: Any, component: str = "transformer") -> str:
    module = getattr(pipe, component)
    linear = (
        module.transformer_blocks[0].attn.to_q
        if component == "transformer"
        else module.encoder.block[0].layer[0].SelfAttention.q
    )
    return f"{type(linear).__name__}/{type(linear.weight).__name__}/{linear.weight.dtype}"


CPU_CASES = [
    ("torchao", {"type": "int8_weight_only"}, "Int8Tensor", True, 8),
    ("torchao", {"type": "float8_weight_only"}, "Float8Tensor", True, 8),
    ("quanto", {"weights": "int8"}, "QLinear", True, 8),
    ("quanto", {"weights": "int4"}, "WeightQBitsTensor", True, 4),
    ("quanto", {"weights": "float8"}, "QLinear", True, 8),  # the direct quantize/freeze path
    ("layerwise", {"storage_dtype": "float8_e4m3fn"}, "float8_e4m3fn", False, 8),
]


@pytest.mark.parametrize(("backend", "options", "marker", "t5_too", "bits"), CPU_CASES)
def test_cpu_backend_quantizes_and_stays_close(
    tiny_model_for_backends: Path,
    reference: np.ndarray,
    backend: str,
    options: dict,
    marker: str,
    t5_too: bool,
    bits: int,
) -> None:
    components = ["transformer", "text_encoder_2"] if t5_too else ["transformer"]
    preset = make_preset(backend, options)
    preset.quantization.components = components
    pipe, image = generate(preset, tiny_model_for_backends)
    assert marker in weight_type(pipe)
    if t5_too:
        assert weight_type(pipe, "text_encoder_2") != "Linear/Parameter/torch.float32"
    assert_close(image, reference, bits)


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_1"])
def test_gguf_file_written_with_the_gguf_package(
    tiny_model_for_backends: Path, reference: np.ndarray, tmp_path: Path, quant_type: str
) -> None:
    from workers.tools.quantize import write_gguf

    path = write_gguf(tiny_model_for_backends / "transformer", tmp_path / f"t-{quant_type}.gguf", quant_type)
    preset = make_preset("gguf", {"quant_type": quant_type}, single_file=str(path))
    pipe, image = generate(preset, tiny_model_for_backends)
    assert weight_type(pipe).startswith("GGUFLinear/GGUFParameter")
    assert_close(image, reference, 8 if quant_type == "Q8_0" else 4)


def q2_k_grid_values(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Values Q2_K stores exactly: per sub-block ``d*sc*q - dmin*m`` with d = dmin = 1/8, each block's largest
    sc and m 15 (so d is max/15) and q 0 and 3 in every sub-block (so the min/max fit finds sc and m)."""
    sc = rng.integers(0, 16, (n_blocks, 16))
    m = rng.integers(0, 16, (n_blocks, 16))
    sc[:, 0] = m[:, 1] = 15
    q = rng.integers(0, 4, (n_blocks, 16, 16))
    q[..., 0], q[..., 1] = 0, 3
    return ((sc[..., None] * q - m[..., None]) / 8).astype(np.float32).reshape(n_blocks, 256)


def test_gguf_q2_k_quantizer_matches_the_gguf_and_diffusers_readers() -> None:
    import gguf
    from diffusers.quantizers.gguf.utils import dequantize_blocks_Q2_K

    from workers.tools.gguf_kquants import quantize_q2_k

    rng = np.random.default_rng(0)
    q2_k = gguf.GGMLQuantizationType.Q2_K
    # Values on the Q2_K grid come back exactly: any slip in the byte layout or the 2-bit packing order shows.
    grid = q2_k_grid_values(rng, 8).reshape(4, 512)
    np.testing.assert_array_equal(gguf.quants.dequantize(quantize_q2_k(grid), q2_k), grid)

    weights = rng.standard_normal((64, 512)).astype(np.float32)
    data = quantize_q2_k(weights)
    assert data.dtype == np.uint8 and data.shape == gguf.quants.quant_shape_to_byte_shape(weights.shape, q2_k)
    back = gguf.quants.dequantize(data, q2_k)
    # Measured 0.33 (min/max fit, 2 bits + 4-bit scales); all zeros would give 1.0.
    error = np.linalg.norm(back - weights) / np.linalg.norm(weights)
    assert error < 0.4, error
    block_size, type_size = gguf.GGML_QUANT_SIZES[q2_k]
    torch_back = dequantize_blocks_Q2_K(
        torch.from_numpy(data).reshape(-1, type_size), block_size, type_size, torch.float32
    )
    np.testing.assert_allclose(torch_back.reshape(weights.shape).numpy(), back, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="session")
def wide_model_for_gguf(tiny_model_for_backends: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with a transformer 256 wide: K-quants take rows of 256, and the tiny transformer's
    attention and MLP weights (rows of 32 and 128) would stay float32, so a Q2_K test there would check little."""
    import shutil

    from diffusers import FluxTransformer2DModel

    from workers.tools.tiny_model import TINY

    wide = tmp_path_factory.mktemp("wide-gguf") / "model"
    shutil.copytree(tiny_model_for_backends, wide)
    shutil.rmtree(wide / "transformer")
    torch.manual_seed(0)
    # the tiny transformer with 128-wide heads: rows of 256, as K-quants need
    wide_heads = {"attention_head_dim": 128, "axes_dims_rope": (16, 56, 56)}
    transformer = FluxTransformer2DModel(**{**TINY.transformer, **wide_heads})
    transformer.eval().save_pretrained(wide / "transformer")
    return wide


def test_gguf_q2_k_file_written_with_our_quantizer(wide_model_for_gguf: Path, tmp_path: Path) -> None:
    import gguf

    from workers.tools.quantize import write_gguf

    q2_k = gguf.GGMLQuantizationType.Q2_K
    path = write_gguf(wide_model_for_gguf / "transformer", tmp_path / "t-Q2_K.gguf", "Q2_K")
    quantized = [t.name for t in gguf.GGUFReader(str(path)).tensors if t.tensor_type == q2_k]
    assert "transformer_blocks.0.attn.to_q.weight" in quantized and len(quantized) >= 30, quantized
    reference = generate(make_preset(), wide_model_for_gguf)[1]
    preset = make_preset("gguf", {"quant_type": "Q2_K"}, single_file=str(path))
    pipe, image = generate(preset, wide_model_for_gguf)
    assert weight_type(pipe).startswith("GGUFLinear/GGUFParameter")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.quant_type == q2_k
    # Measured max 0.20, mean 0.026; a transformer whose Q2_K weights are all zero gives 0.57 and 0.093.
    assert_close(image, reference, 2)


def test_gguf_missing_or_not_gguf_fails_at_start(tiny_model_for_backends: Path, tmp_path: Path) -> None:
    from workers.pipeline.build import build_pipeline

    settings = Settings(model_dir=tiny_model_for_backends, worker=WorkerSettings(device="cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_pipeline(make_preset("gguf", single_file=str(tmp_path / "none.gguf")), settings)
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        build_pipeline(make_preset("gguf", single_file=str(tmp_path / "fake.gguf")), settings)


def test_torchao_saved_pipeline_loads_without_quantizing_again(tiny_model_for_backends: Path, tmp_path: Path) -> None:
    from workers.pipeline.backends import saved_quantization
    from workers.tools.quantize import save_quantized

    preset = make_preset("torchao", {"type": "int8_weight_only"})
    settings = Settings(model_dir=tiny_model_for_backends, worker=WorkerSettings(device="cpu"))
    _, first = generate(preset, tiny_model_for_backends)
    save_quantized(preset, settings, tmp_path / "saved")
    assert saved_quantization(str(tmp_path / "saved")) == ["text_encoder_2", "transformer"]
    pipe, again = generate(make_preset(), tmp_path / "saved")  # a preset with no backend: the dir says it all
    assert "Int8Tensor" in weight_type(pipe)
    np.testing.assert_allclose(again, first, atol=1e-6)


def test_non_serializable_backend_refuses_to_save(tiny_model_for_backends: Path, tmp_path: Path) -> None:
    from workers.tools.quantize import save_quantized

    with pytest.raises(ConfigurationError, match="does not serialize"):
        save_quantized(make_preset("quanto", {"weights": "int8"}), Settings(), tmp_path)


@pytest.mark.parametrize(
    ("backend", "package", "extra"),
    [
        ("torchao", "torchao", "torchao"),
        ("quanto", "optimum.quanto", "quanto"),
        ("bitsandbytes", "bitsandbytes", "bitsandbytes"),
        ("gguf", "gguf", "gguf"),
    ],
)
def test_missing_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, backend: str, package: str, extra: str
) -> None:
    from workers.pipeline.backends import pipeline_kwargs

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(BackendMissingError, match=rf"pip install 'fluxfleet\[{extra}\]'"):
        pipeline_kwargs(make_preset(backend), torch.float32)


def test_unknown_option_names_the_preset_and_option() -> None:
    from workers.pipeline.backends import pipeline_kwargs

    with pytest.raises(ConfigurationError, match=r"test-torchao.*quantization\.options \['bitz'\]"):
        pipeline_kwargs(make_preset("torchao", {"bitz": 4}), torch.float32)


@NEEDS_CUDA
@pytest.mark.parametrize(
    "options",
    [{"bits": 4, "quant_type": "nf4"}, {"bits": 4, "quant_type": "fp4", "double_quant": True}, {"bits": 8}],
)
def test_bitsandbytes_on_cuda(tiny_model_for_backends: Path, options: dict) -> None:
    from workers.pipeline.build import build_pipeline

    preset = make_preset("bitsandbytes", options, dtype="bfloat16", placement={"policy": "gpu"})
    loaded = build_pipeline(preset, Settings(model_dir=tiny_model_for_backends, worker=WorkerSettings(device="cuda")))
    assert "Linear4bit" in weight_type(loaded.pipe) or "Linear8bitLt" in weight_type(loaded.pipe)


@NEEDS_CUDA
@pytest.mark.parametrize("kind", ["int4_weight_only", "float8_dynamic_row"])
def test_torchao_cuda_only_types(tiny_model_for_backends: Path, kind: str) -> None:
    from workers.pipeline.build import build_pipeline

    preset = make_preset("torchao", {"type": kind, "group_size": 32}, dtype="bfloat16", placement={"policy": "gpu"})
    loaded = build_pipeline(preset, Settings(model_dir=tiny_model_for_backends, worker=WorkerSettings(device="cuda")))
    assert "Linear" in weight_type(loaded.pipe)


def test_torchao_footprint_counts_the_quantized_storage(tiny_model_for_backends: Path) -> None:
    # Given the tiny transformer in float32 and again quantized to int8 weight-only by torchao,
    from workers.pipeline.footprint import module_bytes

    pytest.importorskip("torchao")
    plain, _ = generate(make_preset(), tiny_model_for_backends)
    quantized, _ = generate(
        make_preset(
            "torchao",
            {"type": "int8_weight_only"},
            quantization={"backend": "torchao", "components": ["transformer"], "options": {"type": "int8_weight_only"}},
        ),
        tiny_model_for_backends,
    )
    # then the recorded footprint shrinks with the weights (int8 against float32: well under half).
    assert module_bytes(quantized.transformer) < 0.5 * module_bytes(plain.transformer)


def test_dequantized_component_saves_and_loads_as_a_plain_one(tiny_model_for_backends: Path, tmp_path: Path) -> None:
    """What `forget_quantization` leaves after diffusers' dequantize: a config without quantization."""
    from diffusers import FluxTransformer2DModel

    from workers.pipeline.backends import saved_quantization
    from workers.tools.quantize import forget_quantization

    # Given a transformer in the state diffusers' dequantize() leaves it (plain weights, quantizer kept),
    model = FluxTransformer2DModel.from_pretrained(tiny_model_for_backends / "transformer")
    model.register_to_config(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    model.hf_quantizer, model.is_quantized = object(), True
    # when it is made plain and saved,
    forget_quantization(model)
    model.save_pretrained(tmp_path / "transformer")
    # then the directory is not taken for a pre-quantized one and loads as plain weights.
    assert "quantization_config" not in json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert saved_quantization(str(tmp_path)) == []
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert getattr(reloaded, "hf_quantizer", None) is None
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_dequantized_text_encoder_saves_without_quantization_config(tmp_path: Path) -> None:
    """transformers' T5 keeps its config object's ``quantization_config`` after dequantize() (seen on an H100)."""
    from transformers import T5Config, T5EncoderModel

    from workers.tools.quantize import forget_quantization

    # Given a T5 encoder in the state transformers' dequantize() leaves it,
    model = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    model.hf_quantizer, model.is_quantized = object(), True
    # when it is made plain and saved,
    forget_quantization(model)
    model.save_pretrained(tmp_path / "text_encoder_2")
    # then its config declares no quantization and it loads back as plain weights.
    assert "quantization_config" not in json.loads((tmp_path / "text_encoder_2" / "config.json").read_text())
    reloaded = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2")
    assert getattr(reloaded, "hf_quantizer", None) is None


@NEEDS_CUDA
def test_bitsandbytes_dequantize_round_trip(tiny_model_for_backends: Path, tmp_path: Path) -> None:
    from workers.pipeline.build import build_pipeline
    from workers.tools.quantize import save_dequantized

    settings = Settings(model_dir=tiny_model_for_backends, worker=WorkerSettings(device="cuda"))
    preset = make_preset("bitsandbytes", {"bits": 4}, dtype="bfloat16", placement={"policy": "gpu"})
    save_dequantized(preset, settings, tmp_path / "plain")
    plain = build_pipeline(
        make_preset(dtype="bfloat16", placement={"policy": "gpu"}),
        settings.with_overrides(model_dir=str(tmp_path / "plain")),
    )
    assert "Linear4bit" not in weight_type(plain.pipe)


def test_fp8_rowwise_linear_keeps_a_linear_within_fp8_error() -> None:
    from workers.speed.fp8_linear import FP8, Fp8RowwiseLinear

    # Given a bf16 linear layer and inputs whose rows differ in scale by 100x,
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).to(torch.bfloat16)
    x = torch.randn(4, 64, 256, dtype=torch.bfloat16) * torch.logspace(-1, 1, 64, dtype=torch.bfloat16)[:, None]
    # when it is replaced by its fp8 row-wise version,
    fp8 = Fp8RowwiseLinear(linear)
    out, ref = fp8(x).float(), linear(x).float()
    # then the weights are stored in one byte each, with one scale per output row,
    assert fp8.weight.dtype == FP8 and fp8.weight.shape == (128, 256) and fp8.weight_scale.shape == (1, 128)
    # and every output row stays within e4m3's error (3 mantissa bits) of the bf16 result.
    row_err = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert out.shape == ref.shape
    assert row_err.max() < 0.06, row_err.max()


def test_plain_fp8_with_gelu_fusion_keeps_the_image(tiny_model_for_backends: Path, reference: np.ndarray) -> None:
    # Given the tiny pipeline with fp8 linears whose GELUs are taken into their input quantization,
    speed = {"transformer_fp8": "dynamic_row_plain", "fp8_gelu_fusion": True, "warm_up": False}
    _, image = generate(make_preset(speed=speed), tiny_model_for_backends)
    # then the image stays within the 8-bit tolerance of the float32 reference.
    assert_close(image, reference, bits=8)


def test_a_start_warms_up_once_through_every_stage(tiny_model_for_backends: Path) -> None:
    from workers.pipeline.build import build_pipeline

    # Given a preset with a [speed] lever (which warms up for its compile cache) and a worker that warms up too,
    preset = make_preset(speed={"fuse_qkv": True}, warmup={"steps": 2, "shapes": [[64, 64]]})
    settings = Settings(model_dir=tiny_model_for_backends, worker=WorkerSettings(device="cpu"))
    calls: dict[str, int] = {"FluxTransformer2DModel": 0, "T5EncoderModel": 0, "Decoder": 0}

    def count(module: Any, _args: Any) -> None:
        name = type(module).__name__
        if name in calls:
            calls[name] += 1

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        # when the pipeline is built,
        loaded = build_pipeline(preset, settings, warm=True)
    finally:
        hook.remove()
    # then it warmed up once: T5 encoded once, the transformer ran the two steps, the VAE decoded once.
    assert calls == {"FluxTransformer2DModel": 2, "T5EncoderModel": 1, "Decoder": 1}
    assert loaded.warmup_s > 0 and loaded.speed.warmup_s == loaded.warmup_s


def test_fp8_weight_only_linear_stores_fp8_and_computes_in_its_dtype() -> None:
    from workers.speed.fp8_linear import FP8, Fp8WeightOnlyLinear

    # Given a bf16 linear layer without bias (as T5's),
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 16, 256, dtype=torch.bfloat16)
    # when it is replaced by its fp8 weight-only version,
    fp8 = Fp8WeightOnlyLinear(linear)
    # then only the fp8 weight and its per-row scales are stored,
    assert {name: t.dtype for name, t in fp8.state_dict().items()} == {
        "weight_fp8": FP8,
        "weight_scale": torch.float32,
    }
    # its weight reads back in bf16 (T5 picks its activations' dtype from it) within e4m3's error,
    assert fp8.weight.dtype == torch.bfloat16
    assert (fp8.weight.float() - linear.weight.float()).norm() / linear.weight.float().norm() < 0.04
    # and its output is the bf16 product with that weight.
    out = fp8(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 96)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, fp8.weight))


def _fp8_friendly_linear(module: torch.nn.Module) -> bool:
    from workers.speed.fp8_linear import fp8_friendly

    return fp8_friendly(module)


def _plain_linear(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.Linear


@pytest.mark.parametrize(
    ("speed", "component", "layer", "at_least", "left_over"),
    [
        # the transformer's linears in fp8 (plain tensors, torch._scaled_mm): no fp8-eligible nn.Linear left
        ({"transformer_fp8": "dynamic_row_plain"}, "transformer", "Fp8RowwiseLinear", 11, _fp8_friendly_linear),
        # T5's linears stored in fp8 without torchao: no nn.Linear left, its gated feed-forward included
        ({"text_encoder_2_fp8": "weight_only_plain"}, "text_encoder_2", "Fp8WeightOnlyLinear", 4, _plain_linear),
    ],
)
def test_plain_fp8_speed_lever_swaps_the_linears_and_keeps_the_image(
    tiny_model_for_backends: Path,
    reference: np.ndarray,
    speed: dict[str, Any],
    component: str,
    layer: str,
    at_least: int,
    left_over: Any,
) -> None:
    import workers.speed.fp8_linear

    # Given the tiny pipeline with one component's linear layers swapped for fluxfleet's fp8 layers,
    pipe, image = generate(make_preset(speed={**speed, "warm_up": False}), tiny_model_for_backends)
    # then the component holds the fp8 layers and none of the linears the swap replaces,
    modules = list(getattr(pipe, component).modules())
    assert sum(isinstance(m, getattr(workers.speed.fp8_linear, layer)) for m in modules) >= at_least
    assert not [m for m in modules if left_over(m)]
    # and the image stays within the 8-bit tolerance of the float32 reference.
    assert_close(image, reference, bits=8)


@NEEDS_CUDA
def test_plain_fp8_on_cuda_computes_its_quantized_product_and_rivals_torchao() -> None:
    """The fp8 GEMM, eager and compiled, against the same quantized product in float32, and the error
    against bf16 next to torchao's row-wise scheme (torchao rounds its scales to bf16: not bit-equal)."""
    import copy

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from workers.speed.fp8_linear import Fp8RowwiseLinear, emulated_scaled_mm, rowwise_quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 12288, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 512, 3072, device="cuda", dtype=torch.bfloat16)
    ours = Fp8RowwiseLinear(linear)
    theirs = torch.nn.Sequential(copy.deepcopy(linear))
    quantize_(theirs, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    with torch.no_grad():
        eager, compiled = ours(x).float(), torch.compile(ours, fullgraph=True)(x).float()
        x_fp8, x_scale = rowwise_quantize(x.reshape(-1, 3072))
        exact = emulated_scaled_mm(x_fp8, x_scale, ours.weight, ours.weight_scale, ours.bias, torch.float32)
        bf16, torchao = linear(x).float(), theirs(x).float()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    # fast accumulation costs little against the exact product of the same fp8 operands,
    assert rel(eager, exact.reshape(eager.shape)) < 5e-3
    assert rel(compiled, eager) < 5e-3
    # and the error against bf16 is no worse than torchao's for the same scheme.
    assert rel(eager, bf16) < 1.1 * rel(torchao, bf16)


def test_cuda_graph_lever_leaves_a_cpu_pipeline_as_it_was(tiny_model_for_backends: Path, reference: np.ndarray) -> None:
    # Given a preset with CUDA graphs, loaded on a CPU,
    pipe, image = generate(make_preset(speed={"cuda_graph": True, "warm_up": False}), tiny_model_for_backends)
    # then its transformer's forward is not graphed (only the step cache every preset has routes it) and the
    # image is the reference.
    from workers.speed.step_cache import StepCache

    assert isinstance(vars(pipe.transformer)["forward"], StepCache)
    assert_close(image, reference, bits=8)
