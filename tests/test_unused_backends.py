"""A worker keeps the quantization packages its preset does not use out of its process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fluxfleet.presets import load_preset
from fluxfleet.settings import Settings
from tests.conftest import run_python
from workers.pipeline.unused_packages import packages_needed


@pytest.mark.parametrize(
    ("preset", "needed"),
    [
        ("bf16", set()),
        ("fp8-layerwise", set()),
        ("bnb-nf4", {"bitsandbytes"}),
        ("lean", {"bitsandbytes"}),
        ("torchao-int8wo", {"torchao"}),
        ("fast", set()),  # both of its [speed] fp8 levers are the plain ones (workers/speed/fp8_linear.py)
        ("torchao-fp8-dynamic-row", {"torchao"}),
        ("quanto-int8", set()),
    ],
)
def test_packages_needed_follow_the_preset(preset: str, needed: set[str]) -> None:
    assert packages_needed(load_preset(preset, Settings().presets_dir)) == needed


CHILD = """
import json, sys
from fluxfleet.presets import effective_defaults, load_preset
from fluxfleet.settings import Settings
from workers.pipeline.unused_packages import keep_unused_backends_out

settings = Settings()
preset = load_preset("tiny", settings.presets_dir)
hidden = keep_unused_backends_out(preset)
from workers.pipeline.build import build_pipeline
loaded = build_pipeline(preset, settings)
image = loaded.pipe(prompt="a cat", num_inference_steps=1, width=64, height=64, output_type="np").images[0]
loaded_modules = {name: sys.modules.get(name) is not None for name in ("bitsandbytes", "torchao")}
print(json.dumps({"hidden": hidden, "loaded": loaded_modules, "shape": list(image.shape)}))
"""


def test_a_plain_preset_loads_and_generates_without_bitsandbytes_or_torchao(tiny_model_dir: Path) -> None:
    # Given a fresh process (as the worker's pool child) serving the tiny preset, which quantizes nothing,
    env = dict(os.environ, FLUXFLEET_MODEL_DIR=str(tiny_model_dir), FLUXFLEET_WORKER__DEVICE="cpu")
    result = json.loads(run_python(CHILD, env=env))
    # when it hides the packages it does not need, then diffusers still loads the pipeline and it generates,
    assert result["hidden"] == ["bitsandbytes", "torchao"]
    assert result["shape"] == [64, 64, 3]
    # and neither package was imported along the way.
    assert result["loaded"] == {"bitsandbytes": False, "torchao": False}


def test_nothing_is_hidden_once_diffusers_is_imported() -> None:
    code = (
        "import diffusers\nfrom fluxfleet.presets import load_preset\nfrom fluxfleet.settings import Settings\n"
        "from workers.pipeline.unused_packages import keep_unused_backends_out\n"
        "print(keep_unused_backends_out(load_preset('tiny', Settings().presets_dir)))"
    )
    assert run_python(code) == "[]"
