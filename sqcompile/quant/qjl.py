"""QJL: a 1-bit Johnson-Lindenstrauss sketch of the key quantization residual.

For a key residual r = x_store - dequant(x_store) restricted to the first `qjl_dims` storage dims and a
Gaussian S [m, qjl_dims] (entries N(0, 1)), the cache stores sign(S r) (m bits) and ||r|| (fp16).
For a query q (same dims), E_S[ sign(s.r) (s.q) ] = sqrt(2/pi) <q, r> / ||r||, so

    <q, r>  ~=  sqrt(pi/2) / m * ||r|| * <S q, sign(S r)>        (unbiased over S)

Attention adds this to q.dequant(k) before the softmax scale, which makes the logits unbiased.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def qjl_matrix(m: int, dims: int, generator: torch.Generator) -> Tensor:
    """Gaussian sketch matrix S [m, dims], entries N(0, 1), float32."""
    return torch.randn(m, dims, generator=generator)


def sketch(residual: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """residual [..., dims] -> (sign bits {0,1} int64 [..., m] (1 = S r >= 0), fp16-rounded ||r|| float32 [...])."""
    r = residual.float()
    proj = r @ S.to(r.device).t()
    bits = (proj >= 0).to(torch.int64)
    norm = r.pow(2).sum(-1).sqrt().clamp(max=65504.0).to(torch.float16).float()
    return bits, norm


def estimate_inner(q: Tensor, bits: Tensor, norm: Tensor, S: Tensor) -> Tensor:
    """Elementwise estimate of <q, r> for matching leading shapes: q [..., dims], bits [..., m], norm [...]."""
    m = S.shape[0]
    signs = bits.float() * 2 - 1
    sq = q.float() @ S.to(q.device).t()
    return math.sqrt(math.pi / 2) / m * norm * (sq * signs).sum(-1)


def score_correction(q_store: Tensor, bits: Tensor, norm: Tensor, S: Tensor) -> Tensor:
    """Estimated <q, r_k> for every (query, key) pair, to add to q.dequant(k) (before any softmax scale).

    q_store [B, Hq, Sq, d] (only the first S.shape[1] dims are used), bits [B, Hkv, Sk, m] from
    `sketch`, norm [B, Hkv, Sk]. Hq must be a multiple of Hkv; query head h reads kv-head
    h // (Hq // Hkv) (the HF repeat_kv order). Returns float32 [B, Hq, Sq, Sk]."""
    B, Hq, Sq, _ = q_store.shape
    Hkv, Sk, m = bits.shape[1], bits.shape[2], S.shape[0]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of kv-heads {Hkv}")
    G = Hq // Hkv
    dims = S.shape[1]
    sq = q_store[..., :dims].float() @ S.to(q_store.device).t()  # [B, Hq, Sq, m]
    sq = sq.reshape(B, Hkv, G * Sq, m)
    signs = bits.float() * 2 - 1  # [B, Hkv, Sk, m]
    dots = sq @ signs.transpose(-1, -2)  # [B, Hkv, G*Sq, Sk]
    corr = dots * (math.sqrt(math.pi / 2) / m) * norm.float().unsqueeze(-2)
    return corr.reshape(B, Hq, Sq, Sk)
