"""Pre-quantized checkpoints: ``python -m workers.tools.quantize --preset P --out DIR``.

Loads the preset's pipeline quantized (on the GPU when there is one: bitsandbytes quantizes only
there) and saves it with ``save_pretrained``; the components' configs carry the quantization
config, so a preset whose ``model`` is DIR loads it without quantizing again (workers.pipeline.loading
detects it). ``--dequantize`` saves the preset's weights back in its dtype where diffusers supports
it (bitsandbytes). ``--gguf Q8_0`` writes the transformer as a GGUF file instead: Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0 quantized by the ``gguf`` package, Q2_K by workers.tools.gguf_kquants (that package
only reads K-quants); not the other K-quants.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from fluxfleet.backends import BACKENDS, backend_spec
from fluxfleet.errors import ConfigurationError, FluxfleetError
from fluxfleet.presets import Preset, load_preset
from fluxfleet.settings import Settings

logger = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


def _load(preset: Preset, settings: Settings) -> Any:
    """The preset's pipeline, quantized, on the GPU if any (or the CPU), without compile."""
    from workers.pipeline.build import build_pipeline

    no_compile = preset.model_copy(update={"compile": preset.compile.model_copy(update={"enabled": False})})
    return build_pipeline(no_compile, settings).pipe


def save_quantized(preset: Preset, settings: Settings, out: Path) -> Path:
    if not backend_spec(preset.quantization.backend).serializable:
        serializable = [name for name, b in BACKENDS.items() if b.serializable and name != "none"]
        raise ConfigurationError(
            f"preset '{preset.name}': backend '{preset.quantization.backend}' does not serialize its quantized "
            f"weights; these do: {serializable}"
        )
    pipe = _load(preset, settings)
    pipe.save_pretrained(out)
    logger.info("saved %s quantized with %s to %s", preset.name, preset.quantization.backend, out)
    return out


def save_dequantized(preset: Preset, settings: Settings, out: Path) -> Path:
    if not backend_spec(preset.quantization.backend).dequantizable:
        dequantizable = tuple(name for name, b in BACKENDS.items() if b.dequantizable)
        raise ConfigurationError(
            f"preset '{preset.name}': diffusers dequantizes only {dequantizable}, not '{preset.quantization.backend}'"
        )
    pipe = _load(preset, settings)
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None and getattr(module, "hf_quantizer", None) is not None:
            module.dequantize()
            forget_quantization(module)
    pipe.save_pretrained(out)
    logger.info("saved %s dequantized to %s", preset.name, out)
    return out


def forget_quantization(module: Any) -> None:
    """Make a dequantized module save as a plain one.

    diffusers' ``dequantize()`` (0.42) restores the weights but keeps the quantizer and the config's
    ``quantization_config``, so ``save_pretrained`` wrote a config that declares bitsandbytes weights next
    to plain ones, and loading the directory failed (seen on an H100). transformers' ``dequantize()``
    (5.17, T5) leaves the same two behind, in a config object rather than a frozen dict.
    """
    from diffusers.configuration_utils import FrozenDict

    module.hf_quantizer = None
    module.is_quantized = False
    if isinstance(module.config, FrozenDict):
        # register_to_config(quantization_config=None) cannot be saved (diffusers calls .to_dict() on it), so
        # the key goes, the way register_to_config itself replaces the frozen config.
        config = {k: v for k, v in module.config.items() if k != "quantization_config"}
        module._internal_dict = FrozenDict(config)
    elif hasattr(module.config, "quantization_config"):
        del module.config.quantization_config


def _quantize(array: Any, qtype: Any) -> Any:
    """GGUF bytes of ``array``: Q2_K by our numpy quantizer (the gguf package has none), the rest by gguf."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.Q2_K:
        from workers.tools.gguf_kquants import quantize_q2_k

        return quantize_q2_k(array)
    return gguf.quants.quantize(array, qtype)


def write_gguf(transformer_dir: Path, out: Path, quant_type: str) -> Path:
    """Quantize a diffusers transformer's weights into a GGUF file (2-D weights whose rows fit the block)."""
    import gguf
    from safetensors import safe_open

    qtype = getattr(gguf.GGMLQuantizationType, quant_type.upper(), None)
    if qtype is None:
        raise ConfigurationError(f"--gguf '{quant_type}' is not a GGML quantization type")
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(out), arch="flux")
    for shard in sorted(Path(transformer_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                array = f.get_tensor(key).float().numpy()
                if array.ndim == 2 and array.shape[-1] % block == 0:
                    try:
                        writer.add_tensor(key, _quantize(array, qtype), raw_dtype=qtype)
                        continue
                    except NotImplementedError as e:
                        raise ConfigurationError(f"the gguf package cannot quantize to {quant_type}: {e}") from e
                writer.add_tensor(key, array)  # norms, biases, odd shapes: kept in float32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.tools.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dequantize", action="store_true", help="save the weights back in the preset's dtype")
    parser.add_argument(
        "--gguf",
        metavar="TYPE",
        help="write the transformer as a GGUF file of this type (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 or Q2_K)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings()
    try:
        preset = load_preset(args.preset, settings.presets_dir)
        if args.gguf:
            source = Path(preset.model_source(settings))
            write_gguf(source / "transformer", args.out, args.gguf)
        elif args.dequantize:
            save_dequantized(preset, settings, args.out)
        else:
            save_quantized(preset, settings, args.out)
    except FluxfleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
