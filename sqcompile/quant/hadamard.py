"""Random rotations: randomized Hadamard (TurboQuant's basis) and Haar-random orthogonal matrices.

All are returned as dense float32 d x d matrices; the codec folds them into one storage basis, so the
kernels see one matrix product whatever rotation built it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def sylvester_hadamard(n: int) -> Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1, n a power of two), float32."""
    if not is_power_of_two(n):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def randomized_hadamard(n: int, generator: torch.Generator) -> Tensor:
    """H diag(s) / sqrt(n) with random signs s: orthogonal, spreads any vector's energy evenly.

    For n not a power of two (e.g. head_dim 80 or 96) a Haar-random orthogonal matrix is returned
    instead; it has the same purpose and the codec treats both as a dense basis."""
    if not is_power_of_two(n):
        return random_orthogonal(n, generator)
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return sylvester_hadamard(n) * signs[None, :] / n ** 0.5


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian matrix with the sign fix)."""
    if n == 0:
        return torch.zeros(0, 0)
    a = torch.randn(n, n, generator=generator)
    q, r = torch.linalg.qr(a)  # float32: float64 QR is ~1000x slower on some CPU builds
    diag = torch.diagonal(r)
    return q * torch.where(diag < 0, -1.0, 1.0)
