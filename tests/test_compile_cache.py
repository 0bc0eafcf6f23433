"""A worker starting from the shared compile cache skips AOT tracing for blocks that pick their SDPA kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import run_python

# One "worker" compiles and saves the artifacts; the cache directories are emptied and dynamo reset (a new
# host of the fleet), then the artifacts are loaded and the same function compiled again.
PROBE = """
import json, os, shutil, sys
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

if sys.argv[1] == "marked":
    from workers.speed.compile_cache import SDPA_KERNEL_HELPERS
    for helper in SDPA_KERNEL_HELPERS:
        torch._inductor.config.unsafe_marked_cacheable_functions[helper] = torch.__version__

def block(q):
    with sdpa_kernel(SDPBackend.MATH):  # as diffusers' _native_* attention backends do
        return F.scaled_dot_product_attention(q, q, q).relu() + 1

q = torch.randn(1, 2, 16, 8)
torch.compile(block)(q)
artifacts, _ = torch.compiler.save_cache_artifacts()
torch._dynamo.reset()
counters.clear()
shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"])
torch.compiler.load_cache_artifacts(artifacts)
torch.compile(block)(q)
print(json.dumps(dict(counters["aot_autograd"])))
"""


def aot_counters(mode: str, tmp_path: Path) -> dict[str, int]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / mode), OMP_NUM_THREADS="1")
    return json.loads(run_python(PROBE, mode, env=env, timeout=600))


def test_marked_sdpa_helpers_let_aot_autograd_reuse_the_cache(tmp_path: Path) -> None:
    # Given a compiled block that picks its attention kernel, its artifacts saved and loaded on a fresh host,
    # then without the marking AOTAutograd refuses its cache (and would trace the block again),
    assert aot_counters("unmarked", tmp_path).get("autograd_cache_bypass") == 1
    # and with the helpers marked cacheable the second compile is served from it.
    assert aot_counters("marked", tmp_path) == {"total": 1, "autograd_cache_hit": 1, "ok": 1}
