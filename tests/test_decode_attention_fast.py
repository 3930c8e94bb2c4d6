"""The fast packed layout (sqcompile.quant.fast_layout) and its decode-attention kernels
(sqcompile.kernels.decode_attention_fast, Triton interpreter on CPU) against the torch reference.

The Triton tests carry the `interpreter` marker (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
"""
from __future__ import annotations

import math

import pytest
import torch

from sqcompile.kernels import decode_attention_fast as fa
from sqcompile.prototype.decode_attention_variants import decode_attention_fast_variant
from sqcompile.quant.fast_layout import (FastGroup, FastLayout, gaussian_step, layout_for_budget,
                                         uniform_mse)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_cache(lay: FastLayout, B, H, T, gen):
    """Random code bytes, fp16 token scales finite and positive."""
    rows = torch.randint(0, 256, (B, H, T, lay.bytes_per_token()), generator=gen, dtype=torch.uint8)
    for off in lay.scale_offsets():
        if off < 0:
            continue
        s = (torch.rand(B, H, T, generator=gen) * 2 + 0.1).to(torch.float16).view(torch.int16).to(torch.int32)
        rows[..., off] = (s & 0xFF).to(torch.uint8)
        rows[..., off + 1] = ((s >> 8) & 0xFF).to(torch.uint8)
    return rows


def make_args(kl: FastLayout, vl: FastLayout, H: int, gen):
    d = kl.head_dim
    basis = torch.linalg.qr(torch.randn(H, d, d, generator=gen, dtype=torch.float64))[0].to(torch.float32)
    cs = torch.rand(H, d, generator=gen) + 0.5
    return dict(k_basis=basis, k_factor=kl.column_factor(cs, H), v_factor=vl.column_factor(cs, H),
                k_groups=kl.flat_groups(), v_groups=vl.flat_groups())


MIXED_K = FastLayout(64, (FastGroup(0, 16, 8, "channel"), FastGroup(16, 48, 1), FastGroup(48, 64, 0)))
MIXED_V = FastLayout(64, (FastGroup(0, 32, 4), FastGroup(32, 64, 8, "channel")))

CASES = [
    # (name, B, Hq, Hkv, d, T, lengths, layouts (budget or explicit), block_n, splits, mode)
    ("gqa1_d64_2.69_ragged", 2, 2, 2, 64, 50, [37, 1], 2.69, 16, 2, 0),
    ("gqa4_d128_3.25_full", 1, 8, 2, 128, 40, [40], 3.25, 16, 3, 1),
    ("gqa8_d64_4.25", 2, 8, 1, 64, 70, [70, 17], 4.25, 32, 0, 1),
    ("gqa4_d128_2.69_len1", 2, 4, 1, 128, 24, [1, 23], 2.69, 16, 2, 0),
    ("gqa4_d64_mixed_bits", 1, 4, 1, 64, 33, [33], (MIXED_K, MIXED_V), 16, 2, 1),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fast_kernel_matches_reference(case):
    name, B, Hq, Hkv, d, T, lengths, lay, block_n, splits, mode = case
    gen = torch.Generator().manual_seed(abs(hash(name)) % 2**31)
    kl, vl = layout_for_budget(lay, d) if isinstance(lay, float) else lay
    args = make_args(kl, vl, Hkv, gen)
    kp, vp = random_cache(kl, B, Hkv, T, gen), random_cache(vl, B, Hkv, T, gen)
    q = torch.randn(B, Hq, d, generator=gen)
    lens = torch.tensor(lengths, dtype=torch.int32)
    scale = 0.5 / math.sqrt(d)
    ref = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, **args)
    out = decode_attention_fast_variant(q, kp, vp, lens, scale=scale, num_splits=splits, block_n=block_n,
                                        mode=mode, poison=True, **args)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3, rel_err(out, ref)


@pytest.mark.interpreter
def test_fast_kernel_transposed_scores_and_empty_splits():
    """trans_k=1 (scores^T = codes @ q^T) and more splits than blocks give the same result."""
    gen = torch.Generator().manual_seed(5)
    kl, vl = layout_for_budget(3.25, 64)
    args = make_args(kl, vl, 1, gen)
    kp, vp = random_cache(kl, 1, 1, 48, gen), random_cache(vl, 1, 1, 48, gen)
    q = torch.randn(1, 4, 64, generator=gen)
    lens = torch.tensor([5], dtype=torch.int32)
    ref = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=0.1, **args)
    out = decode_attention_fast_variant(q, kp, vp, lens, scale=0.1, num_splits=4, block_n=16, trans_k=1,
                                        poison=True, **args)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.interpreter
def test_fast_kernel_kv_mask_matches_reference():
    """kv_mask (padding, sliding windows): kernel and op equal the reference, including fully masked blocks
    (before and after valid tokens) and a fully masked split, for a [B, T] bool view, a [1, T] int mask
    broadcast over the batch and lazy/eager sums; masked tokens have no effect on the output."""
    gen = torch.Generator().manual_seed(23)
    B, Hq, Hkv, d, T = 2, 8, 2, 64, 160
    kl, vl = layout_for_budget(3.25, d)
    args = make_args(kl, vl, Hkv, gen)
    kp, vp = random_cache(kl, B, Hkv, T, gen), random_cache(vl, B, Hkv, T, gen)
    q = torch.randn(B, Hq, d, generator=gen)
    lens = torch.tensor([150, 117], dtype=torch.int32)
    scale = 0.5 / math.sqrt(d)
    full = torch.ones(B, 1, 3, T, dtype=torch.bool)  # HF-style [B, 1, q_len, T]; the op gets a strided view
    full[0, 0, -1, :50] = False  # left padding: 4 splits of 48 -> split 0 fully masked, blocks 0-2 of 16 too
    full[0, 0, -1, 64:80] = False  # a fully masked block after valid tokens of its split
    full[1, 0, -1, :5] = False  # short left padding
    full[1, 0, -1, 64:96] = False  # row 1 (length 117): 4 splits of 32 -> split 2 fully masked
    full[1, 0, -1, 100:103] = False
    bmask = full[:, 0, -1]
    assert not bmask.is_contiguous()
    wmask = torch.ones(1, T, dtype=torch.int32)  # [1, T], integer: a window shared by the batch
    wmask[0, :37] = 0
    wmask[0, 90:91] = 0
    variants = [dict(block_n=16, num_splits=4, mode=0), dict(block_n=32, num_splits=3, mode=1, lazy=0)]
    for mask in (bmask, wmask):
        ref = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, kv_mask=mask, **args)
        nomask = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, **args)
        assert torch.isfinite(ref).all() and rel_err(nomask, ref) > 1e-2  # the mask matters
        for kw in variants:
            out = decode_attention_fast_variant(q, kp, vp, lens, scale=scale, poison=True, kv_mask=mask,
                                                **kw, **args)
            assert torch.isfinite(out).all()
            assert rel_err(out, ref) < 2e-3, (kw, rel_err(out, ref))
        op = torch.ops.sqcompile.decode_attention_fast(q, kp, vp, lens, scale=scale, num_splits=4, kv_mask=mask,
                                                       **args)
        torch.testing.assert_close(op, ref)

        # masked tokens do not matter: new codes (and scales) for them leave the output unchanged
        drop = (~(mask.expand(B, T) != 0))[:, None, :, None]
        kp2 = torch.where(drop, random_cache(kl, B, Hkv, T, gen), kp)
        vp2 = torch.where(drop, random_cache(vl, B, Hkv, T, gen), vp)
        assert not torch.equal(kp2, kp) and not torch.equal(vp2, vp)
        ref2 = fa.decode_attention_fast_reference(q, kp2, vp2, lens, scale=scale, kv_mask=mask, **args)
        torch.testing.assert_close(ref2, ref, atol=1e-6, rtol=0)
        # the kernel never reads them: even all-0xFF rows (NaN fp16 scales) give bit-identical output
        kw = variants[0]
        out = decode_attention_fast_variant(q, kp, vp, lens, scale=scale, kv_mask=mask, **kw, **args)
        out2 = decode_attention_fast_variant(q, kp2.masked_fill(drop, 255), vp2.masked_fill(drop, 255), lens,
                                             scale=scale, kv_mask=mask, **kw, **args)
        assert torch.equal(out2, out)

    # an all-False mask: zeros, no NaN (every split empty)
    none = torch.zeros(1, T, dtype=torch.bool)
    out = fa.decode_attention_fast_triton(q, kp, vp, lens, scale=scale, num_splits=4, block_n=16, poison=True,
                                          kv_mask=none, **args)
    assert torch.equal(out, torch.zeros_like(out))
    ref = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, kv_mask=none, **args)
    assert torch.equal(ref, torch.zeros_like(ref))


def test_reference_equals_dense_attention_on_quantized_data():
    """The op's reference == SDPA on FastLayout.dequantize'd K/V (keys unrotated with the basis)."""
    gen = torch.Generator().manual_seed(11)
    d, H, G, T = 64, 2, 2, 12
    kl, vl = layout_for_budget(2.69, d)
    x_k, x_v = torch.randn(1, H, T, d, generator=gen), torch.randn(1, H, T, d, generator=gen)
    args = make_args(kl, vl, H, gen)
    kp, vp = kl.quantize(x_k), vl.quantize(x_v)
    k, v = kl.dequantize(kp), vl.dequantize(vp)
    q = torch.randn(1, H * G, d, generator=gen)
    k_orig = torch.einsum("bhte,hed->bhtd", k, args["k_basis"])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k_orig.repeat_interleave(G, 1), v.repeat_interleave(G, 1), scale=0.2)[:, :, 0]
    out = fa.decode_attention_fast_reference(q, kp, vp, torch.tensor([T], dtype=torch.int32), scale=0.2, **args)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_op_cpu_and_compile():
    gen = torch.Generator().manual_seed(3)
    kl, vl = layout_for_budget(4.25, 64)
    args = make_args(kl, vl, 2, gen)
    kp, vp = random_cache(kl, 2, 2, 20, gen), random_cache(vl, 2, 2, 20, gen)
    q = torch.randn(2, 8, 64, generator=gen)
    lens = torch.tensor([20, 5], dtype=torch.int32)
    ref = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=0.125, **args)
    torch.testing.assert_close(torch.ops.sqcompile.decode_attention_fast(q, kp, vp, lens, scale=0.125, **args), ref)

    def f(q, kp, vp, lens):
        return torch.ops.sqcompile.decode_attention_fast(q, kp, vp, lens, scale=0.125, **args) * 2

    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(q, kp, vp, lens), ref * 2)


# ------------------------------------------------------------------------------------------------
# layout: pack/unpack, accounting, quantizer
# ------------------------------------------------------------------------------------------------

LAYOUTS = [layout_for_budget(b, d)[i] for b in (4.25, 3.25, 2.69) for d in (64, 128) for i in (0, 1)] + [
    MIXED_K, MIXED_V, FastLayout(16, (FastGroup(0, 8, 1), FastGroup(8, 16, 8)))]


@pytest.mark.parametrize("lay", LAYOUTS, ids=[lay.describe().split(" =")[0] for lay in LAYOUTS])
def test_pack_unpack_round_trip_and_accounting(lay):
    gen = torch.Generator().manual_seed(0)
    H = 2
    cs = torch.rand(H, lay.head_dim, generator=gen) + 0.5
    x = torch.randn(3, H, 7, lay.head_dim, generator=gen) * 3
    codes, scales = lay.encode(x, cs)
    packed = lay.pack(codes, scales)
    assert packed.dtype == torch.uint8 and packed.shape == (3, H, 7, lay.bytes_per_token())
    expect = sum(g.n * g.bits // 8 + (2 if g.stores_scale else 0) for g in lay.groups)
    assert lay.bytes_per_token() == expect
    codes2, scales2 = lay.unpack(packed)
    for g, c, c2, s, s2 in zip(lay.groups, codes, codes2, scales, scales2):
        if g.bits:
            assert torch.equal(c, c2) and int(c.max()) < (1 << g.bits) and int(c.min()) >= 0
        if g.stores_scale:
            assert torch.equal(s, s2)
    torch.testing.assert_close(lay.dequantize(packed, cs), lay.decode(codes, scales, cs))


def test_byte_layout_is_little_endian_inside_bytes():
    lay = FastLayout(16, (FastGroup(0, 8, 4), FastGroup(8, 16, 2)))
    c4 = torch.arange(8)[None] % 16
    c2 = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]])
    p = lay.pack([c4, c2], [torch.tensor([1.0]), torch.tensor([2.0])])[0]
    assert p[:4].tolist() == [0x10, 0x32, 0x54, 0x76]  # byte j = coord 2j (low nibble) | 2j+1 << 4
    assert p[4:6].tolist() == [0b11100100, 0b00011011]  # 4 crumbs a byte, coord 4j in bits 0-1
    assert p[6:8].tolist() == [0x00, 0x3C] and p[8:10].tolist() == [0x00, 0x40]  # fp16 1.0, 2.0
    assert lay.code_offsets() == [0, 4] and lay.scale_offsets() == [6, 8] and lay.bytes_per_token() == 10


def test_quantizer_uniform_levels_and_error():
    lay = FastLayout(128, (FastGroup(0, 128, 4),))
    x = torch.randn(4000, 128, generator=torch.Generator().manual_seed(1))
    codes, scales = lay.encode(x[None])
    s = scales[0][0]
    c = x / s[:, None]
    step = gaussian_step(4)
    level = (codes[0][0].float() - 7.5) * step
    # nearest uniform level inside the range; clamped outside
    inside = c.abs() < 7.5 * step
    assert ((c - level).abs()[inside] <= step / 2 + 1e-5).all()
    mse = ((lay.dequantize(lay.quantize(x[None]))[0] - x) ** 2).mean() / (x ** 2).mean()
    assert abs(mse.item() - uniform_mse(4, step)) < 0.003  # ~0.0115: the Gaussian-optimal 4-bit uniform MSE


def test_gaussian_steps_and_budgets():
    assert abs(gaussian_step(1) - 1.5958) < 1e-3 and abs(gaussian_step(2) - 0.9957) < 1e-3
    assert abs(gaussian_step(4) - 0.3352) < 1e-3
    for d in (64, 128):
        for budget in (4.25, 3.25, 2.69):
            k, v = layout_for_budget(budget, d)
            tot = k.bytes_per_token() + v.bytes_per_token()
            assert tot <= 2 * budget * d / 8 and k.bytes_per_token() % 2 == 0 and v.bytes_per_token() % 2 == 0
            k4, v4 = layout_for_budget(budget, d, align=4)
            assert k4.bytes_per_token() % 4 == 0 and v4.bytes_per_token() % 4 == 0
    k, v = layout_for_budget(3.25, 128)
    assert k.bytes_per_token() + v.bytes_per_token() == 104
    k, v = layout_for_budget(4.25, 128)
    assert k.bytes_per_token() + v.bytes_per_token() == 136
    k, v = layout_for_budget(2.69, 128)
    assert (k.bytes_per_token(), v.bytes_per_token()) == (34, 52)
