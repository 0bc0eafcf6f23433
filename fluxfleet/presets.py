"""Presets: a model variant is data (a TOML file in ``config/presets/``), never a code branch.

Usage::

    preset = load_preset("bf16", settings.presets_dir)
    preset.quantization.backend       # a backend declared in fluxfleet/backends/: "none", "bitsandbytes", ...
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from fluxfleet.backends import backend_spec
from fluxfleet.caching import parse_policy, preset_refusal
from fluxfleet.errors import ConfigurationError, UnknownPresetError, ValidationError
from fluxfleet.levers import refusals
from fluxfleet.settings import GenerationDefaults, Settings

PlacementPolicy = Literal["auto", "gpu", "balanced", "model_offload", "group_offload", "cpu"]

PRESET_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""A preset name names a file and a queue: lower case (so no two names share a file on a case-insensitive
disk), no '/' and no '..'."""


def is_preset_name(name: object) -> bool:
    return isinstance(name, str) and bool(PRESET_NAME_PATTERN.fullmatch(name)) and ".." not in name


def check_preset_name(name: str) -> str:
    """``name`` unchanged, or ``ValidationError`` if it is not a preset name (a path, say)."""
    if not is_preset_name(name):
        raise ValidationError(
            f"preset name {name!r} is not allowed: use 1-64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '/' or '..'",
            field="preset",
        )
    return name


class QuantizationSpec(BaseModel):
    """Which backend quantizes which components, with the backend's own options."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field("none", description="a backend declared in fluxfleet/backends/")
    components: list[str] = Field(default_factory=lambda: ["transformer", "text_encoder_2"])
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("backend")
    @classmethod
    def _declared(cls, value: str) -> str:
        backend_spec(value)  # ValueError naming the known backends
        return value


class PlacementSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: PlacementPolicy = "auto"
    group_offload_type: Literal["leaf_level", "block_level"] = "leaf_level"
    group_offload_use_stream: bool = True
    group_offload_components: list[str] = Field(default_factory=lambda: ["transformer"])
    num_blocks_per_group: int = Field(1, ge=1, description="blocks moved together at block_level")
    text_encoder_off_gpu_after_encode: bool = False


class CompileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    regional: bool = Field(True, description="compile the repeated transformer blocks, not the whole model")
    fullgraph: bool = True
    mode: str | None = None
    dynamic: bool = False


class WarmupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2, ge=1)
    shapes: list[tuple[int, int]] = Field(default_factory=list, description="(width, height); empty: defaults")


class SpeedSpec(BaseModel):
    """The ``[speed]`` levers' settings (declared in ``fluxfleet/levers.py``, applied by ``workers/speed/levers/``);
    every default leaves the pipeline as loaded."""

    model_config = ConfigDict(extra="forbid")

    attention_backend: str | None = Field(
        None, description="diffusers attention backend for the transformer, e.g. '_native_cudnn' (cuDNN SDPA)"
    )
    fuse_qkv: bool = Field(False, description="fuse the Q/K/V (and added Q/K/V) projections into one GEMM each")
    transformer_fp8: Literal["none", "dynamic_row", "weight_only", "dynamic_row_plain"] = Field(
        "none",
        description="float8 for the transformer's linear layers: torchao row-wise dynamic or weight-only, or"
        " 'dynamic_row_plain', the same row-wise dynamic arithmetic on torch._scaled_mm with plain tensors"
        " (no torchao tensor subclass; also runs, emulated, on a CPU)",
    )
    fp8_gelu_fusion: bool = Field(
        False,
        description="with transformer_fp8 = 'dynamic_row_plain': apply each GELU that feeds an fp8 linear while"
        " quantizing that linear's input, in one pass over memory (workers/speed/fp8_fusion.py)",
    )
    text_encoder_2_fp8: Literal["none", "dynamic_row", "weight_only", "weight_only_plain"] = Field(
        "none",
        description="float8 for T5's linear layers: torchao row-wise dynamic or weight-only, or"
        " 'weight_only_plain', per-row fp8 weights computed in bf16 without torchao (both weight-only"
        " schemes halve T5's memory)",
    )
    vae_tiling: bool = Field(False, description="decode the VAE in tiles (lower peak memory, slight seams)")
    compile_vae_decoder: bool = False
    coordinate_descent_tuning: bool = Field(
        False, description="let inductor tune its fused elementwise/reduction kernels (longer first compile)"
    )
    multi_kernel: bool = Field(
        False,
        description="inductor multi-kernel: also build single-pass (persistent) row reductions up to 16K wide and"
        " keep the faster variant by timing (the fp8 quantization of the 12288/15360-wide MLP inputs)",
    )
    cuda_graph: bool = Field(
        False,
        description="replay the transformer's whole forward as one CUDA graph per input shape (CUDA only;"
        " the pipeline must sit on one GPU; with compile, only regional)",
    )
    cuda_graph_limit: int = Field(4, ge=1, description="input shapes captured before further shapes run without")
    compile_cache: bool = Field(False, description="load/save compiled artifacts in a shared cache directory")
    compile_cache_dir: str | None = Field(
        None, description="shared cache directory; FLUXFLEET_COMPILE_CACHE_DIR overrides; default ~/.cache/fluxfleet"
    )
    recompile_limit: int = Field(8, ge=1, description="recompiles allowed per compiled block before eager fallback")
    warm_up: bool = Field(
        True,
        description="warm up (compile) at the warm-up shapes when the pipeline is built, even where the worker's own"
        " warm-up is off, so the compile cache is saved with them; a start warms up once either way",
    )

    @property
    def enabled(self) -> bool:
        return self != SpeedSpec()


class AdaptersSpec(BaseModel):
    """Per-item LoRA adapters (``fluxfleet.adapters``): the largest rank an adapter file may have."""

    model_config = ConfigDict(extra="forbid")

    max_rank: int = Field(64, ge=1, le=1024, description="largest LoRA rank accepted; the hot-swap target rank")


class EstimateSpec(BaseModel):
    """Whether the planner's memory estimate applies: it counts FLUX.1-dev's parameters, whatever the model."""

    model_config = ConfigDict(extra="forbid")

    applies: bool = Field(True, description="false for a model that is not FLUX.1-dev-sized (a local toy model)")
    reason: str = Field("", description="why there is no estimate; shown in its place")


class Preset(BaseModel):
    """One worker configuration: model, quantization, placement, compile and generation defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    model: str = Field(description="hub id or local directory in diffusers format")
    single_file: str | None = Field(None, description="a .gguf/.safetensors transformer (path or URL)")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_items_per_task: int = Field(4, ge=1, le=256)
    batch_size: int = Field(1, ge=1, description="images per pipeline call inside a task")
    quantization: QuantizationSpec = QuantizationSpec()
    placement: PlacementSpec = PlacementSpec()
    compile: CompileSpec = CompileSpec()
    warmup: WarmupSpec = WarmupSpec()
    speed: SpeedSpec = SpeedSpec()
    estimate: EstimateSpec = EstimateSpec()
    adapters: AdaptersSpec = AdaptersSpec()
    defaults: dict[str, Any] = Field(default_factory=dict, description="overrides of GenerationDefaults")

    @field_validator("name")
    @classmethod
    def _is_a_name(cls, value: str) -> str:
        # A TOML's own 'name' names the queue too.
        if not is_preset_name(value):
            raise ValueError(f"{value!r} is not a preset name (lower-case letters, digits, '.', '_', '-'; no '..')")
        return value

    @model_validator(mode="after")
    def _parts_combine(self) -> Preset:
        # The backend and each lever declare what they refuse (fluxfleet/backends/, fluxfleet/levers.py);
        # load_preset names the file. Placement policies the planner judges, with the free memory.
        refuses = backend_spec(self.quantization.backend).refuses
        asked = {"compile": self.compile.enabled, "cuda_graph": self.speed.cuda_graph}
        problems = [
            f"quantization.backend '{self.quantization.backend}' refuses {what}: {refuses[what]}"
            for what, on in asked.items()
            if on and what in refuses
        ]
        problems += refusals(self)
        problems += self._cache_refusal()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _cache_refusal(self) -> list[str]:
        if "cache" not in self.defaults:
            return []
        try:
            policy = parse_policy(self.defaults["cache"], field="defaults.cache")
        except ValidationError as e:
            return [str(e)]
        refusal = preset_refusal(policy, self)
        return [f"defaults.cache: {refusal}"] if refusal else []

    def model_source(self, settings: Settings) -> str:
        """The model to load: ``FLUXFLEET_MODEL_DIR`` overrides the preset's own source."""
        return str(settings.model_dir) if settings.model_dir else self.model


def preset_names(presets_dir: Path) -> list[str]:
    """The presets in ``presets_dir``: its ``*.toml`` files whose stem is a preset name."""
    return sorted(p.stem for p in presets_dir.glob("*.toml") if is_preset_name(p.stem))


def load_preset(name: str, presets_dir: Path) -> Preset:
    """Read ``<presets_dir>/<name>.toml``; an unknown name, or one that is not a name (a path), lists the
    known ones."""
    # Checked before the name touches the file system: '../../tmp/evil' would load /tmp/evil.toml.
    if not is_preset_name(name):
        raise UnknownPresetError(str(name), preset_names(presets_dir))
    path = presets_dir / f"{name}.toml"
    if not path.is_file():
        raise UnknownPresetError(name, preset_names(presets_dir))
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{path}: {e}") from e
    data.setdefault("name", name)
    try:
        return Preset.model_validate(data)
    except PydanticValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigurationError(f"preset file {path}: {problems}") from e


def effective_defaults(preset: Preset, settings: Settings) -> GenerationDefaults:
    """Defaults < preset TOML < environment (only the fields the environment actually set)."""
    merged = GenerationDefaults().model_dump()
    merged.update(preset.defaults)
    merged.update(settings.defaults.model_dump(include=settings.defaults.model_fields_set))
    return GenerationDefaults.model_validate(merged)
