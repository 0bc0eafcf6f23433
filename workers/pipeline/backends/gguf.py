"""GGUF: a pre-quantized transformer file (Q2_K, Q4_1, Q8_0, ...) through ``from_single_file``.

The preset's ``single_file`` is a local path or a URL; the rest of the pipeline (and the
transformer's config, so nothing is fetched for it) comes from ``model``. Options:
``compute_dtype`` (default: the preset's dtype) and ``quant_type`` (used by the planner and
checked against the file's tensors when it is local).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fluxfleet.errors import ConfigurationError, ModelLoadError
from fluxfleet.presets import Preset
from workers.pipeline.backends.mapping import check_options, torch_dtype

GGUF_MAGIC = b"GGUF"


def check_gguf_file(preset: Preset) -> str:
    """The preset's GGUF source; a local one must exist and start with the GGUF magic bytes."""
    source = preset.single_file
    if not source:
        raise ConfigurationError(f"preset '{preset.name}': backend 'gguf' needs single_file (a .gguf path or URL)")
    if source.startswith(("http://", "https://")):
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"preset '{preset.name}': single_file '{source}' does not exist")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"preset '{preset.name}': single_file '{source}' is not a GGUF file")
    return str(path)


def file_quant_types(path: str) -> set[str]:
    """Names of the quantization types of the file's tensors (e.g. {'Q8_0', 'F32'})."""
    import gguf

    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def pipeline_kwargs(preset: Preset, dtype: Any, source: str) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    opts = check_options(preset, {"compute_dtype", "quant_type"})
    path = check_gguf_file(preset)
    expected = opts.get("quant_type")
    if expected and not path.startswith("http") and expected.upper() not in file_quant_types(path):
        raise ConfigurationError(
            f"preset '{preset.name}': quantization.options.quant_type '{expected}' is not in {path} "
            f"(it holds {sorted(file_quant_types(path))})"
        )
    compute = opts.get("compute_dtype")
    compute_dtype = torch_dtype(compute, preset, "compute_dtype") if compute else dtype
    transformer = FluxTransformer2DModel.from_single_file(
        path,
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        torch_dtype=dtype,
        config=source,  # the transformer config from the base model: nothing fetched for it
        subfolder="transformer",
    )
    return {"transformer": transformer}
