"""Packed KV-cache row layout shared by the quantize-write and decode-attention kernels.

One row = the bytes of one (token, kv-head) of K (or of V), in this order (the contract of
`sqcompile/quant/FORMAT.md`):

    for each group, in order:   BITS bit-planes of ceil(n/8) bytes each
                                (plane p holds bit p of every code; coordinate j of the group
                                 sits in byte j // 8, bit j % 8 of the plane)
    for each "token" group:     its fp16 scale s = ||x_g|| / sqrt(n) (2 bytes, little endian)
    if QJL:                     ceil(m/8) bytes of sign bits (bit i = sign of (S r)_i >= 0)
                                then the fp16 norm of the residual r on the QJL dims

A coordinate is reconstructed as codebook[code] * s (s = the token's scale of a "token" group or
channel_scale[kv_head, j] for a "channel" group). The residual r is taken on storage coordinates
[0, qjl_dims) (the signal dimensions lead the storage basis) and estimated by
sqrt(pi/2)/m * ||r|| * <S q, sign(S r)> (QJL on keys only).

This module holds the layout arithmetic (host side: the kernels' constexprs) and the bridge to
`sqcompile.quant`, whose plain-torch encode/pack/unpack is the reference the kernels are tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

MAX_GROUPS = 3  # the kernels unroll at most this many groups per tensor
CODEBOOK_STRIDE = 256  # codebooks are passed as one [groups, 256] float32 tensor (8 bits at most)


@dataclass(frozen=True)
class GroupLayout:
    """One contiguous range [start, stop) of storage coordinates sharing bits, codebook and scale kind."""

    start: int
    stop: int
    bits: int
    token_scale: bool  # True: one fp16 scale per token in the row; False: channel_scale[h, j]
    # (a 0-bit group stores no bytes at all and decodes to 0)
    plane_offset: int  # byte offset of plane 0 in the row
    scale_offset: int  # byte offset of the fp16 token scale (-1 for channel groups)

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def plane_bytes(self) -> int:
        return (self.n + 7) // 8


@dataclass(frozen=True)
class PackedLayout:
    """Byte layout of one packed row for a tensor format (see the module docstring)."""

    head_dim: int
    groups: tuple[GroupLayout, ...]
    qjl_dims: int
    qjl_bits: int
    qjl_offset: int  # byte offset of the sign bits (-1 if no QJL)
    qjl_norm_offset: int  # byte offset of the fp16 residual norm (-1 if no QJL)
    row_bytes: int

    @property
    def has_qjl(self) -> bool:
        return self.qjl_bits > 0 and self.qjl_dims > 0

    def flat_groups(self) -> list[int]:
        """[start, stop, bits, token_scale] per group, flattened: the int[] the custom ops take."""
        out: list[int] = []
        for g in self.groups:
            out += [g.start, g.stop, g.bits, int(g.token_scale)]
        return out

    @staticmethod
    def from_groups(
        head_dim: int,
        groups: Sequence[Sequence[int]],
        qjl_dims: int = 0,
        qjl_bits: int = 0,
        row_bytes: int | None = None,
    ) -> "PackedLayout":
        """Build from (start, stop, bits, token_scale) tuples, in row order."""
        if not 1 <= len(groups) <= MAX_GROUPS:
            raise ValueError(f"kernels support 1..{MAX_GROUPS} groups per tensor, got {len(groups)}")
        off = 0
        planes = []
        for start, stop, bits, token in groups:
            if not (0 <= start < stop <= head_dim) or not (0 <= bits <= 8):
                raise ValueError(f"bad group ({start}, {stop}, bits={bits}) for head_dim {head_dim}")
            planes.append(off)
            off += bits * ((stop - start + 7) // 8)
        out = []
        for (start, stop, bits, token), plane_off in zip(groups, planes):
            scale_off = -1
            if token and bits > 0:  # a 0-bit group stores nothing and decodes to 0
                scale_off = off
                off += 2
            out.append(GroupLayout(int(start), int(stop), int(bits), bool(token), plane_off, scale_off))
        qjl_off = qjl_norm_off = -1
        if qjl_bits > 0 and qjl_dims > 0:
            qjl_off = off
            off += (qjl_bits + 7) // 8
            qjl_norm_off = off
            off += 2
        if row_bytes is not None:
            if row_bytes < off:
                raise ValueError(f"row_bytes {row_bytes} < the {off} bytes the groups need")
            off = row_bytes  # trailing padding, if the format pads its rows
        return PackedLayout(head_dim, tuple(out), int(qjl_dims), int(qjl_bits), qjl_off, qjl_norm_off, off)

    @staticmethod
    def from_flat(head_dim: int, flat: Sequence[int], qjl_dims: int = 0, qjl_bits: int = 0,
                  row_bytes: int | None = None) -> "PackedLayout":
        if len(flat) % 4:
            raise ValueError("groups must be flattened (start, stop, bits, token_scale) quadruples")
        quads = [tuple(int(v) for v in flat[i:i + 4]) for i in range(0, len(flat), 4)]
        return PackedLayout.from_groups(head_dim, quads, qjl_dims, qjl_bits, row_bytes)

    @staticmethod
    def from_format(fmt) -> "PackedLayout":
        """From a `sqcompile.quant` TensorFormat (duck-typed: head_dim, groups, qjl_dims, qjl_bits)."""
        groups = [(g.start, g.stop, g.bits, g.scale == "token") for g in fmt.groups]
        qjl_dims = int(getattr(fmt, "qjl_dims", 0) or 0)
        qjl_bits = int(getattr(fmt, "qjl_bits", 0) or 0)
        row_bytes = None
        bpt = getattr(fmt, "bytes_per_token", None)
        if callable(bpt):
            row_bytes = int(bpt())
        return PackedLayout.from_groups(int(fmt.head_dim), groups, qjl_dims, qjl_bits, row_bytes)


def codebook_table(codebooks: Sequence[torch.Tensor | Sequence[float]], device=None) -> torch.Tensor:
    """Stack per-group codebooks into the [groups, 256] float32 table the kernels index."""
    table = torch.zeros(len(codebooks), CODEBOOK_STRIDE, dtype=torch.float32)
    for i, cb in enumerate(codebooks):
        cb = torch.as_tensor(cb, dtype=torch.float32).flatten()
        table[i, : cb.numel()] = cb
        table[i, cb.numel():] = cb[-1]
    return table.to(device) if device is not None else table


# ---------------------------------------------------------------------------------------------
# bridges to sqcompile.quant (the format's owner): kernel arguments <-> TensorFormat
# ---------------------------------------------------------------------------------------------

def kernel_args(fmt) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """TensorFormat -> (flat groups, codebook table [groups, 256], channel_scale [kv_heads, d]) for the ops."""
    layout = PackedLayout.from_format(fmt)
    table = codebook_table([g.codebook for g in fmt.groups], device=fmt.channel_scale.device)
    return layout.flat_groups(), table, fmt.channel_scale.to(torch.float32)


def format_from_args(head_dim: int, flat_groups: Sequence[int], codebooks: torch.Tensor,
                     channel_scale: torch.Tensor, qjl_dims: int = 0, qjl_bits: int = 0):
    """The inverse of `kernel_args`: rebuild the TensorFormat that the torch reference runs."""
    from sqcompile.quant.format import Group, TensorFormat

    groups = []
    for i in range(0, len(flat_groups), 4):
        start, stop, bits, token = (int(v) for v in flat_groups[i:i + 4])
        groups.append(Group(start, stop, bits, "token" if token else "channel", codebooks[i // 4, : 1 << bits]))
    return TensorFormat(head_dim, groups, channel_scale, qjl_dims, qjl_bits)


def bits_per_element(k_layout: PackedLayout, v_layout: PackedLayout) -> float:
    """Stored bits per K/V element, every byte of the rows counted."""
    return 8 * (k_layout.row_bytes + v_layout.row_bytes) / (k_layout.head_dim + v_layout.head_dim)


QJL_CONST = math.sqrt(math.pi / 2)
