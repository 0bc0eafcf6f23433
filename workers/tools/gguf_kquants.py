"""GGML's Q2_K quantization in numpy: the ``gguf`` package dequantizes K-quants but cannot write them.

A Q2_K block holds QK_K=256 values as 16 sub-blocks of 16, in 84 bytes, in this order (ggml's
``block_q2_K``): ``scales[16]`` (low nibble: the sub-block's 4-bit scale, high nibble: its 4-bit
min), ``qs[64]`` (2-bit quants), ``d`` and ``dmin`` (fp16). A value is ``d*(sc&0xF)*q - dmin*(sc>>4)``.
Value ``h*128 + j*32 + l`` of a block (h < 2, j < 4, l < 32) is bits ``2j..2j+1`` of ``qs[h*32 + l]``,
which is how ``gguf.quants.Q2_K`` and diffusers' ``dequantize_blocks_Q2_K`` unpack it.

Scales come from each sub-block's min and max, not ggml's iterative search: a little less accurate,
the same format.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q2_K_TYPE_SIZE = QK_K // 16 + QK_K // 4 + 2 + 2  # scales, qs, d, dmin: 84 bytes
CHUNK_BLOCKS = 1 << 14  # bounds the float32 temporaries to a few tens of MB on large tensors


def quantize_q2_k(array: np.ndarray) -> np.ndarray:
    """``array`` (last dim a multiple of 256) as Q2_K bytes: uint8 of shape ``(*rows, last // 256 * 84)``,
    what ``GGUFWriter.add_tensor(..., raw_dtype=GGMLQuantizationType.Q2_K)`` takes."""
    if array.shape[-1] % QK_K:
        raise ValueError(f"Q2_K needs rows that are a multiple of {QK_K}, not {array.shape[-1]}")
    blocks = np.ascontiguousarray(array, dtype=np.float32).reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], Q2_K_TYPE_SIZE), dtype=np.uint8)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        out[start : start + CHUNK_BLOCKS] = _quantize_blocks(blocks[start : start + CHUNK_BLOCKS])
    return out.reshape(*array.shape[:-1], array.shape[-1] // QK_K * Q2_K_TYPE_SIZE)


def _quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    # The format subtracts a non-negative min, so a sub-block's offset can only go down to 0 (as in ggml).
    low = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - low) / 3.0
    mins = -low
    # Super-block scales, rounded to fp16 first so the 4-bit sub-scales are fitted to what is stored.
    d = (scale.max(axis=-1) / 15.0).astype(np.float16)
    dmin = (mins.max(axis=-1) / 15.0).astype(np.float16)
    sc = _nibbles(scale, d)
    m = _nibbles(mins, dmin)
    # Quants from the scales as the reader will see them, so rounding in d/sc is absorbed rather than added.
    dl = d.astype(np.float32)[:, None] * sc
    ml = dmin.astype(np.float32)[:, None] * m
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(dl[..., None] > 0, np.rint((sub + ml[..., None]) / dl[..., None]), 0.0)
    q = np.clip(q, 0, 3).astype(np.uint8).reshape(n, 2, 4, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return np.concatenate(
        [
            (sc.astype(np.uint8) | (m.astype(np.uint8) << 4)),
            qs.reshape(n, 64),
            d.reshape(n, 1).view(np.uint8),
            dmin.reshape(n, 1).view(np.uint8),
        ],
        axis=1,
    )


def _nibbles(values: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``values`` (n, 16) in units of ``step`` (n,), rounded to 0..15; 0 where the step is 0."""
    step32 = step.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(step32 > 0, np.clip(np.rint(values / step32), 0, 15), 0.0).astype(np.float32)
