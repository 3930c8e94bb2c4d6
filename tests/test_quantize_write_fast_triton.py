"""sqcompile::quantize_write_fast_triton (sqcompile.kernels.quantize_write_fast_triton, Triton interpreter on
CPU) against its torch reference sqcompile.kernels.fast_cache.quantize_write_fast.

The Triton tests carry the `interpreter` marker (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from sqcompile.kernels import fast_cache
from sqcompile.kernels import quantize_write_fast_triton as qwf
from sqcompile.quant.fast_layout import FastGroup, FastLayout, layout_for_budget

op = torch.ops.sqcompile.quantize_write_fast_triton

# a 1-bit group, a 0-bit group, an 8-bit group; V: a 1-byte group, so the scales sit at odd offsets
MIXED_64 = (FastLayout(64, (FastGroup(0, 16, 8), FastGroup(16, 48, 1), FastGroup(48, 64, 0))),
            FastLayout(64, (FastGroup(0, 8, 1), FastGroup(8, 40, 4), FastGroup(40, 64, 2))))
# a 112-dim 2-bit group (28 code bytes, not a power of two); V: four coded groups (the most) and a 0-bit one
MIXED_128 = (FastLayout(128, (FastGroup(0, 16, 8), FastGroup(16, 128, 2))),
             FastLayout(128, (FastGroup(0, 32, 4), FastGroup(32, 40, 1), FastGroup(40, 64, 0),
                              FastGroup(64, 96, 2), FastGroup(96, 128, 8))))

LAYOUTS = {f"d{d}_{b}": layout_for_budget(b, d) for d in (64, 128) for b in (2.69, 3.25, 4.25)}
LAYOUTS.update({"d64_mixed": MIXED_64, "d128_mixed": MIXED_128})
DTYPES = (torch.float32, torch.bfloat16)
# the GEMV path (one row a program; the default up to qwf.GEMV_MAX_ROWS rows per kv-head) is the slower one to
# interpret: it gets the (B, T_new) pairs of up to 5 rows, the tl.dot path (16 rows a program) all of them
CASES = ([("gemv",) + c for c in itertools.product(LAYOUTS, ((1, 1), (1, 5), (3, 1)), DTYPES)]
         + [("dot",) + c for c in itertools.product(LAYOUTS, ((1, 1), (1, 5), (3, 1), (3, 5)), DTYPES)])


@pytest.fixture
def path(request, monkeypatch):
    """Force the kernel's GEMV or tl.dot path (it picks by the number of rows per kv-head)."""
    monkeypatch.setattr(qwf, "GEMV_MAX_ROWS", 10**9 if request.param == "gemv" else -1)
    return request.param


def make_inputs(d, H, B, T, dtype, gen, extra=4):
    cap = T + extra
    key = (torch.randn(B, H, T, d, generator=gen) * 2 + 0.5).to(dtype)
    v_store = torch.randn(B, H, T, d, generator=gen).to(dtype)
    k_basis = torch.linalg.qr(torch.randn(H, d, d, generator=gen, dtype=torch.float64))[0].to(torch.float32)
    k_mean = torch.randn(H, d, generator=gen) * 0.3
    positions = torch.randperm(cap, generator=gen)[:T]
    return key, v_store, k_basis, k_mean, positions, cap


def poisoned(lay: FastLayout, B, H, cap, gen):
    return torch.randint(0, 256, (B, H, cap, lay.bytes_per_token()), generator=gen, dtype=torch.uint8)


def code_and_scale_bytes(lay: FastLayout):
    codes = torch.zeros(lay.bytes_per_token(), dtype=torch.bool)
    codes[:sum(g.code_bytes for g in lay.groups)] = True
    return codes, ~codes


def assert_rows_match(lay: FastLayout, got: torch.Tensor, ref: torch.Tensor, positions: torch.Tensor, what: str):
    """Untouched rows identical; written rows: same decoded values within one level, >= 98% identical code
    bytes, fp16 scales identical or 1 ulp apart."""
    written = torch.zeros(got.shape[2], dtype=torch.bool)
    written[positions] = True
    assert torch.equal(got[:, :, ~written], ref[:, :, ~written]), f"{what}: rows not at positions changed"
    g, r = got[:, :, written], ref[:, :, written]
    is_code, is_scale = code_and_scale_bytes(lay)
    same = (g[..., is_code] == r[..., is_code]).float().mean().item() if is_code.any() else 1.0
    assert same >= 0.98, f"{what}: only {same:.2%} of code bytes match the reference"
    _, s_got = lay.unpack(g)
    _, s_ref = lay.unpack(r)
    for sg, sr in zip(s_got, s_ref):
        if sr is None:
            continue
        ulps = (sg.to(torch.float16).view(torch.int16).int() - sr.to(torch.float16).view(torch.int16).int()).abs()
        assert ulps.max().item() <= 1, f"{what}: fp16 token scales differ by {ulps.max().item()} ulp"
    # one quantization step (x the scale, either side's) per element, plus the scale's 1-ulp difference
    step = torch.zeros(lay.head_dim)
    scale = torch.zeros(r.shape[:-1] + (lay.head_dim,))
    for gr, sr, sg in zip(lay.groups, s_ref, s_got):
        if gr.bits:
            step[gr.start:gr.stop] = gr.step
            scale[..., gr.start:gr.stop] = torch.maximum(sr, sg)[..., None]
    x_got, x_ref = lay.dequantize(g), lay.dequantize(r)
    tol = 1.001 * step * scale + x_ref.abs() * 2.0 ** -10 + 1e-6
    bad = (x_got - x_ref).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} decoded elements differ by more than one level"


def run_both(kl, vl, key, v_store, k_basis, k_mean, positions, cap, gen):
    B, H = key.shape[:2]
    kp, vp = poisoned(kl, B, H, cap, gen), poisoned(vl, B, H, cap, gen)
    kr, vr = kp.clone(), vp.clone()
    op(key, v_store, kp, vp, positions, k_basis, k_mean, kl.spec(), vl.spec())
    fast_cache.quantize_write_fast(key, v_store, kr, vr, positions.long(), k_basis, k_mean, kl.spec(), vl.spec())
    return kp, vp, kr, vr


@pytest.mark.parametrize("path,name,BT,dtype", CASES, indirect=["path"],
                         ids=[f"{p}-{n}-B{bt[0]}-T{bt[1]}-{str(dt)[6:]}" for p, n, bt, dt in CASES])
@pytest.mark.interpreter
def test_matches_reference(path, name, BT, dtype):
    kl, vl = LAYOUTS[name]
    (B, T), H = BT, 2
    gen = torch.Generator().manual_seed(zlib.crc32(f"{path}-{name}-{B}-{T}-{dtype}".encode()))
    key, v_store, k_basis, k_mean, positions, cap = make_inputs(kl.head_dim, H, B, T, dtype, gen)
    kp, vp, kr, vr = run_both(kl, vl, key, v_store, k_basis, k_mean, positions, cap, gen)
    assert_rows_match(kl, kp, kr, positions, "K")
    assert_rows_match(vl, vp, vr, positions, "V")


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["gemv", "dot"], indirect=True)
def test_strided_inputs_fp16_int32_positions(path):
    """key/v_store as HF hands them ([B, T, H, d] transposed), fp16 values, int32 positions, 17 rows (2 blocks
    of 16 on the tl.dot path)."""
    gen = torch.Generator().manual_seed(3)
    kl, vl = layout_for_budget(3.25, 128)
    B, H, T, d = 17, 2, 1, 128
    key = torch.randn(B, T, H, d, generator=gen).transpose(1, 2)
    v_store = torch.randn(B, T, H, d, generator=gen).half().transpose(1, 2)
    k_basis = torch.linalg.qr(torch.randn(H, d, d, generator=gen))[0]
    k_mean = torch.randn(2 * H, d, generator=gen)[::2]  # strided mean
    positions = torch.tensor([6], dtype=torch.int32)
    kp, vp, kr, vr = run_both(kl, vl, key, v_store, k_basis, k_mean, positions, 8, gen)
    assert_rows_match(kl, kp, kr, positions, "K")
    assert_rows_match(vl, vp, vr, positions, "V")


@pytest.mark.interpreter
def test_edge_values():
    """All-zero rows (s = 0), huge rows (s clamps to fp16 max), a NaN (codes 0, as the reference): bytes equal."""
    kl, vl = layout_for_budget(4.25, 64)
    B, H, T, d = 1, 1, 4, 64
    v_store = torch.randn(B, H, T, d)
    v_store[0, 0, 0] = 0.0
    v_store[0, 0, 1] *= 1e6
    v_store[0, 0, 2, 5] = float("nan")
    v_store[0, 0, 3] *= 1e-3
    key = torch.zeros(B, H, T, d)
    k_basis = torch.eye(d)[None]
    k_mean = torch.zeros(H, d)
    positions = torch.arange(T)
    kp, vp, kr, vr = run_both(kl, vl, key, v_store, k_basis, k_mean, positions, T, torch.Generator().manual_seed(0))
    assert torch.equal(kp, kr)
    # the NaN row's scale is NaN on both sides, with a payload that depends on the fp16 conversion
    (off,) = vl.scale_offsets()
    assert torch.isnan(vl.unpack(vp)[1][0][0, 0, 2]) and torch.isnan(vl.unpack(vr)[1][0][0, 0, 2])
    vp[0, 0, 2, off:off + 2] = vr[0, 0, 2, off:off + 2]
    assert torch.equal(vp, vr)


@pytest.mark.interpreter
def test_positions_outside_capacity_are_skipped():
    kl, vl = layout_for_budget(2.69, 64)
    gen = torch.Generator().manual_seed(1)
    key, v_store, k_basis, k_mean, _, cap = make_inputs(64, 1, 1, 2, torch.float32, gen)
    kp, vp = poisoned(kl, 1, 1, cap, gen), poisoned(vl, 1, 1, cap, gen)
    k0, v0 = kp.clone(), vp.clone()
    op(key, v_store, kp, vp, torch.tensor([cap, -1]), k_basis, k_mean, kl.spec(), vl.spec())
    assert torch.equal(kp, k0) and torch.equal(vp, v0)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

def _good():
    kl, vl = layout_for_budget(3.25, 64)
    B, H, T, d, cap = 2, 2, 3, 64, 8
    return dict(key=torch.randn(B, H, T, d), v_store=torch.randn(B, H, T, d),
                k_packed=torch.zeros(B, H, cap, kl.bytes_per_token(), dtype=torch.uint8),
                v_packed=torch.zeros(B, H, cap, vl.bytes_per_token(), dtype=torch.uint8),
                positions=torch.arange(T), k_basis=torch.eye(d).expand(H, d, d).contiguous(),
                k_mean=torch.zeros(H, d), k_layout=kl.spec(), v_layout=vl.spec())


def _channel_spec():
    return FastLayout(64, (FastGroup(0, 64, 4, "channel"),)).spec()


def _five_groups_spec():
    return FastLayout(64, tuple(FastGroup(i, i + 16, 2) for i in range(0, 64, 16))
                      [:3] + (FastGroup(48, 56, 1), FastGroup(56, 64, 1))).spec()


BAD = [
    ("key_3d", lambda a: a.update(key=a["key"][0]), r"key must be \[B, Hkv, T_new, d\]"),
    ("v_shape", lambda a: a.update(v_store=a["v_store"][:, :, :2]), r"v_store must have key's shape"),
    ("key_int", lambda a: a.update(key=a["key"].int()), r"key/v_store must be float32, bfloat16 or float16"),
    ("k_rows", lambda a: a.update(k_packed=a["k_packed"][..., :-1].contiguous()),
     r"k_packed must be \[B=2, Hkv=2, capacity, row_bytes=18\]"),
    ("v_heads", lambda a: a.update(v_packed=a["v_packed"][:, :1].contiguous()), r"v_packed must be \[B=2, Hkv=2"),
    ("k_dtype", lambda a: a.update(k_packed=a["k_packed"].to(torch.int16)), r"k_packed must be uint8"),
    ("k_noncontig", lambda a: a.update(k_packed=torch.zeros(2, 8, 2, 18, dtype=torch.uint8).transpose(1, 2)),
     r"k_packed must be contiguous"),
    ("pos_2d", lambda a: a.update(positions=a["positions"][None]), r"positions must be \[T_new=3\]"),
    ("pos_float", lambda a: a.update(positions=a["positions"].float()), r"positions must be int32 or int64"),
    ("basis_f64", lambda a: a.update(k_basis=a["k_basis"].double()), r"k_basis must be float32 \[Hkv=2, d=64, d=64\]"),
    ("basis_shape", lambda a: a.update(k_basis=a["k_basis"][:1]), r"k_basis must be float32 \[Hkv=2"),
    ("mean_shape", lambda a: a.update(k_mean=a["k_mean"][:, :32]), r"k_mean must be float32 \[Hkv=2, d=64\]"),
    ("spec_garbage", lambda a: a.update(k_layout="0:64:4"), r"k_layout must be a FastLayout spec for head_dim 64"),
    ("spec_wrong_d", lambda a: a.update(v_layout=layout_for_budget(3.25, 128)[1].spec()),
     r"v_layout must be a FastLayout spec for head_dim 64"),
    ("spec_channel", lambda a: a.update(k_layout=_channel_spec()), r"k_layout: expected token-scaled groups only"),
    ("spec_5_groups", lambda a: a.update(v_layout=_five_groups_spec()), r"v_layout: the kernel takes at most 4 coded"),
    ("head_dim_48", lambda a: a.update(key=a["key"][..., :48], v_store=a["v_store"][..., :48]),
     r"head_dim must be a power of two"),
]


@pytest.mark.parametrize("mutate,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        op(**args)


def test_supports_names_what_the_kernel_cannot_write():
    kl, vl = LAYOUTS["d128_2.69"]
    assert qwf.supports(128, kl.spec(), vl.spec()) is None
    assert "power of two" in qwf.supports(80, FastLayout(80, (FastGroup(0, 80, 4),)).spec(), vl.spec())
    five = FastLayout(128, tuple(FastGroup(16 * i, 16 * i + 16, 4) for i in range(5)) + (FastGroup(80, 128, 2),))
    assert "coded groups" in qwf.supports(128, five.spec(), vl.spec())
