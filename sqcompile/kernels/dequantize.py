"""`sqcompile::dequantize_packed`: packed cache rows -> storage coordinates (torch ops; any device).

Used by `SpectralCache` for eager attention and for prefill; the compiled decode path never calls it (the
substitution pass replaces it with `decode_attention`, which reads the codes directly).
"""
from __future__ import annotations

import torch

from ._bitplanes import format_from_args


@torch.library.custom_op("sqcompile::dequantize_packed", mutates_args=())
def dequantize_packed(packed: torch.Tensor, codebooks: torch.Tensor, channel_scale: torch.Tensor, groups: list[int],
                      head_dim: int) -> torch.Tensor:
    """packed [B, Hkv, T, row_bytes] uint8 -> float32 [B, Hkv, T, head_dim] in the storage basis."""
    from sqcompile.quant import packing

    fmt = format_from_args(head_dim, groups, codebooks, channel_scale)
    row_bytes = fmt.bytes_per_token()
    rows = packed[..., :row_bytes] if packed.shape[-1] != row_bytes else packed
    codes, scales, _, _ = packing.unpack(fmt, rows.contiguous())
    like = torch.empty(*packed.shape[:3], head_dim, device=packed.device, dtype=torch.float32)
    return fmt.decode(codes, scales, like).to(torch.float32).contiguous()


@dequantize_packed.register_fake
def _(packed, codebooks, channel_scale, groups, head_dim):
    return packed.new_empty((*packed.shape[:3], head_dim), dtype=torch.float32)


@torch.library.custom_op("sqcompile::fake_quant", mutates_args=())
def fake_quant(x_store: torch.Tensor, codebooks: torch.Tensor, channel_scale: torch.Tensor, groups: list[int],
               head_dim: int) -> torch.Tensor:
    """Quantize then dequantize [B, Hkv, T, d] storage coordinates with one format (the simulated cache write)."""
    fmt = format_from_args(head_dim, groups, codebooks, channel_scale)
    return fmt.fake_quant(x_store.to(torch.float32)).to(x_store.dtype).contiguous()


@fake_quant.register_fake
def _(x_store, codebooks, channel_scale, groups, head_dim):
    return torch.empty_like(x_store, memory_format=torch.contiguous_format)
