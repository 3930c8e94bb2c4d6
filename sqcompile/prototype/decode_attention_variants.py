"""Variants of the fast-layout Triton decode kernel (`sqcompile.kernels.decode_attention_fast`) that
`benchmarks/decode_attention_fast.py --tune` measures and the tests cover; the op runs the production variant.

Knobs (besides the production `num_splits` and `block_n`):
    num_warps, num_stages   Triton launch settings (production: 4 warps, 1 stage)
    maxnreg                 a register cap per thread (CUDA only; production: none)
    mode                    code unpack: 2 = inline PTX (CUDA), 0 / 1 = plain Triton (the interpreter takes 0 / 1)
    per_sm                  programs per SM when num_splits is 0 (production: 4 below 32K cache tokens, 8 from 32K)
    trans_k                 1 = scores^T = codes @ q^T (production: 0)
    lazy                    0 = sum(p) and sum(P s) per block instead of once after the loop (production: 1)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.decode_attention_fast import launch_fast


def decode_attention_fast_variant(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor,
                                  lengths: torch.Tensor, k_basis: torch.Tensor, k_factor: torch.Tensor,
                                  v_factor: torch.Tensor, k_groups: list[int], v_groups: list[int], scale: float,
                                  num_splits: int = 0, block_n: int = 128, num_warps: int = 4, num_stages: int = 1,
                                  maxnreg: Optional[int] = None, mode: Optional[int] = None, per_sm: int = 0,
                                  trans_k: int = 0, lazy: int = 1, **kwargs) -> torch.Tensor:
    """`decode_attention_fast_triton` (same arguments and result; poison, kv_mask, sinks in kwargs) with the knobs
    of the module doc."""
    return launch_fast(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups, v_groups, scale,
                       num_splits=num_splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                       maxnreg=maxnreg, mode=mode, per_sm=per_sm, trans_k=trans_k, lazy=lazy, **kwargs)
