"""QJL: the 1-bit residual sketch gives an unbiased inner-product estimate."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from sqcompile.quant import build_codec
from sqcompile.quant.qjl import estimate_inner, score_correction, sketch


def test_qjl_estimator_is_unbiased_over_sketch_draws():
    g = torch.Generator().manual_seed(0)
    dims, m, draws = 32, 32, 4000
    q = torch.randn(dims, generator=g)
    r = torch.randn(dims, generator=g) * 0.3
    S = torch.randn(draws, m, dims, generator=g)  # one independent sketch per draw
    proj = torch.einsum("nmd,d->nm", S, r)
    bits = (proj >= 0).long()
    norm = r.norm().to(torch.float16).float()
    est = math.sqrt(math.pi / 2) / m * norm * ((torch.einsum("nmd,d->nm", S, q)) * (bits * 2 - 1)).sum(-1)
    true = float(q @ r) * float(norm / r.norm())  # the stored norm is fp16-rounded
    err = est - true
    se = float(err.std()) / math.sqrt(draws)
    assert abs(float(err.mean())) < 3 * se
    # the library's helpers agree with the formula for one draw
    b0, n0 = sketch(r[None], S[0])
    assert torch.allclose(estimate_inner(q[None], b0, n0, S[0]), est[:1], rtol=1e-4, atol=1e-5)


def test_score_correction_gqa_and_codec_integration():
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, Sq, Sk, d = 1, 2, 3, 4, 5, 64
    codec = build_codec(None, bits=3.25, num_layers=1, num_kv_heads=Hkv, head_dim=d, qjl="all")
    assert codec.has_qjl(0)
    k = torch.randn(B, Hkv, Sk, d, generator=g)
    q = torch.randn(B, Hkv * G, Sq, d, generator=g)
    corr = codec.qjl_correction(0, q, k)
    assert corr.shape == (B, Hkv * G, Sq, Sk)
    packed = codec.pack("key", 0, k)
    assert torch.allclose(codec.qjl_correction(0, q, packed_keys=packed), corr)
    # query head h reads kv-head h // G
    bits, norm = codec.qjl_sketch(0, k)
    S = codec.layers[0].qjl_matrix
    for h in range(Hkv * G):
        want = estimate_inner(q[0, h, :, None, :], bits[0, h // G][None], norm[0, h // G][None], S)
        assert torch.allclose(corr[0, h], want, rtol=1e-4, atol=1e-4)


def test_qjl_correction_reduces_bias_of_scores_on_average():
    """Averaged over many seeds (sketch matrices), corrected scores centre on the true scores."""
    g = torch.Generator().manual_seed(2)
    d = 64
    k = torch.randn(1, 1, 64, d, generator=g)
    q = torch.randn(1, 1, 1, d, generator=g) + k[:, :, :1] * 2  # a query aligned with key 0
    errs = []
    for seed in range(40):
        codec = build_codec(None, bits=2.2857, num_layers=1, num_kv_heads=1, head_dim=d, qjl="all", seed=seed)
        kq = codec.fake_quant("key", 0, k)
        true = (q @ k.transpose(-1, -2))
        approx = (q @ kq.transpose(-1, -2)) + codec.qjl_correction(0, q, k)
        errs.append((approx - true).reshape(-1))
    errs = torch.stack(errs)  # [seeds, keys]
    mean, se = errs.mean(0), errs.std(0) / math.sqrt(errs.shape[0])
    assert float((mean.abs() < 3.5 * se).float().mean()) > 0.9
