"""A packed KV layout the GPU decodes in ~1-2 instructions per element (uniform levels, packed codes).

Everything is in storage coordinates x_store = (x - mu) @ B.T, as in `sqcompile.quant.format`.

One (token, kv-head) row of K (or V), uint8 [B, kv_heads, T, bytes_per_token]:

1. For each group, in order, its codes PACKED LITTLE-ENDIAN INSIDE BYTES: with b bits per code,
   coordinate j of the group (storage dim start + j) sits in byte j * b // 8 at bit (j * b) % 8
   (b = 4: byte j holds coords 2j (low nibble) and 2j + 1; b = 2: four coords per byte, coord 4j in
   bits 0-1; b = 1: eight per byte; b = 8: one per byte). A group takes n * b / 8 bytes (n * b must be
   a multiple of 8); a 0-bit group takes none and decodes to 0.
2. The fp16 per-token scales of the groups with scale == "token" and bits > 0, in group order,
   2 bytes each, little-endian: s = fp16(||x_g|| / sqrt(n)).

Levels are UNIFORM and symmetric per group, no codebook:

    level(c) = (c - (2^b - 1) / 2) * step_g,     x_hat = level(c) * s (token) or * channel_scale[h, j]

so a decode kernel needs no lookup: q . x_hat = s * step * (q . c - (2^b - 1)/2 * sum(q)), and
P @ V = step * (sum_t p_t s_t c_t - (2^b - 1)/2 * sum_t p_t s_t). `step` is the MSE-optimal uniform
step for a standard Gaussian coordinate at b bits (`gaussian_step`), since c = x / s has unit RMS.

Encoding: c = x / s (s = 0: c = x), code = clamp(floor(c / step + (2^b - 1)/2 + 1/2), 0, 2^b - 1)
(nearest level, ties up). `FastLayout.pack/unpack/encode/decode` are the plain-torch reference;
`layout_for_budget` picks the groups of K and V for a budget in bits per element.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

import torch
from torch import Tensor

from .uniform import token_normalize, uniform_codes

BITS_ALLOWED = (0, 1, 2, 4, 8)
CUDA_SLACK = 1.10  # fast planners: prefer layouts the CUDA decode kernel reads at up to 10% more predicted error
SCALES = ("token", "channel")


# ---------------------------------------------------------------------------------------------
# the Gaussian-optimal uniform step
# ---------------------------------------------------------------------------------------------

def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def uniform_mse(bits: int, step: float) -> float:
    """E[(X - Q(X))^2] for X ~ N(0, 1) and the symmetric uniform quantizer of 2^bits levels
    (c - (2^b - 1)/2) * step, nearest level, outermost cells unbounded. Closed form per cell."""
    L = 1 << bits
    levels = [(c - (L - 1) / 2) * step for c in range(L)]
    edges = [-math.inf] + [(levels[i] + levels[i + 1]) / 2 for i in range(L - 1)] + [math.inf]
    tot = 0.0
    for i, y in enumerate(levels):
        a, b = edges[i], edges[i + 1]
        # int_a^b (x - y)^2 phi = [Phi](1 + y^2) + [ -x phi ] ... : E[x^2] - 2y E[x] + y^2 P over the cell
        pa, pb = (_Phi(a) if a != -math.inf else 0.0), (_Phi(b) if b != math.inf else 1.0)
        fa, fb = (_phi(a) if a != -math.inf else 0.0), (_phi(b) if b != math.inf else 0.0)
        xa = a * fa if a != -math.inf else 0.0
        xb = b * fb if b != math.inf else 0.0
        p = pb - pa
        m1 = fa - fb  # int x phi
        m2 = p + xa - xb  # int x^2 phi
        tot += m2 - 2 * y * m1 + y * y * p
    return tot


@lru_cache(maxsize=None)
def gaussian_step(bits: int) -> float:
    """MSE-optimal step of the uniform symmetric 2^bits-level quantizer for N(0, 1) (golden section):
    1 bit 1.5958 (levels +-0.7979), 2 bits 0.9957, 4 bits 0.3352, 8 bits ~0.0308."""
    if bits == 0:
        return 0.0
    lo, hi = 1e-4, 4.0
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = uniform_mse(bits, a), uniform_mse(bits, b)
    for _ in range(200):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = uniform_mse(bits, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = uniform_mse(bits, b)
    return (lo + hi) / 2


@lru_cache(maxsize=None)
def gaussian_mse(bits: int) -> float:
    """E[(X - Q(X))^2] of the MSE-optimal uniform quantizer at `bits` for X ~ N(0, 1) (1 at 0 bits); cached: the
    fast planner asks it for every candidate group (thousands at head_dim 256)."""
    return 1.0 if bits == 0 else uniform_mse(bits, gaussian_step(bits))


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FastGroup:
    """Storage dims [start, stop), `bits` in {0, 1, 2, 4, 8}, scale "token" or "channel", level step."""

    start: int
    stop: int
    bits: int
    scale: str = "token"
    step: float = field(default=-1.0)  # < 0: gaussian_step(bits)

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"FastGroup [{self.start}, {self.stop}) is empty or negative")
        if self.bits not in BITS_ALLOWED:
            raise ValueError(f"FastGroup bits must be one of {BITS_ALLOWED}, got {self.bits}")
        if self.scale not in SCALES:
            raise ValueError(f"FastGroup scale must be one of {SCALES}, got {self.scale!r}")
        if (self.n * self.bits) % 8:
            raise ValueError(f"FastGroup [{self.start}, {self.stop}) at {self.bits} bits is not whole bytes")
        if self.step < 0:
            object.__setattr__(self, "step", gaussian_step(self.bits))

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def code_bytes(self) -> int:
        return self.n * self.bits // 8

    @property
    def stores_scale(self) -> bool:
        return self.scale == "token" and self.bits > 0

    @property
    def offset(self) -> float:
        """(2^b - 1) / 2: level(c) = (c - offset) * step."""
        return ((1 << self.bits) - 1) / 2 if self.bits else 0.0


@dataclass(frozen=True)
class FastLayout:
    """The packed layout of K (or V) of one layer (see the module doc), shared by its kv-heads."""

    head_dim: int
    groups: tuple[FastGroup, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        at = 0
        for g in self.groups:
            if g.start != at:
                raise ValueError(f"groups must cover [0, {self.head_dim}) in order; gap/overlap at {at}")
            at = g.stop
        if at != self.head_dim:
            raise ValueError(f"groups cover [0, {at}), head_dim is {self.head_dim}")

    # -- accounting -----------------------------------------------------------------------------
    def code_offsets(self) -> list[int]:
        out, at = [], 0
        for g in self.groups:
            out.append(at)
            at += g.code_bytes
        return out

    def scale_offsets(self) -> list[int]:
        """Byte offset of each group's fp16 token scale (-1: none stored)."""
        at = sum(g.code_bytes for g in self.groups)
        out = []
        for g in self.groups:
            if g.stores_scale:
                out.append(at)
                at += 2
            else:
                out.append(-1)
        return out

    def bytes_per_token(self) -> int:
        return sum(g.code_bytes for g in self.groups) + 2 * sum(g.stores_scale for g in self.groups)

    def bits_per_element(self) -> float:
        return 8.0 * self.bytes_per_token() / self.head_dim

    def flat_groups(self) -> list[int]:
        """(start, stop, bits, token) per group, flattened: the int[] the custom op takes."""
        out: list[int] = []
        for g in self.groups:
            out += [g.start, g.stop, g.bits, int(g.scale == "token")]
        return out

    def steps(self) -> list[float]:
        return [float(g.step) for g in self.groups]

    @staticmethod
    def from_flat(head_dim: int, flat: Sequence[int], steps: Sequence[float]) -> "FastLayout":
        if len(flat) % 4 or len(flat) // 4 != len(steps):
            raise ValueError("flat groups must be (start, stop, bits, token) quadruples, one step each")
        gs = [FastGroup(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]), "token" if flat[i + 3] else "channel",
                        float(steps[i // 4])) for i in range(0, len(flat), 4)]
        return FastLayout(head_dim, tuple(gs))

    def spec(self) -> str:
        """A string that `from_spec` turns back into this layout exactly ("start:stop:bits:scale:step;...").
        The cache ops take it: a str is a constant to dynamo, where int lists of a cache object would become
        symbolic after a recompile (automatic dynamic) and could not feed the kernels' constexprs."""
        return ";".join(f"{g.start}:{g.stop}:{g.bits}:{g.scale}:{float(g.step)!r}" for g in self.groups)

    @staticmethod
    def from_spec(head_dim: int, spec: str) -> "FastLayout":
        try:
            parts = [p.split(":") for p in spec.split(";")]
            gs = [FastGroup(int(a), int(b), int(c), sc, float(st)) for a, b, c, sc, st in parts]
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a FastLayout spec ('start:stop:bits:scale:step;...'): {spec!r} ({e})") from None
        return FastLayout(head_dim, tuple(gs))

    def column_factor(self, channel_scale: Optional[Tensor], kv_heads: int, device=None) -> Tensor:
        """float32 [kv_heads, d]: step_g (x channel_scale[h, j] for "channel" groups; 0 for 0-bit)."""
        f = torch.zeros(kv_heads, self.head_dim, dtype=torch.float32, device=device)
        for g in self.groups:
            if g.bits == 0:
                continue
            if g.scale == "channel":
                if channel_scale is None:
                    raise ValueError("a channel group needs channel_scale [kv_heads, d]")
                f[:, g.start:g.stop] = g.step * channel_scale.to(device=device, dtype=torch.float32)[:, g.start:g.stop]
            else:
                f[:, g.start:g.stop] = g.step
        return f

    def describe(self) -> str:
        parts = [f"[{g.start}:{g.stop}]@{g.bits}b/{g.scale}" for g in self.groups]
        return " ".join(parts) + f" = {self.bytes_per_token()} B ({self.bits_per_element():.4f} b/elem)"

    # -- quantization (plain torch) --------------------------------------------------------------
    @staticmethod
    def _channel(channel_scale: Tensor, g: FastGroup) -> Tensor:
        return channel_scale.to(torch.float32)[:, None, g.start:g.stop]  # [kv_heads, 1, n]

    def encode(self, x_store: Tensor, channel_scale: Optional[Tensor] = None):
        """x_store [..., kv_heads, S, d] -> (codes int64 [..., n] per group (None: 0 bits),
        token scales float32 [...] (fp16-rounded; None where not stored))."""
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
                c = xg / self._channel(channel_scale, g)
                scales.append(None)
            codes.append(uniform_codes(c, g.step, g.bits))
        return codes, scales

    def decode(self, codes, scales, channel_scale: Optional[Tensor] = None, like: Optional[Tensor] = None) -> Tensor:
        """float32 [..., d] from `encode`'s (or `unpack`'s) output."""
        parts = []
        lead = None
        for code in codes:
            if code is not None:
                lead, dev = code.shape[:-1], code.device
        if lead is None:
            lead, dev = like.shape[:-1], like.device
        for g, code, s in zip(self.groups, codes, scales):
            if g.bits == 0:
                parts.append(torch.zeros(lead + (g.n,), dtype=torch.float32, device=dev))
                continue
            level = (code.to(torch.float32) - g.offset) * g.step
            parts.append(level * (s.unsqueeze(-1) if g.scale == "token" else self._channel(channel_scale, g)))
        return torch.cat(parts, -1)

    def pack(self, codes, scales) -> Tensor:
        """-> uint8 [..., bytes_per_token] (see the module doc)."""
        segs = []
        for g, code in zip(self.groups, codes):
            if g.bits == 0:
                continue
            per = 8 // g.bits
            c = code.to(torch.int32).reshape(code.shape[:-1] + (g.n // per, per))
            sh = torch.arange(per, dtype=torch.int32, device=c.device) * g.bits
            segs.append((c << sh).sum(-1).to(torch.uint8))
        for g, s in zip(self.groups, scales):
            if g.stores_scale:
                v = s.to(torch.float16).view(torch.int16).to(torch.int32)
                segs.append(torch.stack([v & 0xFF, (v >> 8) & 0xFF], -1).to(torch.uint8))
        return torch.cat(segs, -1)

    def unpack(self, packed: Tensor):
        """uint8 [..., bytes_per_token] -> (codes, scales) as `encode` returns them."""
        if packed.shape[-1] != self.bytes_per_token():
            raise ValueError(f"rows have {packed.shape[-1]} bytes, the layout has {self.bytes_per_token()}")
        codes: list[Optional[Tensor]] = []
        for g, off in zip(self.groups, self.code_offsets()):
            if g.bits == 0:
                codes.append(None)
                continue
            per = 8 // g.bits
            byte = packed[..., off:off + g.code_bytes].to(torch.int64)
            sh = torch.arange(per, dtype=torch.int64, device=packed.device) * g.bits
            c = (byte.unsqueeze(-1) >> sh) & ((1 << g.bits) - 1)
            codes.append(c.reshape(byte.shape[:-1] + (g.n,)))
        scales: list[Optional[Tensor]] = []
        for g, off in zip(self.groups, self.scale_offsets()):
            if off < 0:
                scales.append(None)
                continue
            v = packed[..., off].to(torch.int32) | (packed[..., off + 1].to(torch.int32) << 8)
            v = torch.where(v >= 32768, v - 65536, v)
            scales.append(v.to(torch.int16).view(torch.float16).float())
        return codes, scales

    def quantize(self, x_store: Tensor, channel_scale: Optional[Tensor] = None) -> Tensor:
        return self.pack(*self.encode(x_store, channel_scale))

    def dequantize(self, packed: Tensor, channel_scale: Optional[Tensor] = None) -> Tensor:
        return self.decode(*self.unpack(packed), channel_scale=channel_scale, like=packed)


# ---------------------------------------------------------------------------------------------
# a layout for a budget
# ---------------------------------------------------------------------------------------------

def cuda_decodable(n: int, bits: int) -> bool:
    """Whether a coded group of n dims at `bits` splits into whole bytes per thread of the CUDA decode kernel
    (`sqcompile.kernels.decode_attention_cuda`: n * bits % 64 == 0; 0-bit groups store nothing). The
    planners keep to such groups (16-dim boundaries at 4/8 bits, 32 at 2 bits, 64 at 1 bit)."""
    return bits == 0 or (n * bits) % 64 == 0


def _candidates(d: int, min_group: int = 16) -> list[FastLayout]:
    """One token group at b bits, or [0:n_hi] at b_hi + [n_hi:d] at b_lo (n_hi a multiple of min_group,
    b_hi >= b_lo: equal bits = two token scales)."""
    out = [FastLayout(d, (FastGroup(0, d, b),)) for b in (1, 2, 4, 8)]
    for b_hi, b_lo in itertools.product((1, 2, 4, 8), repeat=2):
        if b_hi < b_lo:
            continue
        for n_hi in range(min_group, d, min_group):
            out.append(FastLayout(d, (FastGroup(0, n_hi, b_hi), FastGroup(n_hi, d, b_lo))))
    return out


def _padded_bytes(lay: FastLayout) -> int:
    """Bytes the decode kernel pads per token: each group's code tile is a power of two >= 16 bytes."""
    return sum(max(16, 1 << (g.code_bytes - 1).bit_length()) - g.code_bytes for g in lay.groups if g.bits)


def layout_for_budget(budget_bits: float, head_dim: int, objective: str = "mse",
                      align: int = 2) -> tuple[FastLayout, FastLayout]:
    """(K layout, V layout), all groups token-scaled, bits in {1, 2, 4, 8}, K+V bytes per token
    <= 2 * budget * d / 8 (the K+V average <= budget * d / 8), each row a multiple of `align` bytes
    (2: the fp16 token scales stay aligned; 4: the kernel can load 32-bit words, but at 2.69 bits
    that forces padded tiles and was 6% slower at 64K on an H100, benchmarks/decode_attention_fast.py --align 4).

    objective "mse" (default): the lowest total Gaussian MSE (sum over coordinates of the optimal
    uniform quantizer's MSE), then the most bytes; "bytes": the most bytes, then the lowest MSE.
    ("bytes" can pick a worse layout: at d=128, 4.25 bits it takes 136 B with 2-bit key dims and
    twice the MSE of 4 bits everywhere in 132 B.) The best pair of `cuda_decodable` layouts wins when its
    error is within CUDA_SLACK of the best pair's. Remaining ties: fewer padded bytes in the kernel's tiles, K and V
    bytes closer, then V the larger."""
    if objective not in ("mse", "bytes"):
        raise ValueError(f"objective must be 'mse' or 'bytes', got {objective!r}")
    cap = math.floor(2 * budget_bits * head_dim / 8 + 1e-9)
    cands = [c for c in _candidates(head_dim) if c.bytes_per_token() % align == 0]
    mse = {id(c): sum(g.n * gaussian_mse(g.bits) for g in c.groups) for c in cands}
    best = _best_pair(cands, cap, mse, objective)
    friendly = [c for c in cands if all(cuda_decodable(g.n, g.bits) for g in c.groups)]
    best_f = _best_pair(friendly, cap, mse, objective) if friendly else None
    if best is None:
        raise ValueError(f"no layout fits {budget_bits} bits per element at head_dim {head_dim}")
    err = lambda pair: mse[id(pair[0])] + mse[id(pair[1])]  # noqa: E731
    if best_f is not None and err(best_f) <= CUDA_SLACK * err(best) + 1e-9:
        return best_f  # the CUDA decode kernel reads it
    return best


def _best_pair(cands, cap, mse, objective):
    best, best_key = None, None
    for k, v in itertools.product(cands, cands):
        tot = k.bytes_per_token() + v.bytes_per_token()
        if tot > cap:
            continue
        err = round(mse[id(k)] + mse[id(v)], 9)
        key = ((-tot, err) if objective == "bytes" else (err, -tot)) + (_padded_bytes(k) + _padded_bytes(v),
               abs(k.bytes_per_token() - v.bytes_per_token()), k.bytes_per_token() - v.bytes_per_token(),
               len(k.groups) + len(v.groups))
        if best_key is None or key < best_key:
            best, best_key = (k, v), key
    return best


def describe_budgets(budgets=(4.25, 3.25, 2.69), dims=(64, 128)) -> str:
    lines = []
    for d in dims:
        for b in budgets:
            k, v = layout_for_budget(b, d)
            tot = k.bytes_per_token() + v.bytes_per_token()
            lines.append(f"d={d:3d} budget {b:4.2f}: K {k.describe()} | V {v.describe()} | K+V {tot} B "
                         f"(cap {math.floor(2 * b * d / 8 + 1e-9)}) = {4 * tot / d:.4f} b/elem")
    return "\n".join(lines)


if __name__ == "__main__":
    for b in (1, 2, 4, 8):
        print(f"gaussian_step({b}) = {gaussian_step(b):.4f}  mse {gaussian_mse(b):.5f}")
    print(describe_budgets())
