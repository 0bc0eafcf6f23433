"""A tiny random-weight FLUX pipeline, built locally, for tests and the demo.

It uses the same classes as FLUX.1-dev (FluxTransformer2DModel, CLIP and T5 encoders, AutoencoderKL,
FlowMatchEulerDiscreteScheduler) at toy sizes, with tokenizers built from a small word list instead
of downloaded, saved with ``save_pretrained`` so workers load it through the real ``from_pretrained``
path. Every component is put in ``.eval()`` so a seed always gives the same image.
"""

from __future__ import annotations

import json
import logging
import shutil
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VOCAB_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "at",
    "by",
    "over",
    "under",
    "near",
    "from",
    "to",
    "style",
    "photo",
    "painting",
    "portrait",
    "city",
    "street",
    "palace",
    "forest",
    "river",
    "mountain",
    "sea",
    "sky",
    "night",
    "day",
    "light",
    "dark",
    "red",
    "blue",
    "green",
    "gold",
    "silver",
    "black",
    "white",
    "cat",
    "dog",
    "bird",
    "horse",
    "robot",
    "ship",
    "car",
    "train",
    "house",
    "tower",
    "bridge",
    "garden",
    "lamp",
    "rain",
    "snow",
    "fire",
    "water",
    "stone",
    "glass",
    "wood",
    "metal",
    "flower",
    "tree",
    "cloud",
    "star",
    "moon",
    "sun",
]
TINY_SEED = 0


def _clip_tokenizer_files(directory: Path) -> None:
    """A byte-level BPE vocabulary: every printable character plus the word list, no merges needed
    beyond those that spell the words."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[str] = []
    for word in VOCAB_WORDS:
        current = word[0]
        for i, char in enumerate(word[1:], start=1):
            nxt = char + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{current} {nxt}")
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    merges = list(dict.fromkeys(merges))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab_file=str(directory / "vocab.json"),
        merges_file=str(directory / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)


def _t5_tokenizer(directory: Path) -> int:
    """A Unigram tokenizer (T5's kind) over the word list and single characters; returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += [f"\u2581{w}" for w in VOCAB_WORDS] + list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces.append("\u2581")
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(dict.fromkeys(pieces))]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    directory.mkdir(parents=True, exist_ok=True)
    fast = T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )
    fast.save_pretrained(directory)
    return len(vocab)


@dataclass(frozen=True)
class FluxArchitecture:
    """Constructor arguments of the pipeline's models; the text encoders' vocabularies default to the
    locally built tokenizers' sizes."""

    transformer: dict[str, Any]
    clip: dict[str, Any]
    t5: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=dict)


TINY = FluxArchitecture(
    transformer=dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    ),
    clip=dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        max_position_embeddings=77,
    ),
    t5=dict(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0
    ),
    vae=dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ),
)


def build_flux_pipeline(
    directory: Path,
    architecture: FluxArchitecture,
    *,
    device: str = "cpu",
    dtype: Any = None,
    init_std: float | None = None,
) -> Path:
    """Build a random-weight FLUX pipeline of ``architecture``, eval it and save it in diffusers format.

    ``device``/``dtype`` say where and in which dtype the weights are created (the full-size benchmark model
    is made on the GPU in bfloat16); ``init_std`` redraws every weight from N(0, init_std) instead of the
    classes' own initialisation (which leaves some layers at zero).
    """
    from workers.pipeline.loading import quiet_libraries

    quiet_libraries()  # no "Writing model shards" bars in the demo's output
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    directory = Path(directory)
    tmp = directory / ".tokenizers"
    _clip_tokenizer_files(tmp / "clip")
    t5_vocab = _t5_tokenizer(tmp / "t5")
    clip_vocab = len(json.loads((tmp / "clip" / "vocab.json").read_text()))

    torch.manual_seed(TINY_SEED)
    previous_dtype = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**architecture.transformer)
            text_encoder = CLIPTextModel(CLIPTextConfig(**{"vocab_size": clip_vocab, **architecture.clip}))
            text_encoder_2 = T5EncoderModel(T5Config(**{"vocab_size": t5_vocab, **architecture.t5}))
            vae = AutoencoderKL(**architecture.vae)
    finally:
        torch.set_default_dtype(previous_dtype)
    models = {"transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae}
    for module in models.values():
        if dtype is not None:
            module.to(dtype=dtype)  # buffers a class creates in float32 regardless of the default dtype
        if init_std is not None:
            with torch.no_grad():
                for parameter in module.parameters():
                    parameter.normal_(0, init_std)
        module.eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**architecture.scheduler),
        tokenizer=CLIPTokenizer.from_pretrained(tmp / "clip"),
        tokenizer_2=T5TokenizerFast.from_pretrained(tmp / "t5"),
        **models,
    )
    pipe.save_pretrained(directory)
    shutil.rmtree(tmp)
    sizes = ", ".join(f"{name} {sum(p.numel() for p in m.parameters()) / 1e9:.2f}B" for name, m in models.items())
    logger.info("saved a random-weight FLUX pipeline (%s) to %s", sizes, directory)
    return directory


def build_tiny_pipeline(directory: Path) -> Path:
    """Build, eval and save the tiny pipeline under ``directory``; returns the directory."""
    return build_flux_pipeline(directory, TINY)


def keep_quantization_packages_out() -> None:
    """Make bitsandbytes and torchao look absent to diffusers and transformers in this process.

    Building the model calls neither, and importing them printed their own notices ("Failed to load CPU
    gemm_4bit_forward", torchao's "Failed to load ..._C_mxfp8...", "Detected no triton") into the demo's
    output. Only for a process of its own: see workers.pipeline.unused_packages.
    """
    from workers.pipeline.unused_packages import OPTIONAL_PACKAGES

    if "diffusers" not in sys.modules:
        for package in OPTIONAL_PACKAGES:
            sys.modules.setdefault(package, None)  # type: ignore[arg-type]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keep_quantization_packages_out()
    if len(sys.argv) != 2:
        sys.exit("usage: python -m workers.tools.tiny_model DIRECTORY")
    build_tiny_pipeline(Path(sys.argv[1]))
