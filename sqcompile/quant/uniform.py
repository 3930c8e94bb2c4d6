"""Uniform codes and token scales, shared by both packings (`format.TensorFormat`, `fast_layout.FastLayout`)."""
from __future__ import annotations

import torch
from torch import Tensor

FP16_MAX = 65504.0


def uniform_codes(c: Tensor, step: float, bits: int) -> Tensor:
    """Nearest uniform level (ties up): floor(c / step + (2**bits - 1) / 2 + 1/2), clamped, int64.
    `FastLayout.encode` and `sqcompile::quantize_write_fast` compute exactly this."""
    code = torch.floor(c * (1.0 / step) + (((1 << bits) - 1) / 2 + 0.5))
    return torch.nan_to_num(code, nan=0.0).clamp(0, (1 << bits) - 1).to(torch.int64)


def token_normalize(xg: Tensor) -> tuple[Tensor, Tensor]:
    """A "token" group's scale s = fp16(rms(x_g)) (returned as float32) and c = x_g / s (s == 0: c = x_g).
    Both packings (`TensorFormat.encode`, `FastLayout.encode`) normalize with this."""
    s = xg.pow(2).mean(-1).sqrt().clamp(max=FP16_MAX).to(torch.float16).float()
    return xg / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1), s
