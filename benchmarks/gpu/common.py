"""What the GPU benchmark's steps share: the FLUX.1-dev shapes, timing and memory helpers, the items they generate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent

TRANSFORMER_CFG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
RES = int(os.environ.get("BENCH_RES", "1024"))
SEQ = int(os.environ.get("BENCH_SEQ", "512"))
PROMPT = "a photo of a red cat on a wooden bridge over a river at night"
GiB = 2**30


def log(*a: Any) -> None:
    print(*a, flush=True)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def DEV() -> str:
    return "cuda" if cuda() else "cpu"


class Capture:
    """An Observer that keeps the stage times of the last pipeline call."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def stage(self, stage: str, seconds: float, images: int = 1) -> None:
        self.stages[stage] = seconds

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def items(steps: int, n: int = 1, width: int = RES, height: int = RES, cache: str = "none") -> list[Any]:
    from fluxfleet.schema import GenerationParams, Item

    params = GenerationParams(
        width=width, height=height, steps=steps, guidance=3.5, max_sequence_length=SEQ, cache=cache
    )
    import hashlib

    return [
        Item(index=i, prompt=PROMPT, seed=i, params=params, key=hashlib.sha1(f"bench{i}".encode()).hexdigest())
        for i in range(n)
    ]


def transformer_inputs(tr: Any, dtype: Any) -> dict[str, Any]:
    """The exact argument set FluxPipeline passes at RES x RES (so compiled graphs are reused)."""
    import torch

    device = DEV()
    cfg = tr.config
    g = torch.Generator("cpu").manual_seed(1234)
    n = (RES // 16) ** 2
    ids = torch.zeros(RES // 16, RES // 16, 3)
    ids[..., 1] = torch.arange(RES // 16)[:, None]
    ids[..., 2] = torch.arange(RES // 16)[None, :]
    bf = dtype
    return dict(
        hidden_states=torch.randn(1, n, cfg.in_channels, generator=g).to(device, bf),
        timestep=torch.full((1,), 0.5).to(device, bf),
        guidance=torch.full((1,), 3.5, dtype=torch.float32, device=device),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, bf),
        encoder_hidden_states=torch.randn(1, SEQ, cfg.joint_attention_dim, generator=g).to(device, bf),
        txt_ids=torch.zeros(SEQ, 3).to(device, bf),
        img_ids=ids.reshape(-1, 3).to(device, bf),
        joint_attention_kwargs=None,
        return_dict=False,
    )


def rel_err(a: Any, b: Any) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


def mem(what: str) -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    if what == "reset":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return {
        "alloc": torch.cuda.memory_allocated,
        "reserved": torch.cuda.memory_reserved,
        "peak": torch.cuda.max_memory_allocated,
        "peak_reserved": torch.cuda.max_memory_reserved,
    }[what]()


def records_table(records: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """A markdown table of ``records``: one column per (key, heading), blank where a record lacks the key."""
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)
