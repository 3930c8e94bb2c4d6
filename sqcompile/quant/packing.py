"""Packed byte layout of one (token, kv-head) of K or V. Kernels read these bytes directly.

A packed cache is uint8 [B, kv_heads, S, bytes_per_token]. For one (token, kv-head), in order:

1. For each group of `TensorFormat.groups`, in group order, its codes as BIT-PLANES: with
   n = stop - start and P = ceil(n / 8) bytes per plane, plane p (p = 0 .. bits-1, least significant
   first) holds bit p of every code of the group; coordinate j of the group (storage dim start + j)
   is at byte j // 8, bit j % 8 (LSB first) of that plane. Padding bits are 0. A 0-bit group takes
   no bytes. So group g starts at sum over earlier groups of bits * P.
2. The fp16 token scales of the groups with scale == "token" and bits > 0, in group order,
   2 bytes each, little-endian IEEE half.
3. If qjl_bits = m > 0: the QJL sign bits, ceil(m / 8) bytes, sketch row i at byte i // 8,
   bit i % 8; bit 1 means (S r)_i >= 0 (sign +1), 0 means sign -1. Padding bits are 0.
4. If m > 0: the QJL residual norm ||r||, fp16, 2 bytes little-endian.

bytes_per_token is the total; it is what `TensorFormat.bytes_per_token()` counts.

Decoding coordinate j of group g:  code = sum_p bit_p << p;  c = codebook_g[code];
x_store[j] = c * token_scale_g  (scale "token")  or  c * channel_scale[kv_head, j]  (scale "channel").
A 0-bit group decodes to 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .format import TensorFormat

def pack_bits(bits: Tensor) -> Tensor:
    """{0,1} integers [..., n] -> uint8 [..., ceil(n/8)], element j at byte j//8, bit j%8."""
    n = bits.shape[-1]
    nb = (n + 7) // 8
    b = bits.to(torch.int32)
    if nb * 8 != n:
        b = torch.nn.functional.pad(b, (0, nb * 8 - n))
    b = b.reshape(b.shape[:-1] + (nb, 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=bits.device)
    return (b * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """uint8 [..., ceil(n/8)] -> int64 {0,1} [..., n] (inverse of `pack_bits`)."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    b = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return b.reshape(packed.shape[:-1] + (packed.shape[-1] * 8,))[..., :n].to(torch.int64)


def fp16_to_bytes(x: Tensor) -> Tensor:
    """float [...] -> uint8 [..., 2]: the little-endian bytes of x rounded to fp16."""
    v = x.to(torch.float16).view(torch.int16).to(torch.int32)
    return torch.stack([v & 0xFF, (v >> 8) & 0xFF], -1).to(torch.uint8)


def bytes_to_fp16(b: Tensor) -> Tensor:
    """uint8 [..., 2] little-endian -> float32 [...]."""
    v = b[..., 0].to(torch.int32) | (b[..., 1].to(torch.int32) << 8)
    v = torch.where(v >= 32768, v - 65536, v)
    return v.to(torch.int16).view(torch.float16).float()


def pack(fmt: TensorFormat, codes: list[Optional[Tensor]], scales: list[Optional[Tensor]],
         qjl_signs: Optional[Tensor] = None, qjl_norm: Optional[Tensor] = None) -> Tensor:
    """Codes/scales from `TensorFormat.encode` (+ QJL signs {0,1} [..., m] and norm [...]) -> uint8."""
    if fmt.packing == "fast":  # codes packed inside bytes (fast_layout.py); no QJL
        return fmt.fast_layout().pack(codes, scales)
    segments = []
    for g, code in zip(fmt.groups, codes):
        for p in range(g.bits):
            segments.append(pack_bits((code >> p) & 1))
    for g, s in zip(fmt.groups, scales):
        if g.stores_scale:
            segments.append(fp16_to_bytes(s))
    if fmt.qjl_bits > 0:
        if qjl_signs is None or qjl_norm is None:
            raise ValueError("this format has a QJL sketch: pass qjl_signs and qjl_norm")
        segments.append(pack_bits(qjl_signs))
        segments.append(fp16_to_bytes(qjl_norm))
    return torch.cat(segments, -1)


def unpack(fmt: TensorFormat, packed: Tensor):
    """uint8 [..., bytes_per_token] -> (codes, scales, qjl_signs {0,1} or None, qjl_norm or None)."""
    if packed.shape[-1] != fmt.bytes_per_token():
        raise ValueError(f"packed tokens have {packed.shape[-1]} bytes, the format has {fmt.bytes_per_token()}")
    if fmt.packing == "fast":
        codes, scales = fmt.fast_layout().unpack(packed)
        return codes, scales, None, None
    at = 0
    codes: list[Optional[Tensor]] = []
    for g in fmt.groups:
        if g.bits == 0:
            codes.append(None)
            continue
        code = None
        for p in range(g.bits):
            plane = unpack_bits(packed[..., at:at + g.plane_bytes], g.size) << p
            code = plane if code is None else code | plane
            at += g.plane_bytes
        codes.append(code)
    scales: list[Optional[Tensor]] = []
    for g in fmt.groups:
        if g.stores_scale:
            scales.append(bytes_to_fp16(packed[..., at:at + 2]))
            at += 2
        else:
            scales.append(None)
    signs = norm = None
    if fmt.qjl_bits > 0:
        nb = (fmt.qjl_bits + 7) // 8
        signs = unpack_bits(packed[..., at:at + nb], fmt.qjl_bits)
        at += nb
        norm = bytes_to_fp16(packed[..., at:at + 2])
        at += 2
    return codes, scales, signs, norm
