"""The random-weight pipeline builder shared by the tests' tiny model and the GPU benchmark's full-size one."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def test_builder_makes_weights_in_the_asked_dtype_and_spread(tmp_path: Path) -> None:
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from workers.tools.tiny_model import TINY, build_flux_pipeline

    # Given the tiny architecture built the way the benchmark builds FLUX.1-dev (bf16, N(0, 0.02) weights),
    build_flux_pipeline(tmp_path, TINY, dtype=torch.bfloat16, init_std=0.02)
    # then every saved weight is bf16, drawn with that spread, and the directory loads through from_pretrained.
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        saved = {k: v for f in sorted((tmp_path / name).glob("*.safetensors")) for k, v in load_file(f).items()}
        assert {t.dtype for t in saved.values()} == {torch.bfloat16}, name
        weights = torch.cat([t.float().flatten() for t in saved.values()])
        assert abs(weights.std().item() - 0.02) < 0.002, name
    assert not (tmp_path / ".tokenizers").exists()
    pipe = FluxPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
