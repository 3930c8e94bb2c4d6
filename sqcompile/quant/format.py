"""The storage format of K (or V) for one layer: groups of storage dims, each a scalar quantizer.

Everything here works in storage coordinates x_store = (x - mu) @ B.T, shape [..., kv_heads, S, d]
(the kv-head axis is third from last because "channel" scales are per kv-head).

A `Group` covers the contiguous storage dims [start, stop) and quantizes each coordinate alike:

- ``scale="token"``: per token, s = ||x_g|| / sqrt(n) is rounded to fp16 and stored (16 bits per
  token per group); the standardized coordinate is c = x / s. A token's codes depend on that token
  alone, so a NaN/Inf token cannot touch another token's codes.
- ``scale="channel"``: c = x / channel_scale[kv_head, dim], a calibrated constant; nothing stored.

c is encoded as the index of the nearest codebook level (boundaries = midpoints, `torch.bucketize`)
and decoded as codebook[code] * scale. ``bits == 0`` stores nothing and decodes to 0.

All ops are plain torch (no .item(), no data-dependent Python branches), so `fake_quant` traces with
make_fx / torch.compile. The byte layout of a packed token is in `sqcompile.quant.packing`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .codebooks import boundaries as _boundaries
from .uniform import FP16_MAX, token_normalize, uniform_codes  # noqa: F401  (shared with fast_layout)

SCALES = ("token", "channel")


@dataclass
class Group:
    """Contiguous storage dims [start, stop) quantized alike (see the module doc)."""

    start: int
    stop: int
    bits: int
    scale: str
    codebook: Tensor
    boundaries: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"Group [{self.start}, {self.stop}) is empty or negative")
        if not 0 <= self.bits <= 8:
            raise ValueError(f"Group bits must be 0..8, got {self.bits}")
        if self.scale not in SCALES:
            raise ValueError(f"Group scale must be one of {SCALES}, got {self.scale!r}")
        self.codebook = self.codebook.detach().to(torch.float32).reshape(-1)
        if self.codebook.numel() != (1 << self.bits):
            raise ValueError(f"Group codebook has {self.codebook.numel()} levels, needs {1 << self.bits}")
        self.boundaries = _boundaries(self.codebook)

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def plane_bytes(self) -> int:
        """Bytes of one bit-plane: ceil(n / 8)."""
        return (self.size + 7) // 8

    @property
    def code_bytes(self) -> int:
        return self.bits * self.plane_bytes

    @property
    def stores_scale(self) -> bool:
        """True when a per-token fp16 scale is stored (a "token" group with at least one bit)."""
        return self.scale == "token" and self.bits > 0

    def to(self, device=None) -> "Group":
        return Group(self.start, self.stop, self.bits, self.scale, self.codebook.to(device))


PACKINGS = ("planes", "fast")


def uniform_levels(bits: int, step: float) -> Tensor:
    """The 2**bits uniform symmetric levels (c - (2**bits - 1) / 2) * step (the fast layout's)."""
    return (torch.arange(1 << bits, dtype=torch.float64) - ((1 << bits) - 1) / 2).mul(step).float()


def uniform_step(codebook: Tensor) -> float:
    """The level spacing of a uniform codebook (from its end points: exact to float32 at 8 bits too)."""
    n = codebook.numel()
    return (float(codebook[-1]) - float(codebook[0])) / (n - 1) if n > 1 else 0.0


def _is_uniform(codebook: Tensor) -> bool:
    if codebook.numel() < 2:
        return True
    step = uniform_step(codebook)
    want = uniform_levels(int(codebook.numel()).bit_length() - 1, step)
    return step > 0 and bool(((codebook - want).abs() <= 1e-3 * step).all())


@dataclass
class TensorFormat:
    """The format of K (or of V) for one layer, shared by that layer's kv-heads."""

    head_dim: int
    groups: list[Group]
    channel_scale: Tensor  # [kv_heads, head_dim] float32, used by "channel" groups
    qjl_dims: int = 0  # leading storage dims covered by the QJL sketch (0 = no QJL)
    qjl_bits: int = 0  # m sign bits of the sketch (plus an fp16 residual norm when > 0)
    packing: str = "planes"  # "planes": bit-planes (FORMAT.md) | "fast": codes packed inside bytes (fast_layout.py)

    def __post_init__(self) -> None:
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        if self.packing == "fast":
            self._check_fast()
        at = 0
        for g in self.groups:
            if g.start != at:
                raise ValueError(f"groups must cover [0, {self.head_dim}) in order; gap/overlap at {at}")
            at = g.stop
        if at != self.head_dim:
            raise ValueError(f"groups cover [0, {at}), head_dim is {self.head_dim}")
        self.channel_scale = self.channel_scale.detach().to(torch.float32)
        if self.channel_scale.dim() != 2 or self.channel_scale.shape[-1] != self.head_dim:
            raise ValueError(f"channel_scale must be [kv_heads, {self.head_dim}], got {tuple(self.channel_scale.shape)}")
        if not 0 <= self.qjl_dims <= self.head_dim:
            raise ValueError(f"qjl_dims must be in 0..{self.head_dim}, got {self.qjl_dims}")
        if (self.qjl_dims == 0) != (self.qjl_bits == 0):
            raise ValueError("qjl_dims and qjl_bits must be both zero or both positive")

    def _check_fast(self) -> None:
        """The fast layout: bits in {0, 1, 2, 4, 8}, whole bytes per group, uniform levels, no QJL."""
        if self.qjl_bits:
            raise ValueError("the fast packing has no QJL sketch")
        for g in self.groups:
            if g.bits not in (0, 1, 2, 4, 8) or (g.size * g.bits) % 8:
                raise ValueError(f"fast packing: group [{g.start}, {g.stop}) at {g.bits} bits is not 0/1/2/4/8 bits "
                                 "in whole bytes")
            if g.bits and not _is_uniform(g.codebook):
                raise ValueError(f"fast packing: group [{g.start}, {g.stop}) needs uniform symmetric levels")

    def fast_layout(self):
        """The `FastLayout` of a packing="fast" format (same groups, steps from the codebooks)."""
        from .fast_layout import FastGroup, FastLayout

        if self.packing != "fast":
            raise ValueError("fast_layout() needs packing='fast'")
        return FastLayout(self.head_dim, tuple(
            FastGroup(g.start, g.stop, g.bits, g.scale, uniform_step(g.codebook) if g.bits else -1.0)
            for g in self.groups))

    # -- accounting -----------------------------------------------------------------------------
    @property
    def token_groups(self) -> list[Group]:
        return [g for g in self.groups if g.stores_scale]

    def bytes_per_token(self) -> int:
        """Bytes per (token, kv-head): codes, fp16 token scales, QJL signs and residual norm."""
        n = sum(g.code_bytes for g in self.groups) + 2 * len(self.token_groups)
        if self.qjl_bits > 0:
            n += (self.qjl_bits + 7) // 8 + 2
        return n

    def bits_per_element(self) -> float:
        return 8.0 * self.bytes_per_token() / self.head_dim

    def layout(self) -> list[tuple[str, int, int]]:
        """(what, byte offset, byte count) of every segment of a packed token, in order."""
        out, at = [], 0
        for i, g in enumerate(self.groups):
            if self.packing == "fast":  # codes packed inside bytes, little-endian (fast_layout.py)
                if g.bits:
                    out.append((f"group{i}[{g.start}:{g.stop}].codes{g.bits}b", at, g.code_bytes))
                    at += g.code_bytes
                continue
            for p in range(g.bits):
                out.append((f"group{i}[{g.start}:{g.stop}].plane{p}", at, g.plane_bytes))
                at += g.plane_bytes
        for i, g in enumerate(self.groups):
            if g.stores_scale:
                out.append((f"group{i}.scale_fp16", at, 2))
                at += 2
        if self.qjl_bits > 0:
            nb = (self.qjl_bits + 7) // 8
            out.append((f"qjl.signs[{self.qjl_bits}]", at, nb))
            at += nb
            out.append(("qjl.residual_norm_fp16", at, 2))
            at += 2
        return out

    def describe(self) -> str:
        parts = [f"[{g.start}:{g.stop}]@{g.bits}b/{g.scale}" for g in self.groups]
        if self.qjl_bits:
            parts.append(f"qjl({self.qjl_dims}d->{self.qjl_bits}b)")
        return " ".join(parts) + f" = {self.bytes_per_token()} B ({self.bits_per_element():.4f} b/elem)"

    def to(self, device=None) -> "TensorFormat":
        return TensorFormat(self.head_dim, [g.to(device) for g in self.groups],
                            self.channel_scale.to(device), self.qjl_dims, self.qjl_bits, self.packing)

    # -- quantization ---------------------------------------------------------------------------
    def _channel(self, g: Group) -> Tensor:
        # [kv_heads, 1, n]: broadcasts against [..., kv_heads, S, n]
        return self.channel_scale[:, None, g.start:g.stop]

    def encode(self, x_store: Tensor) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        """Codes (int64 [..., n] per group, None for 0 bits) and token scales (float32 [...], the
        fp16-rounded value, per group; None for groups that store none)."""
        x = x_store.float()
        codes: list[Optional[Tensor]] = []
        scales: list[Optional[Tensor]] = []
        for g in self.groups:
            if g.bits == 0:
                codes.append(None)
                scales.append(None)
                continue
            xg = x[..., g.start:g.stop]
            if g.scale == "token":
                c, s = token_normalize(xg)
                scales.append(s)
            else:
                c = xg / self._channel(g)
                scales.append(None)
            if self.packing == "fast":  # uniform levels: the same arithmetic as the write op
                code = uniform_codes(c, uniform_step(g.codebook), g.bits)
            else:
                code = torch.bucketize(c.contiguous(), g.boundaries.to(c.device))
            codes.append(code.clamp(0, (1 << g.bits) - 1))
        return codes, scales

    def decode(self, codes: list[Optional[Tensor]], scales: list[Optional[Tensor]], like: Tensor) -> Tensor:
        """float32 [..., d] from `encode`'s output; `like` gives the leading shape and device."""
        parts = []
        for g, code, s in zip(self.groups, codes, scales):
            if g.bits == 0:
                parts.append(torch.zeros(like.shape[:-1] + (g.size,), dtype=torch.float32, device=like.device))
                continue
            level = g.codebook.to(code.device)[code]
            if g.scale == "token":
                parts.append(level * s.unsqueeze(-1))
            else:
                parts.append(level * self._channel(g))
        return torch.cat(parts, -1)

    def fake_quant(self, x_store: Tensor) -> Tensor:
        """Quantize and dequantize: float32 [..., d] (what `unpack(pack(x))` returns)."""
        codes, scales = self.encode(x_store)
        return self.decode(codes, scales, x_store)
