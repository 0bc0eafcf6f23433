"""The fp8 format of fluxfleet's own fp8 layers and kernel: e4m3, its largest value, the smallest scale."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# A row of zeros would otherwise divide by a zero scale.
MIN_SCALE = 1e-12
