"""The lean preset's ``quantize_t5_wo``: T5's feed-forward output layers in 4-bit, on the CPU.

bitsandbytes quantizes a ``Params4bit`` when it is moved, on the CPU as on a GPU, so the direct path runs
here on the tiny pipeline's T5; loading through diffusers' bitsandbytes config needs CUDA (test_backends).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxfleet.errors import ConfigurationError
from fluxfleet.presets import Preset

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")


def bnb_preset(**options: object) -> Preset:
    return Preset.model_validate(
        {
            "name": "test-bnb",
            "model": "unused",
            "quantization": {
                "backend": "bitsandbytes",
                "components": ["transformer", "text_encoder_2"],
                "options": {"bits": 4, "quant_type": "nf4", **options},
            },
        }
    )


def test_t5_wo_layers_become_4bit_and_the_encoding_stays_close(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb
    from transformers import T5EncoderModel

    from workers.pipeline.backends.bitsandbytes import config_kwargs, quantize_t5_wo

    encoder = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder_2", torch_dtype=torch.bfloat16).eval()
    ids = torch.arange(3, 19).reshape(1, 16)
    with torch.inference_mode():
        reference = encoder(ids)[0].float()
    layers = encoder.config.num_layers
    wo_bytes_before = sum(block.wo.weight.numel() * 2 for block in encoder.modules() if hasattr(block, "wo"))

    replaced = quantize_t5_wo(encoder, config_kwargs(bnb_preset(quantize_t5_wo=True), torch.bfloat16))

    wos = [block.wo for block in encoder.modules() if hasattr(block, "wo")]
    assert replaced == layers == len(wos)
    assert all(isinstance(wo, bnb.nn.Linear4bit) and wo.weight.bnb_quantized for wo in wos)
    # packed 4-bit values held in a bfloat16 tensor: a quarter of the bf16 bytes
    assert sum(wo.weight.numel() * 2 for wo in wos) == wo_bytes_before // 4
    assert all(wo.weight.dtype == torch.bfloat16 for wo in wos)  # T5 casts its input to this dtype
    with torch.inference_mode():
        quantized = encoder(ids)[0].float()
    error = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.15, error  # NF4 on random weights; 0 would mean nothing was quantized
    assert quantize_t5_wo(encoder, config_kwargs(bnb_preset(), torch.bfloat16)) == 0  # already 4-bit


@pytest.mark.parametrize(
    "options, components",
    [({"bits": 8}, ["transformer", "text_encoder_2"]), ({}, ["transformer"])],
)
def test_quantize_t5_wo_refused_where_it_cannot_apply(options: dict, components: list[str]) -> None:
    from workers.pipeline.backends.bitsandbytes import config_kwargs

    preset = bnb_preset(quantize_t5_wo=True, **options)
    preset = preset.model_copy(
        update={"quantization": preset.quantization.model_copy(update={"components": components})}
    )
    with pytest.raises(ConfigurationError, match="quantize_t5_wo needs bits = 4"):
        config_kwargs(preset, torch.bfloat16)
