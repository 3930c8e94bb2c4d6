"""Scalar codebooks: Lloyd-Max reconstruction levels for a standardized coordinate.

A codebook is `2**bits` ascending float32 levels; the encoder's decision boundaries are the midpoints
of adjacent levels (the nearest-level rule), so a codebook alone defines the quantizer.

Distributions (all of unit second moment):

- ``"gaussian"``: N(0, 1), the limit of a randomly rotated, token-normalized coordinate.
- ``"sphere"``: the exact law of one coordinate of sqrt(n) * u, u uniform on the unit sphere S^{n-1}:
  density proportional to (1 - c^2/n)^((n-3)/2) on |c| < sqrt(n). That is what a "token" group of n
  randomly rotated coordinates divided by its RMS looks like, so its codebook is optimal there.
- ``"laplace"``: unit-variance Laplace, for heavy-tailed calibrated ("channel") coordinates.

Codebooks are computed once by Lloyd's algorithm on a fine grid (float64) and cached.
`fit_codebook` runs Lloyd's algorithm on samples instead (codebooks fitted on calibration data).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

DISTRIBUTIONS = ("gaussian", "sphere", "laplace")
_GRID_POINTS = 1 << 15


def _grid(dist: str, n: int) -> tuple[Tensor, Tensor]:
    """Grid points x and probability weights w (sum 1) that discretize the distribution."""
    if dist == "sphere" and n < 3:
        dist = "gaussian"  # the n<=2 marginals are degenerate (two atoms / arcsine); unused in practice
    if dist == "gaussian":
        x = torch.linspace(-10.0, 10.0, _GRID_POINTS, dtype=torch.float64)
        w = torch.exp(-0.5 * x * x)
    elif dist == "laplace":
        x = torch.linspace(-40.0, 40.0, _GRID_POINTS, dtype=torch.float64)
        w = torch.exp(-math.sqrt(2.0) * x.abs())
    elif dist == "sphere":
        limit = min(math.sqrt(n), 10.0)
        x = torch.linspace(-limit, limit, _GRID_POINTS, dtype=torch.float64)
        w = (1.0 - x * x / n).clamp_min(0.0) ** ((n - 3) / 2.0)
    else:
        raise ValueError(f"unknown codebook distribution {dist!r}; valid: {DISTRIBUTIONS}")
    return x, w / w.sum()


def _lloyd(x: Tensor, w: Tensor, bits: int, iters: int) -> Tensor:
    """Lloyd's algorithm on sorted points x with weights w; returns 2**bits ascending levels (float64)."""
    levels_n = 1 << bits
    cdf = torch.cumsum(w, 0)
    # Start from the high-resolution optimum: level density proportional to p^(1/3).
    w3 = w.clamp_min(0) ** (1.0 / 3.0)
    c3 = torch.cumsum(w3, 0) / w3.sum()
    targets = (torch.arange(levels_n, dtype=torch.float64) + 0.5) / levels_n
    idx = torch.searchsorted(c3, targets).clamp(max=x.numel() - 1)
    levels = x[idx].clone()
    pw = torch.cat([torch.zeros(1, dtype=torch.float64), cdf])
    pwx = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w * x, 0)])
    for _ in range(iters):
        bounds = 0.5 * (levels[1:] + levels[:-1])
        cut = torch.searchsorted(x, bounds)
        edges = torch.cat([torch.zeros(1, dtype=torch.long), cut, torch.tensor([x.numel()])])
        mass = pw[edges[1:]] - pw[edges[:-1]]
        moment = pwx[edges[1:]] - pwx[edges[:-1]]
        new = torch.where(mass > 1e-300, moment / mass.clamp_min(1e-300), levels)
        new, _ = torch.sort(new)
        if torch.max(torch.abs(new - levels)) < 1e-8:
            levels = new
            break
        levels = new
    return levels


@lru_cache(maxsize=None)
def _lloyd_max_cached(dist: str, bits: int, n: int) -> tuple[tuple[float, ...], float]:
    if bits == 0:
        return (0.0,), 1.0
    x, w = _grid(dist, n)
    levels = _lloyd(x, w, bits, iters=400 if bits <= 5 else 250)
    bounds = 0.5 * (levels[1:] + levels[:-1])
    q = levels[torch.bucketize(x, bounds)]
    mse = float((w * (x - q) ** 2).sum())
    return tuple(float(v) for v in levels), mse


def lloyd_max(bits: int, dist: str = "gaussian", n: int = 0) -> Tensor:
    """Lloyd-Max levels [2**bits] float32 for `dist` (``n`` = group size, used by ``"sphere"``).

    ``bits == 0`` gives the single level 0 (the coordinate is dropped)."""
    if not 0 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 0..8, got {bits}")
    key_n = n if dist == "sphere" else 0
    levels, _ = _lloyd_max_cached(dist, int(bits), int(key_n))
    return torch.tensor(levels, dtype=torch.float32)


def distortion(bits: int, dist: str = "gaussian", n: int = 0) -> float:
    """Mean squared error of the `lloyd_max` quantizer on its own unit-variance distribution."""
    if bits <= 0:
        return 1.0
    key_n = n if dist == "sphere" else 0
    return _lloyd_max_cached(dist, int(min(bits, 8)), int(key_n))[1]


def fit_codebook(samples: Tensor, bits: int, iters: int = 100) -> Tensor:
    """Lloyd's algorithm (1-D k-means) on calibration samples of a standardized coordinate.

    Non-finite samples are ignored. Returns [2**bits] float32 ascending levels."""
    s = samples.detach().reshape(-1).double()
    s = s[torch.isfinite(s)]
    if bits == 0 or s.numel() == 0:
        return lloyd_max(bits)
    s, _ = torch.sort(s)
    w = torch.full_like(s, 1.0 / s.numel())
    levels = _lloyd(s, w, bits, iters)
    # Empty cells keep their previous level; make the result strictly ascending anyway.
    levels, _ = torch.sort(levels)
    return levels.float()


def boundaries(codebook: Tensor) -> Tensor:
    """Decision boundaries: midpoints of adjacent levels ([2**bits - 1], ascending)."""
    return 0.5 * (codebook[1:] + codebook[:-1])
