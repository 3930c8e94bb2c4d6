"""decode_attention: the Triton kernels (Triton interpreter on CPU) against the torch reference.

The Triton tests carry the `interpreter` marker: tests/conftest.py sets TRITON_INTERPRET=1 where no CUDA device is
present, before triton is imported.
"""
from __future__ import annotations

import math

import pytest
import torch

from sqcompile.kernels import decode_attention as da
from sqcompile.kernels._bitplanes import PackedLayout, kernel_args
from sqcompile.quant.format import Group, TensorFormat


# ------------------------------------------------------------------------------------------------
# random formats and caches (shared with test_quantize_write.py)
# ------------------------------------------------------------------------------------------------

def random_codebook(bits: int, gen: torch.Generator) -> torch.Tensor:
    levels = torch.randn(1 << bits, generator=gen).sort().values
    return levels + torch.arange(1 << bits) * 1e-3  # strictly ascending


def make_format(kind: str, d: int, kv_heads: int, gen: torch.Generator, qjl: int = 0) -> TensorFormat:
    """kind: 'turbo4' (one 4-bit token group), 'hybrid' (8-bit channel + 2-bit token + 0-bit tail),
    'three' (3 groups: channel 6b, token 3b, token 1b of odd size)."""
    cs = torch.rand(kv_heads, d, generator=gen) + 0.5
    if kind == "turbo4":
        groups = [Group(0, d, 4, "token", random_codebook(4, gen))]
    elif kind == "turbo2":
        groups = [Group(0, d, 2, "token", random_codebook(2, gen))]
    elif kind == "hybrid":
        groups = [Group(0, 8, 8, "channel", random_codebook(8, gen)),
                  Group(8, d - 8, 2, "token", random_codebook(2, gen)),
                  Group(d - 8, d, 0, "token", torch.zeros(1))]
    elif kind == "three":
        groups = [Group(0, 5, 6, "channel", random_codebook(6, gen)),
                  Group(5, d // 2 + 3, 3, "token", random_codebook(3, gen)),
                  Group(d // 2 + 3, d, 1, "token", random_codebook(1, gen))]
    else:
        raise ValueError(kind)
    return TensorFormat(d, groups, cs, qjl_dims=16 if qjl else 0, qjl_bits=qjl)


def random_cache(fmt: TensorFormat, B: int, H: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Random bytes in every row, with the fp16 token scales and QJL norm made finite and positive."""
    rows = torch.randint(0, 256, (B, H, T, fmt.bytes_per_token()), generator=gen, dtype=torch.uint8)
    layout = PackedLayout.from_format(fmt)
    offs = [g.scale_offset for g in layout.groups if g.scale_offset >= 0]
    if layout.has_qjl:
        offs.append(layout.qjl_norm_offset)
    for off in offs:
        s = (torch.rand(B, H, T, generator=gen) * 2 + 0.1).to(torch.float16).view(torch.int16).to(torch.int32)
        rows[..., off] = (s & 0xFF).to(torch.uint8)
        rows[..., off + 1] = ((s >> 8) & 0xFF).to(torch.uint8)
    # code padding bits must be 0 by the format; random bits there are harmless but keep rows valid
    return rows


def random_basis(H: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(H, d, d, generator=gen, dtype=torch.float64))[0].to(torch.float32)


def attention_args(kfmt, vfmt, H, d, gen):
    kg, kcb, kcs = kernel_args(kfmt)
    vg, vcb, vcs = kernel_args(vfmt)
    S = torch.randn(H, kfmt.qjl_bits, kfmt.qjl_dims, generator=gen) if kfmt.qjl_bits else None
    return dict(k_basis=random_basis(H, d, gen), k_codebooks=kcb, k_channel_scale=kcs, v_codebooks=vcb,
                v_channel_scale=vcs, k_qjl_proj=S, k_groups=kg, v_groups=vg, qjl_dims=kfmt.qjl_dims,
                qjl_bits=kfmt.qjl_bits)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------------
# interpreter plumbing
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

CASES = [
    # (name, B, Hq, Hkv, d, T capacity, lengths, k kind, v kind, qjl bits, block_n, (unpack, lookup), splits)
    ("gqa1_d64_turbo4", 2, 2, 2, 64, 50, [37, 1], "turbo4", "turbo4", 0, 16, (1, 1), 2),
    ("gqa4_d128_hybrid_qjl", 1, 8, 2, 128, 40, [40], "hybrid", "turbo2", 24, 16, (0, 1), 3),
    ("gqa8_d64_three", 2, 8, 1, 64, 70, [70, 17], "three", "three", 0, 32, (1, 2), 0),
    ("gqa4_d64_gather_full", 1, 4, 1, 64, 48, [48], "turbo2", "hybrid", 8, 16, (0, 0), 1),
    ("gqa4_d128_unpack1_gather", 1, 4, 1, 128, 20, [19], "turbo4", "three", 0, 16, (1, 0), 2),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_attention_matches_reference(case):
    name, B, Hq, Hkv, d, T, lengths, kk, vk, qjl, block_n, (unpack, lookup), splits = case
    gen = torch.Generator().manual_seed(hash(name) % 2**31)
    kfmt = make_format(kk, d, Hkv, gen, qjl=qjl)
    vfmt = make_format(vk, d, Hkv, gen)
    args = attention_args(kfmt, vfmt, Hkv, d, gen)
    kp = random_cache(kfmt, B, Hkv, T, gen)
    vp = random_cache(vfmt, B, Hkv, T, gen)
    q = torch.randn(B, Hq, d, generator=gen)
    lens = torch.tensor(lengths, dtype=torch.int32)
    scale = 1 / math.sqrt(d) * 0.3
    ref = da.decode_attention_reference(q, kp, vp, lens, scale=scale, **args)
    out = da.decode_attention_triton(q, kp, vp, lens, scale=scale, num_splits=splits, block_n=block_n,
                                     unpack=unpack, lookup=lookup, poison=True, **args)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3, rel_err(out, ref)


@pytest.mark.interpreter
def test_reduce_handles_empty_splits():
    """More splits than blocks: empty splits must not poison the merge."""
    gen = torch.Generator().manual_seed(7)
    d, Hkv = 64, 1
    kfmt, vfmt = make_format("turbo4", d, Hkv, gen), make_format("turbo4", d, Hkv, gen)
    args = attention_args(kfmt, vfmt, Hkv, d, gen)
    kp, vp = random_cache(kfmt, 1, Hkv, 64, gen), random_cache(vfmt, 1, Hkv, 64, gen)
    q = torch.randn(1, 4, d, generator=gen)
    lens = torch.tensor([3], dtype=torch.int32)
    ref = da.decode_attention_reference(q, kp, vp, lens, scale=0.1, **args)
    out = da.decode_attention_triton(q, kp, vp, lens, scale=0.1, num_splits=4, block_n=16, poison=True, **args)
    assert rel_err(out, ref) < 2e-3


def test_op_cpu_reference_and_compile():
    """The registered op runs its torch reference on CPU, eagerly and under torch.compile."""
    gen = torch.Generator().manual_seed(3)
    d, Hkv, B, T = 64, 2, 2, 20
    kfmt, vfmt = make_format("hybrid", d, Hkv, gen, qjl=16), make_format("turbo4", d, Hkv, gen)
    args = attention_args(kfmt, vfmt, Hkv, d, gen)
    kp, vp = random_cache(kfmt, B, Hkv, T, gen), random_cache(vfmt, B, Hkv, T, gen)
    q = torch.randn(B, 8, d, generator=gen)
    lens = torch.tensor([20, 5], dtype=torch.int32)
    ref = da.decode_attention_reference(q, kp, vp, lens, scale=0.125, **args)
    out = torch.ops.sqcompile.decode_attention(q, kp, vp, lens, scale=0.125, **args)
    torch.testing.assert_close(out, ref)

    def f(q, kp, vp, lens):
        return torch.ops.sqcompile.decode_attention(q, kp, vp, lens, scale=0.125, **args) * 2

    out_c = torch.compile(f, backend="aot_eager", fullgraph=True)(q, kp, vp, lens)
    torch.testing.assert_close(out_c, ref * 2)


def test_reference_matches_dense_attention():
    """The reference itself: dequantize with sqcompile.quant, then SDPA in storage coordinates."""
    gen = torch.Generator().manual_seed(11)
    d, Hkv, B, T, G = 64, 2, 1, 12, 2
    kfmt, vfmt = make_format("turbo4", d, Hkv, gen), make_format("three", d, Hkv, gen)
    args = attention_args(kfmt, vfmt, Hkv, d, gen)
    kp, vp = random_cache(kfmt, B, Hkv, T, gen), random_cache(vfmt, B, Hkv, T, gen)
    from sqcompile.quant import packing
    k = kfmt.decode(*packing.unpack(kfmt, kp)[:2], torch.empty(B, Hkv, T, d))
    v = vfmt.decode(*packing.unpack(vfmt, vp)[:2], torch.empty(B, Hkv, T, d))
    q = torch.randn(B, Hkv * G, d, generator=gen)
    # unrotated keys: k_orig = k_store @ B (mean dropped); q . k_orig = (q @ B^T) . k_store
    k_orig = torch.einsum("bhte,hed->bhtd", k, args["k_basis"])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k_orig.repeat_interleave(G, 1), v.repeat_interleave(G, 1), scale=0.2)[:, :, 0]
    out = da.decode_attention_reference(q, kp, vp, torch.tensor([T], dtype=torch.int32), scale=0.2, **args)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits,qjl", [(4.25, False), (3.25, False), (2.69, False), (3.25, True)])
def test_kernel_layout_matches_quant_format(bits, qjl):
    """The kernels' byte offsets (PackedLayout) equal sqcompile.quant's TensorFormat.layout()."""
    from sqcompile.quant.codec import build_codec

    codec = build_codec(None, bits=bits, method="turboquant", num_layers=1, num_kv_heads=2, head_dim=64,
                        qjl="all" if qjl else False)
    gen = torch.Generator().manual_seed(0)
    fmts = [codec.format("key", 0), codec.format("value", 0)] + [make_format(k, 64, 2, gen, q) for k, q in
                                                                 (("hybrid", 16), ("three", 0))]
    for fmt in fmts:
        layout = PackedLayout.from_format(fmt)
        assert layout.row_bytes == fmt.bytes_per_token()
        offsets = {name: off for name, off, _ in fmt.layout()}
        for i, g in enumerate(layout.groups):
            if g.bits:
                assert offsets[f"group{i}[{g.start}:{g.stop}].plane0"] == g.plane_offset
            if g.scale_offset >= 0:
                assert offsets[f"group{i}.scale_fp16"] == g.scale_offset
            else:
                assert f"group{i}.scale_fp16" not in offsets
        if layout.has_qjl:
            assert offsets[f"qjl.signs[{fmt.qjl_bits}]"] == layout.qjl_offset
            assert offsets["qjl.residual_norm_fp16"] == layout.qjl_norm_offset


@pytest.mark.interpreter
def test_length_beyond_capacity_is_clamped():
    """A length larger than the cache reads the whole cache, never past it (same as the reference)."""
    gen = torch.Generator().manual_seed(9)
    d, Hkv, T = 64, 1, 20
    kfmt, vfmt = make_format("turbo2", d, Hkv, gen), make_format("turbo2", d, Hkv, gen)
    args = attention_args(kfmt, vfmt, Hkv, d, gen)
    kp, vp = random_cache(kfmt, 1, Hkv, T, gen), random_cache(vfmt, 1, Hkv, T, gen)
    q = torch.randn(1, 2, d, generator=gen)
    ref = da.decode_attention_reference(q, kp, vp, torch.tensor([T], dtype=torch.int32), scale=0.1, **args)
    out = da.decode_attention_triton(q, kp, vp, torch.tensor([T + 50], dtype=torch.int32), scale=0.1,
                                     block_n=16, num_splits=2, poison=True, **args)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.interpreter
def test_kv_mask_matches_reference_and_masks_padding():
    """kv_mask (padding, sliding windows): the kernel equals the reference, including a fully masked block,
    and masked tokens have no effect on the output."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, d, T = 2, 4, 1, 64, 48
    kfmt, vfmt = make_format("turbo4", d, Hkv, gen), make_format("hybrid", d, Hkv, gen)
    args = attention_args(kfmt, vfmt, Hkv, d, gen)
    kp, vp = random_cache(kfmt, B, Hkv, T, gen), random_cache(vfmt, B, Hkv, T, gen)
    q = torch.randn(B, Hq, d, generator=gen)
    lens = torch.tensor([48, 30], dtype=torch.int32)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :20] = False  # left padding covering a whole block of 16
    mask[1, 5:9] = False
    ref = da.decode_attention_reference(q, kp, vp, lens, scale=0.125, kv_mask=mask, **args)
    out = da.decode_attention_triton(q, kp, vp, lens, scale=0.125, num_splits=3, block_n=16, poison=True,
                                     kv_mask=mask, **args)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3
    # changing masked tokens' bytes changes nothing
    kp2 = kp.clone()
    kp2[0, :, :20] = random_cache(kfmt, 1, Hkv, 20, gen)[0]
    ref2 = da.decode_attention_reference(q, kp2, vp, lens, scale=0.125, kv_mask=mask, **args)
    assert torch.allclose(ref2, ref, atol=1e-6)
