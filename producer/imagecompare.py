"""PSNR and SSIM between images, with numpy (the ``report`` extra); ``fluxfleet compare`` uses them.

SSIM is the standard one (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, on luma in [0, 255].
Numpy only, no torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _gaussian_filter(x: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """'valid' separable Gaussian filtering of a 2-D array."""
    r = np.arange(size) - (size - 1) / 2
    k = np.exp(-(r**2) / (2 * sigma**2))
    k /= k.sum()
    rows = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, x)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, rows)


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if min(a.shape) < 11:
        raise ValueError("images smaller than the 11x11 SSIM window")
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    saa = _gaussian_filter(a * a) - mu_a**2
    sbb = _gaussian_filter(b * b) - mu_b**2
    sab = _gaussian_filter(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)
    return float(np.mean(num / den))


def compare_sets(a: dict[str, Path], b: dict[str, Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in sorted(set(a) & set(b)):
        # Each image is decoded once: PSNR uses its RGB, SSIM the luma derived from it.
        rgb_a, rgb_b = load_rgb(a[name]), load_rgb(b[name])
        ya, yb = luma(rgb_a), luma(rgb_b)
        if ya.shape != yb.shape:
            rows.append({"name": name, "error": f"sizes differ: {ya.shape} vs {yb.shape}"})
            continue
        rows.append({"name": name, "psnr_db": psnr(rgb_a, rgb_b), "ssim": ssim(ya, yb)})
    return rows
