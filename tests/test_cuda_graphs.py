"""The ``cuda_graph`` speed lever (``workers/speed/cuda_graphs.py``): where presets may use it, and its replays."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset, load_preset
from tests.test_fp8_fusion import tiny_transformer, transformer_inputs

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    ("sections", "refused"),
    [
        ('[placement]\npolicy = "model_offload"\n', r"cuda_graph needs the pipeline on one GPU.*'model_offload'"),
        ("[compile]\nenabled = true\nregional = false\n", r"cuda_graph captures the forward itself.*regional"),
    ],
)
def test_cuda_graph_is_refused_where_a_graph_cannot_replay(tmp_path: Path, sections: str, refused: str) -> None:
    # Given a preset asking for CUDA graphs with weights moving during the forward, or a whole-model compile,
    (tmp_path / "g.toml").write_text(f'model = "m"\n{sections}[speed]\ncuda_graph = true\n')
    # then loading it fails before any worker starts, naming the file and the conflict.
    with pytest.raises(ConfigurationError, match=rf"g\.toml.*{refused}"):
        load_preset("g", tmp_path)


def test_the_pipelines_own_call_is_one_a_graph_can_replay() -> None:
    from workers.speed.cuda_graphs import GraphedForward

    # FluxPipeline calls its transformer with joint_attention_kwargs={} and return_dict=False: graphable;
    assert GraphedForward.signature({"joint_attention_kwargs": {}, "return_dict": False}) is not None
    # attention kwargs with content (IP-adapter embeddings) and tensors off the GPU are not.
    assert GraphedForward.signature({"joint_attention_kwargs": {"ip_adapter_image_embeds": [1]}}) is None
    assert GraphedForward.signature({"hidden_states": torch.zeros(1)}) is None


def tiny_gpu_preset(cuda_graph: bool = True) -> Preset:
    """The tiny pipeline's preset on one GPU, warmed up at 64x64 (where the graph is captured)."""
    return Preset.model_validate(
        {
            "name": "graphed",
            "model": "unused",
            "dtype": "float32",
            "placement": {"policy": "gpu"},
            "speed": {"cuda_graph": cuda_graph},
            "warmup": {"steps": 2, "shapes": [[64, 64]]},
        }
    )


@NEEDS_CUDA
def test_graphed_pipeline_replays_its_transformer_at_every_step(tmp_path: Path) -> None:
    from fluxfleet.settings import Settings, WorkerSettings
    from workers.pipeline.build import build_pipeline
    from workers.tools.tiny_model import build_tiny_pipeline

    # Given the tiny pipeline on the GPU with the cuda_graph lever (its warm-up captures the graph),
    preset = tiny_gpu_preset()
    settings = Settings(model_dir=build_tiny_pipeline(tmp_path), worker=WorkerSettings(device="cuda"))
    loaded = build_pipeline(preset, settings)
    graphed = loaded.pipe.transformer.forward
    before = graphed.replays
    # when it generates 3 steps at that shape, every step is a replay of the one captured graph.
    loaded.pipe("a red cat", width=64, height=64, num_inference_steps=3, output_type="np")
    assert (len(graphed.graphs), graphed.replays - before) == (1, 3)


@NEEDS_CUDA
def test_graphed_transformer_replays_what_the_eager_forward_computes() -> None:
    from workers.speed.cuda_graphs import graph_the_transformer

    # Given the tiny transformer on the GPU and two sets of inputs of the same shape,
    model = tiny_transformer().cuda()
    first = {k: v.cuda() for k, v in transformer_inputs(model, torch.float32).items()}
    second = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in first.items()}
    with torch.no_grad():
        expected = [model(**inputs, return_dict=False)[0] for inputs in (first, second)]
        graphed = graph_the_transformer(model, limit=1)
        # when its forward goes through a CUDA graph, each replay computes the eager result for its own inputs
        actual = [model(**inputs, return_dict=False)[0] for inputs in (first, second)]
        # (and the first output is a copy the second replay did not overwrite),
        for got, want in zip(actual, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (len(graphed.graphs), graphed.replays) == (1, 2)
        # and a new shape beyond the limit runs the ordinary forward instead of capturing again.
        shorter = {
            **first,
            "encoder_hidden_states": first["encoder_hidden_states"][:, :4],
            "txt_ids": first["txt_ids"][:4],
        }
        torch.testing.assert_close(
            model(**shorter).sample, graphed.eager_forward(**shorter, return_dict=False)[0], rtol=1e-4, atol=1e-4
        )
        assert len(graphed.graphs) == 1


@NEEDS_CUDA
def test_a_forward_that_cannot_be_captured_runs_without_a_graph(caplog: pytest.LogCaptureFixture) -> None:
    from workers.speed.cuda_graphs import GraphedForward

    # Given a forward that reads a value back to the CPU (not allowed while a graph is being captured),
    def forward(hidden_states: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor]:
        return (hidden_states * float(hidden_states.sum().item() > 0),)

    graphed = GraphedForward(forward, limit=2)
    x = torch.ones(4, 4, device="cuda")
    # then the capture failure is logged, the call still returns the eager result,
    with caplog.at_level("ERROR", logger="workers.speed.cuda_graphs"):
        out = graphed(hidden_states=x, return_dict=False)[0]
    assert "capture of the transformer failed" in caplog.text
    torch.testing.assert_close(out, x)
    # and later calls of that shape go straight to the eager forward, without trying again.
    graphed(hidden_states=x, return_dict=False)
    assert list(graphed.graphs.values()) == [None] and graphed.replays == 0
    # The failed capture leaves the GPU's random numbers usable (the pipeline and later tests draw them).
    torch.nn.Linear(64, 64, device="cuda")
    assert torch.rand(3, device="cuda").shape == (3,)


@NEEDS_CUDA
def test_magcache_under_the_graph_is_magcache_without_it(tmp_path: Path) -> None:
    from fluxfleet.caching import parse_policy
    from fluxfleet.settings import Settings, WorkerSettings
    from workers.pipeline.build import build_pipeline
    from workers.speed.step_cache import find
    from workers.tools.tiny_model import build_tiny_pipeline

    # Given the tiny pipeline on the GPU with the cuda_graph lever, and the same pipeline without it,
    model_dir = build_tiny_pipeline(tmp_path)

    def build(graph: bool) -> object:
        settings = Settings(model_dir=model_dir, worker=WorkerSettings(device="cuda"))
        return build_pipeline(tiny_gpu_preset(graph), settings).pipe

    def latents(pipe: object) -> torch.Tensor:
        with find(pipe.transformer).run(parse_policy("magcache"), 12) as count:  # type: ignore[attr-defined]
            out = pipe(  # type: ignore[operator]
                "a red cat",
                width=64,
                height=64,
                num_inference_steps=12,
                generator=torch.Generator("cpu").manual_seed(1),
                output_type="latent",
            ).images
        assert count.reused > 0
        return out

    graphed, eager = build(True), build(False)
    # when both run 12 MagCache steps, the graphed one replays a full and a reuse graph and computes the same.
    ours = latents(graphed)
    forward = graphed.transformer.forward  # type: ignore[attr-defined]
    assert {key[0] for key in forward.graphs} >= {"full", "reuse"}
    torch.testing.assert_close(ours, latents(eager), rtol=1e-4, atol=1e-4)
