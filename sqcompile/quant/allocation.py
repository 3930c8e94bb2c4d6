"""Bit allocation: reverse water-filling and the group plans that meet a byte budget exactly.

A plan is a list of `GroupSpec` (storage dims, bits, scale kind, codebook distribution) plus the QJL
sketch size; `codec.build_codec` turns it into a `TensorFormat`. Every plan is costed in whole bytes
per (token, kv-head), exactly as `TensorFormat.bytes_per_token` counts, so "fits the budget" here
means the packed cache fits it.

Predicted distortion (used to choose between plans of the same cost), per token, in storage units:
- a "channel" group dim j with variance lambda_j at b bits: w_j * lambda_j * D(b);
- a randomly rotated block of n dims with total variance V, split into token groups (n_i dims at b_i
  bits): the rotation spreads V and the query weight W evenly, so W/n * V/n * sum n_i D(b_i),
where D(b) is the Lloyd-Max distortion of the group's codebook and w_j a query weight per dim
(1 = plain MSE).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch
from torch import Tensor

from .codebooks import distortion

MAX_BITS = 8
SCALE_BITS = 16


@dataclass(frozen=True)
class GroupSpec:
    start: int
    stop: int
    bits: int
    scale: str  # "token" | "channel"
    dist: str  # codebook distribution: "gaussian" | "sphere" | "laplace"

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    groups: list[GroupSpec]
    qjl_dims: int = 0
    qjl_bits: int = 0
    predicted: float = math.inf  # predicted (weighted) distortion, for comparing plans
    rotate_from: int = 0  # storage dims [rotate_from, d) get a random rotation (d = none)
    rotate_signal: bool = False  # the signal dims [0, rotate_from) get their own random rotation
    rotate_groups: bool = False  # every group gets its own random rotation (the fast layout's plans)

    def bytes_per_token(self) -> int:
        return plan_bytes(self.groups, self.qjl_bits)


def plan_bytes(groups: Sequence[GroupSpec], qjl_bits: int = 0) -> int:
    """Bytes per (token, kv-head), counted exactly like `TensorFormat.bytes_per_token`."""
    n = 0
    for g in groups:
        n += g.bits * ((g.size + 7) // 8)
        if g.scale == "token" and g.bits > 0:
            n += 2
    if qjl_bits > 0:
        n += (qjl_bits + 7) // 8 + 2
    return n


def qjl_overhead_bits(qjl_bits: int) -> int:
    return 0 if qjl_bits <= 0 else 8 * ((qjl_bits + 7) // 8) + SCALE_BITS


# -- reverse water-filling ----------------------------------------------------------------------

def waterfill(eigvals: Tensor, total_bits: float) -> tuple[float, Tensor]:
    """Continuous reverse water-filling: b_j = max(0, 1/2 log2(lambda_j / theta)), sum b_j = total_bits.

    Returns (theta, bits [d] float64). Bisection on log(theta)."""
    lam = eigvals.detach().double().clamp_min(1e-30)
    if total_bits <= 0:
        return float(lam.max()), torch.zeros_like(lam)

    def bits_at(log_theta: float) -> Tensor:
        return (0.5 * (torch.log2(lam) - log_theta / math.log(2))).clamp_min(0)

    lo = math.log(float(lam.min())) - 2 * math.log(2) * total_bits  # sum too big
    hi = math.log(float(lam.max()))  # sum = 0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(bits_at(mid).sum()) > total_bits:
            lo = mid
        else:
            hi = mid
    theta = 0.5 * (lo + hi)
    return math.exp(theta), bits_at(theta)


def allocate_bits(eigvals: Tensor, total_bits: int, max_bits: int = MAX_BITS) -> Tensor:
    """Integer reverse water-filling: int64 bits [d] with sum == min(total_bits, max_bits * d).

    Greedy on the Gaussian rate-distortion model D_j(b) = lambda_j 4^-b: each bit goes to the dim
    whose distortion it reduces most (lambda_j 4^-b_j * 3/4), which is optimal for this convex model
    and tracks `waterfill` to within one bit per dim. Ties go to the lower dim."""
    lam = [max(float(v), 0.0) for v in eigvals.detach().double().reshape(-1)]
    d = len(lam)
    total = min(int(total_bits), max_bits * d)
    bits = [0] * d
    heap = [(-lam[j], j) for j in range(d)]
    heapq.heapify(heap)
    for _ in range(total):
        gain, j = heapq.heappop(heap)
        bits[j] += 1
        if bits[j] < max_bits:
            heapq.heappush(heap, (gain / 4.0, j))
    return torch.tensor(bits, dtype=torch.int64)


def groups_from_bits(bits: Tensor, scale: str = "channel", dist: str = "laplace") -> list[GroupSpec]:
    """Contiguous runs of equal bits -> groups (water-filling bits are non-increasing on a descending spectrum)."""
    out, start = [], 0
    b = bits.tolist()
    for j in range(1, len(b) + 1):
        if j == len(b) or b[j] != b[start]:
            out.append(GroupSpec(start, j, int(b[start]), scale if b[start] > 0 else "channel", dist))
            start = j
    return out


# -- token-scale blocks ---------------------------------------------------------------------------

def _token_block_options(start: int, n: int, avail_bits: int, dist: str) -> list[list[GroupSpec]]:
    """Ways to spend at most avail_bits on n randomly rotated dims with per-token scales.

    One group at b bits, or two groups (the first n_hi dims at b+1 bits, the rest at b, n_hi a
    multiple of 8) where the leftover pays for the second scale. A 0-bit part needs no scale."""
    options = []
    nb = (n + 7) // 8
    for b in range(MAX_BITS, 0, -1):  # single group
        if 8 * b * nb + SCALE_BITS <= avail_bits:
            options.append([GroupSpec(start, start + n, b, "token", dist)])
            break
    for b in range(0, MAX_BITS):  # two groups: n_hi at b+1, n - n_hi at b
        lo_scale = SCALE_BITS if b > 0 else 0
        best = None
        for n_hi in range(8 * ((n - 1) // 8), 0, -8):
            cost = 8 * (b + 1) * ((n_hi + 7) // 8) + SCALE_BITS + 8 * b * ((n - n_hi + 7) // 8) + lo_scale
            if cost <= avail_bits:
                best = n_hi
                break
        if best is not None:
            options.append([GroupSpec(start, start + best, b + 1, "token", dist),
                            GroupSpec(start + best, start + n, b, "token" if b > 0 else "channel", dist)])
    return options


def _token_block_error(groups: Sequence[GroupSpec]) -> float:
    """sum n_i D(b_i) / n: the relative error of a rotated block (1 = nothing stored)."""
    n = sum(g.size for g in groups)
    return sum(g.size * distortion(g.bits, "gaussian") for g in groups) / n


def best_token_block(start: int, n: int, avail_bits: int, dist: str = "sphere",
                     min_bits: int = 0) -> Optional[list[GroupSpec]]:
    """The option of `_token_block_options` with the least predicted error (no group below min_bits)."""
    options = [o for o in _token_block_options(start, n, avail_bits, dist) if all(g.bits >= min_bits for g in o)]
    if not options:
        return None
    return min(options, key=lambda gs: (_token_block_error(gs), plan_bytes(gs)))


# -- plans ----------------------------------------------------------------------------------------

def sketch_size(qjl_dims: int, ratio: float = 1.0) -> int:
    """Sketch rows m for a sketch over qjl_dims dims: ratio * qjl_dims rounded up to a multiple of 8."""
    if qjl_dims <= 0:
        return 0
    return max(8, 8 * math.ceil(ratio * qjl_dims / 8))


def plan_rotated(d: int, budget_bytes: int, *, qjl_dims: int = 0, qjl_ratio: float = 1.0,
                 uniform_bits: bool = False, dist: str = "sphere") -> Optional[Plan]:
    """TurboQuant: all d dims randomly rotated, token scale; one group (uniform) or two (mixed bits)."""
    m = sketch_size(qjl_dims, qjl_ratio)
    avail = 8 * budget_bytes - qjl_overhead_bits(m)
    if uniform_bits:
        options = _token_block_options(0, d, avail, dist)[:1]
        options = [o for o in options if len(o) == 1]
        block = options[0] if options else None
    else:
        block = best_token_block(0, d, avail, dist)
    if block is None:
        return None
    return Plan(block, qjl_dims if m else 0, m, _token_block_error(block), rotate_from=0)


def plan_hybrid(eigvals: Tensor, budget_bytes: int, *, weights: Optional[Tensor] = None,
                signal_dims: Optional[int] = None, signal_bits: Optional[int] = 8,
                signal_scale: str = "channel", channel_dist: str = "laplace", token_dist: str = "sphere",
                qjl: str = "none", qjl_ratio: float = 1.0, step: int = 8, min_bits: int = 0) -> Optional[Plan]:
    """SpectralQuant: the top `s` PCA dims ("signal") at `signal_bits` each, the remaining d - s dims
    randomly rotated with per-token scales at the bits the budget leaves.

    `eigvals` [d] descending (the PCA basis order); `weights` [d] query energy per PCA dim (None = 1).
    `signal_dims`/`signal_bits` None = search (s over multiples of `step`, bits 1..8); the plan with the
    lowest predicted weighted distortion that fits `budget_bytes` wins. `qjl`: "none" | "signal" | "all".
    `min_bits`: no rotated group below this many bits (0 allows dropping dims).
    """
    lam = eigvals.detach().double().clamp_min(0)
    d = lam.numel()
    w = torch.ones_like(lam) if weights is None else weights.detach().double().clamp_min(0)
    s_options = [signal_dims] if signal_dims is not None else list(range(0, d, step))
    b_options = [signal_bits] if signal_bits is not None else list(range(1, MAX_BITS + 1))
    if signal_scale not in ("channel", "token", "rotated"):
        raise ValueError(f"signal_scale must be 'channel', 'token' or 'rotated', got {signal_scale!r}")
    best: Optional[Plan] = None
    for s in s_options:
        if not 0 <= s <= d:
            raise ValueError(f"signal_dims must be in 0..{d}, got {s}")
        if qjl == "signal" and s == 0:
            continue  # a signal sketch needs signal dims
        for bs in (b_options if s > 0 else [0]):
            groups: list[GroupSpec] = []
            err = 0.0
            if s > 0:
                scale = "channel" if signal_scale == "channel" else "token"
                dist = channel_dist if scale == "channel" else token_dist
                groups.append(GroupSpec(0, s, bs, scale if bs > 0 else "channel", dist))
                if signal_scale == "rotated":  # rotated block: weight and variance spread evenly
                    err += float(w[:s].sum()) / s * float(lam[:s].sum()) * distortion(bs, "gaussian")
                else:
                    d_sig = distortion(bs, "laplace" if signal_scale == "channel" else "gaussian")
                    err += float((w[:s] * lam[:s]).sum()) * d_sig
            qjl_dims = {"none": 0, "signal": s, "all": d}[qjl]
            m = sketch_size(qjl_dims, qjl_ratio)
            avail = 8 * budget_bytes - plan_bytes(groups) * 8 - qjl_overhead_bits(m)
            if avail < 0:
                continue
            n = d - s
            if n > 0:
                block = best_token_block(s, n, avail, token_dist, min_bits)
                if block is None:
                    continue
                if s > 0 and signal_scale == "rotated" and block[0].bits > bs:
                    continue  # the signal block has the larger variance: never fewer bits than the rest
                groups += block
                err += float(w[s:].sum()) / n * float(lam[s:].sum()) * _token_block_error(block)
            plan = Plan(groups, qjl_dims if m else 0, m, err, rotate_from=s,
                        rotate_signal=signal_scale == "rotated" and s > 0)
            if plan.bytes_per_token() > budget_bytes:
                continue
            if best is None or (err, plan.bytes_per_token()) < (best.predicted, best.bytes_per_token()):
                best = plan
    return best


def plan_channel_uniform(d: int, budget_bytes: int, *, scale: str = "channel", dist: str = "laplace",
                         qjl_dims: int = 0, qjl_ratio: float = 1.0) -> Optional[Plan]:
    """One group of all d (PCA) dims at the largest uniform bits that fit (the uniform-bits ablation)."""
    m = sketch_size(qjl_dims, qjl_ratio)
    avail = 8 * budget_bytes - qjl_overhead_bits(m) - (SCALE_BITS if scale == "token" else 0)
    b = min(MAX_BITS, avail // (8 * ((d + 7) // 8))) if avail > 0 else 0
    if b <= 0:
        return None
    return Plan([GroupSpec(0, d, b, scale, dist)], qjl_dims if m else 0, m, distortion(b, dist), rotate_from=d)


def plan_waterfill(eigvals: Tensor, budget_bytes: int, *, dist: str = "laplace",
                   qjl_dims: int = 0, qjl_ratio: float = 1.0) -> Optional[Plan]:
    """Reverse water-filling over the PCA dims, channel scales (the textbook ablation).

    Runs of equal bits become groups; the bit total is lowered until the padded bytes fit."""
    d = eigvals.numel()
    m = sketch_size(qjl_dims, qjl_ratio)
    total = 8 * budget_bytes - qjl_overhead_bits(m)
    while total > 0:
        groups = groups_from_bits(allocate_bits(eigvals, total), "channel", dist)
        if plan_bytes(groups, m) <= budget_bytes:
            lam = eigvals.double().clamp_min(0)
            err = sum(float(lam[g.start:g.stop].sum()) * distortion(g.bits, dist) for g in groups)
            return Plan(groups, qjl_dims if m else 0, m, err, rotate_from=d)
        total -= 1
    return None


def fast_candidates(d: int, max_groups: int = 2, min_group: int = 16,
                    cuda_only: bool = False) -> list[tuple[tuple[int, int, int], ...]]:
    """Fast-layout group lists ((start, stop, bits), ...): up to `max_groups` groups on multiples of
    `min_group` dims, bits non-increasing from the first group, bits in {8, 4, 2, 1} and, for a last group
    of several, 0 (those dims are dropped: the PCA tail). cuda_only: every coded group `cuda_decodable`."""
    import itertools

    from .fast_layout import cuda_decodable

    cuts = list(range(min_group, d, min_group))
    out = []
    for k in range(1, max_groups + 1):
        for inner in itertools.combinations(cuts, k - 1):
            edges = (0,) + inner + (d,)
            for bits in itertools.product((8, 4, 2, 1, 0), repeat=k):
                if any(a < b for a, b in zip(bits, bits[1:])) or bits[0] == 0 or (k > 1 and bits[-2] == 0):
                    continue
                if k > 1 and len(set(bits)) == 1:
                    continue  # equal bits in every group: the one-group layout, plus scales
                if cuda_only and not all(cuda_decodable(edges[i + 1] - edges[i], bits[i]) for i in range(k)):
                    continue  # whole bytes per thread of the CUDA decode kernel
                out.append(tuple((edges[i], edges[i + 1], bits[i]) for i in range(k)))
    return out


def plan_fast(lam: Optional[Tensor], d: int, budget: int, max_groups: int = 2) -> Optional[Plan]:
    """The fast layout (`fast_layout.py`): "token" groups at 0/1/2/4/8 bits (`fast_candidates`), uniform
    levels, each group randomly rotated within itself. With eigenvalues `lam` (descending, PCA order) the
    first group holds the high-variance dims, so bits go where the variance is; without (turboquant) all
    dims are alike. Groups the CUDA decode kernel reads (`fast_layout.cuda_decodable`) are preferred when
    their predicted error is within CUDA_SLACK of the best layout's. Predicted relative error: sum over groups of (its variance) x (uniform Gaussian MSE at
    its bits; 1 for 0 bits) / total variance. The lowest error within `budget` bytes (ties: fewer bytes)."""
    from .fast_layout import CUDA_SLACK

    key = None if lam is None else tuple(float(x) for x in lam.double().clamp_min(0))
    found = {}
    for cuda_only in (True, False):
        for used, err, groups in _fast_front(key, d, max_groups, cuda_only):
            if used > budget:
                break
            found[cuda_only] = (err, groups)
    best = found.get(False)
    if found.get(True) is not None and found[True][0] <= CUDA_SLACK * best[0] + 1e-12:
        best = found[True]  # the CUDA decode kernel reads it (3-4x the Triton kernel's speed)
    if best is None:
        return None
    specs = [GroupSpec(a, b, bits, "token", "uniform") for a, b, bits in best[1]]
    return Plan(specs, predicted=best[0], rotate_from=d, rotate_groups=True)


@lru_cache(maxsize=4096)
def _fast_front(lam: Optional[tuple], d: int, max_groups: int, cuda_only: bool = False) -> list:
    """(bytes, predicted error, groups) of the fast candidates, Pareto front ordered by bytes."""
    from .fast_layout import gaussian_mse

    var = torch.ones(d, dtype=torch.float64) if lam is None else torch.tensor(lam, dtype=torch.float64)
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), var.cumsum(0)]).tolist()
    total = csum[-1] or 1.0
    rows = []
    for groups in fast_candidates(d, max_groups, cuda_only=cuda_only):
        used = sum((b - a) * bits // 8 + (2 if bits else 0) for a, b, bits in groups)
        err = sum((csum[b] - csum[a]) * (gaussian_mse(bits) if bits else 1.0) for a, b, bits in groups) / total
        rows.append((used, round(err, 12), groups))
    rows.sort(key=lambda r: (r[0], r[1]))
    front, best = [], math.inf
    for r in rows:
        if r[1] < best:
            front.append(r)
            best = r[1]
    return front
