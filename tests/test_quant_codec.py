"""The quantizer library: codebooks, formats, packing, budgets, NaN isolation, tracing."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sqcompile.quant import Group, TensorFormat, build_codec, distortion, lloyd_max, valid_bits_range
from sqcompile.quant import packing

BUDGETS = (4.25, 3.25, 2.69, 2.2857)


def fake_profile(L: int, H: int, d: int, seed: int = 0, decay: float = 6.0) -> SimpleNamespace:
    """A duck-typed SpectralProfile: random orthonormal eigenbases, exponentially decaying spectra."""
    g = torch.Generator().manual_seed(seed)

    def kind(scale):
        lam = (scale * torch.exp(-torch.arange(d) / (d / decay))).expand(L, H, d).clone()
        U = torch.stack([torch.stack([torch.linalg.qr(torch.randn(d, d, generator=g))[0].T
                                      for _ in range(H)]) for _ in range(L)])
        return torch.randn(L, H, d, generator=g), U, lam

    km, kU, kl = kind(4.0)
    vm, vU, vl = kind(1.0)
    return SimpleNamespace(key_mean=km, key_eigvecs=kU, key_eigvals=kl,
                           value_mean=vm, value_eigvecs=vU, value_eigvals=vl)


def sample(profile, kind: str, layer: int, B: int, S: int, seed: int = 1) -> torch.Tensor:
    """Gaussian vectors [B, H, S, d] with the profile's mean and covariance."""
    g = torch.Generator().manual_seed(seed)
    mu = getattr(profile, f"{kind}_mean")[layer]
    U = getattr(profile, f"{kind}_eigvecs")[layer]
    lam = getattr(profile, f"{kind}_eigvals")[layer]
    H, d = mu.shape
    z = torch.randn(B, H, S, d, generator=g) * lam.sqrt()[None, :, None, :]
    return torch.einsum("bhsk,hkd->bhsd", z, U) + mu[None, :, None, :]


PROFILE64 = fake_profile(2, 2, 64)
PROFILE128 = fake_profile(1, 2, 128, seed=3)


def codec_for(method: str, d: int, bits: float, **kw):
    if method == "turboquant":
        return build_codec(None, bits=bits, method="turboquant", num_layers=2, num_kv_heads=2, head_dim=d, **kw)
    return build_codec(PROFILE64 if d == 64 else PROFILE128, bits=bits, method=method, **kw)


# -- codebooks --------------------------------------------------------------------------------------

def test_lloyd_max_gaussian_matches_known_distortion():
    known = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
    for b, mse in known.items():
        assert distortion(b) == pytest.approx(mse, rel=2e-3)
        cb = lloyd_max(b)
        assert cb.shape == (2 ** b,) and torch.all(cb[1:] > cb[:-1])
        assert torch.allclose(cb, -cb.flip(0), atol=1e-5)


def test_lloyd_max_empirical_mse_on_gaussian():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    for b in (2, 3):
        cb = lloyd_max(b)
        q = cb[torch.bucketize(x, 0.5 * (cb[1:] + cb[:-1]))]
        assert float((x - q).pow(2).mean()) == pytest.approx(distortion(b), rel=0.03)


# -- round trip within the predicted error ----------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_token_group_round_trip_error(bits):
    d, H = 64, 2
    fmt = TensorFormat(d, [Group(0, d, bits, "token", lloyd_max(bits, "sphere", d))], torch.ones(H, d))
    x = torch.randn(4, H, 256, d, generator=torch.Generator().manual_seed(bits))
    rel = float((fmt.fake_quant(x) - x).pow(2).sum() / x.pow(2).sum())
    assert rel == pytest.approx(distortion(bits, "sphere", d), rel=0.15, abs=2e-5)


def test_channel_group_round_trip_error():
    d, H = 32, 2
    cs = torch.rand(H, d, generator=torch.Generator().manual_seed(0)) + 0.5
    fmt = TensorFormat(d, [Group(0, d, 3, "channel", lloyd_max(3))], cs)
    x = torch.randn(2, H, 2000, d, generator=torch.Generator().manual_seed(1)) * cs[None, :, None, :]
    rel = float(((fmt.fake_quant(x) - x) / cs[None, :, None, :]).pow(2).mean())
    assert rel == pytest.approx(distortion(3), rel=0.1)


@pytest.mark.parametrize("method", ["turboquant", "spectralquant"])
def test_codec_round_trip_error_decreases_with_bits(method):
    errs = []
    for bits in (2.2857, 3.25, 4.25):
        codec = codec_for(method, 64, bits)
        prof = PROFILE64
        for kind in ("key", "value"):
            x = sample(prof, kind, 0, 2, 128)
            xs = codec.to_storage(kind, 0, x)
            assert torch.allclose(codec.from_storage(kind, 0, xs), x, atol=1e-4)
        x = sample(prof, "value", 0, 2, 128)
        xs = codec.to_storage("value", 0, x)
        errs.append(float((codec.fake_quant("value", 0, xs) - xs).pow(2).sum() / xs.pow(2).sum()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.03  # ~4 bits: Lloyd-Max at 4 bits is 0.0095


# -- budgets and accounting -------------------------------------------------------------------------

@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("method", ["turboquant", "spectralquant"])
@pytest.mark.parametrize("bits", BUDGETS)
def test_budgets_reached_exactly_or_just_under(method, d, bits):
    codec = codec_for(method, d, bits)
    assert codec.bits_per_element <= bits + 1e-9
    # within 2 bytes per token-head of the budget (a cheaper plan may be predicted better)
    assert codec.bits_per_element >= bits - 16 / d - 1e-9
    for layer in range(codec.num_layers):
        lc = codec.layers[layer]
        assert 8 * (lc.key_format.bytes_per_token() + lc.value_format.bytes_per_token()) <= bits * 2 * d + 1e-6


@pytest.mark.parametrize("method", ["turboquant", "spectralquant"])
@pytest.mark.parametrize("qjl", [False, "all"])
def test_pack_matches_accounting_and_fake_quant(method, qjl):
    for bits in (2.69, 4.25):
        codec = codec_for(method, 64, bits, qjl=qjl)
        for kind in ("key", "value"):
            x = sample(PROFILE64, kind, 1, 2, 33)
            xs = codec.to_storage(kind, 1, x)
            packed = codec.pack(kind, 1, xs)
            fmt = codec.format(kind, 1)
            assert packed.dtype == torch.uint8
            assert packed.shape == (2, 2, 33, fmt.bytes_per_token())
            assert sum(n for _, _, n in fmt.layout()) == fmt.bytes_per_token()
            assert torch.equal(codec.unpack(kind, 1, packed), codec.fake_quant(kind, 1, xs).float())


def test_packed_layout_by_hand():
    """Bit-planes, then token scales, then QJL signs and norm, as packing.py documents."""
    d, H = 16, 1
    fmt = TensorFormat(d, [Group(0, 8, 2, "channel", torch.tensor([-3., -1., 1., 3.])),
                           Group(8, 16, 1, "token", torch.tensor([-1., 1.]))], torch.ones(H, d))
    codes = [torch.tensor([[[[0, 1, 2, 3, 0, 1, 2, 3]]]]), torch.tensor([[[[1, 0, 0, 0, 0, 0, 0, 1]]]])]
    scales = [None, torch.tensor([[[2.0]]])]
    packed = packing.pack(fmt, codes, scales)
    # plane0 of group0: bits 0,1,0,1,... -> 0b10101010; plane1: 0,0,1,1,... -> 0b11001100
    # group1 plane0: 1 at j=0 and j=7 -> 0b10000001; then fp16(2.0) = 0x4000 little-endian
    assert packed.reshape(-1).tolist() == [0b10101010, 0b11001100, 0b10000001, 0x00, 0x40]
    assert fmt.bytes_per_token() == 5
    got_codes, got_scales, _, _ = packing.unpack(fmt, packed)
    assert torch.equal(got_codes[0], codes[0]) and torch.equal(got_codes[1], codes[1])
    assert float(got_scales[1]) == 2.0


def test_budget_errors():
    lo, hi = valid_bits_range(64)
    assert hi == 16
    with pytest.raises(ValueError, match="valid range"):
        codec_for("turboquant", 64, lo - 0.01)
    with pytest.raises(ValueError, match="valid range"):
        codec_for("spectralquant", 64, 0.25)  # the scale overhead alone is 0.5 bits
    with pytest.raises(ValueError, match="valid range"):
        codec_for("turboquant", 64, 16.5)
    codec_for("turboquant", 64, lo)  # the lowest valid budget builds
    c16 = codec_for("turboquant", 64, 16)  # above 8 bits per dim: capped at 8 bits
    assert c16.bits_per_element <= 16
    with pytest.raises(TypeError, match="valid"):
        codec_for("turboquant", 64, 3.0, not_a_knob=1)


# -- robustness -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["turboquant", "spectralquant"])
def test_nan_token_does_not_poison_others(method):
    codec = codec_for(method, 64, 3.25, qjl="all")
    for kind in ("key", "value"):
        xs = codec.to_storage(kind, 0, sample(PROFILE64, kind, 0, 1, 16))
        bad = xs.clone()
        bad[0, 0, 3, 5] = float("nan")
        bad[0, 1, 7, :] = float("inf")
        clean_q, bad_q = codec.fake_quant(kind, 0, xs), codec.fake_quant(kind, 0, bad)
        clean_p, bad_p = codec.pack(kind, 0, xs), codec.pack(kind, 0, bad)
        keep = torch.ones(1, 2, 16, dtype=torch.bool)
        keep[0, 0, 3] = keep[0, 1, 7] = False
        assert torch.equal(clean_q[keep], bad_q[keep])
        assert torch.equal(clean_p[keep], bad_p[keep])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    codec = codec_for("spectralquant", 64, 3.25)
    xs = codec.to_storage("key", 0, sample(PROFILE64, "key", 0, 1, 8)).to(dtype)
    out = codec.fake_quant("key", 0, xs)
    assert out.dtype == dtype and out.shape == xs.shape
    ref = codec.fake_quant("key", 0, xs.float())
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_fake_quant_and_unpack_trace_with_make_fx():
    from torch.fx.experimental.proxy_tensor import make_fx

    codec = codec_for("spectralquant", 64, 2.69, qjl="signal")
    xs = codec.to_storage("key", 0, sample(PROFILE64, "key", 0, 1, 8))
    gm = make_fx(lambda x: codec.fake_quant("key", 0, x))(xs)
    assert torch.equal(gm(xs), codec.fake_quant("key", 0, xs))
    xs2 = xs * 2.0  # a traced graph must not bake in values
    assert torch.equal(gm(xs2), codec.fake_quant("key", 0, xs2))
    packed = codec.pack("key", 0, xs)
    gu = make_fx(lambda p: codec.unpack("key", 0, p))(packed)
    assert torch.equal(gu(packed), codec.unpack("key", 0, packed))
    gp = make_fx(lambda x: codec.pack("key", 0, x))(xs)
    assert torch.equal(gp(xs2), codec.pack("key", 0, xs2))


def test_knobs_and_ablations_build():
    prof = PROFILE64
    for kw in (dict(center=False), dict(uniform_bits=True), dict(allocation="waterfill"),
               dict(qjl="signal"), dict(signal_dims=16, signal_bits=6), dict(signal_scale="token"),
               dict(key_weighting="eigvals"), dict(key_bytes=20), dict(min_bits=2), dict(key_weight=2.0)):
        codec = build_codec(prof, bits=3.25, **kw)
        assert codec.bits_per_element <= 3.25
        xs = codec.to_storage("key", 0, sample(prof, "key", 0, 1, 4))
        assert torch.equal(codec.unpack("key", 0, codec.pack("key", 0, xs)), codec.fake_quant("key", 0, xs))
    tq = build_codec(None, bits=4.25, num_layers=1, num_kv_heads=1, head_dim=128, uniform_bits=True)
    assert tq.method == "turboquant" and len(tq.layers[0].key_format.groups) == 1


def test_turboquant_basis_is_randomized_hadamard():
    codec = codec_for("turboquant", 64, 3.25)
    B = codec.layers[0].key_basis[0]
    assert torch.allclose(B @ B.T, torch.eye(64), atol=1e-5)
    assert torch.allclose(B.abs(), torch.full_like(B, 1 / 8))
    assert not torch.equal(codec.layers[0].key_basis[0], codec.layers[0].key_basis[1])
    assert torch.equal(codec_for("turboquant", 64, 3.25).layers[0].key_basis, codec.layers[0].key_basis)


def test_codec_moves_devices_and_dtypes():
    codec = codec_for("spectralquant", 64, 3.25).to("cpu", torch.float16)
    assert codec.layers[0].key_basis.dtype == torch.float16
    assert codec.layers[0].key_format.groups[0].codebook.dtype == torch.float32


# -- centering per kind, layer-adaptive bytes, rotated signal tier -----------------------------------

def test_default_centers_keys_not_values():
    prof = PROFILE64
    codec = build_codec(prof, bits=3.25)
    assert torch.equal(codec.layers[0].key_mean, prof.key_mean[0])
    assert torch.equal(codec.layers[0].value_mean, torch.zeros_like(prof.value_mean[0]))
    assert codec.config["centered"] == [[True, False], [True, False]]
    both = build_codec(prof, bits=3.25, center_values=True)
    assert torch.equal(both.layers[1].value_mean, prof.value_mean[1])
    per_layer = build_codec(prof, bits=3.25, center_keys=[True, False])
    assert per_layer.config["centered"] == [[True, False], [False, False]]
    assert torch.equal(per_layer.layers[1].key_mean, torch.zeros_like(prof.key_mean[1]))
    assert build_codec(prof, bits=3.25, center=False).config["centered"] == [[False, False], [False, False]]
    with pytest.raises(ValueError, match="center_keys"):
        build_codec(prof, bits=3.25, center_keys=[True])
    for layer in range(2):  # whatever the centering, the storage basis is orthogonal
        B = per_layer.layers[layer].value_basis[0]
        assert torch.allclose(B @ B.T, torch.eye(64), atol=1e-4)


def _sens_profile(L=6, H=2, d=64):
    prof = fake_profile(L, H, d, seed=5)
    prof.meta = {}
    return prof


@pytest.mark.parametrize("bits", BUDGETS)
def test_layer_weights_keep_the_average_budget_and_favour_sensitive_layers(bits):
    prof = _sens_profile()
    L, d = 6, 64
    w = torch.ones(L, 2)
    w[2, 0] = 30.0  # layer 2's keys are very sensitive
    w[4, 1] = 0.03  # layer 4's values hardly matter
    codec = build_codec(prof, bits=bits, layer_weights=w)
    equal = build_codec(prof, bits=bits, layer_weights=False)
    assert codec.config["layer_adaptive"] and not equal.config["layer_adaptive"]
    assert codec.bits_per_element <= bits + 1e-9
    assert codec.bits_per_element >= bits - 16 / d - 1e-9
    kb = [codec.bytes_per_token("key", l) for l in range(L)]
    vb = [codec.bytes_per_token("value", l) for l in range(L)]
    assert kb[2] == max(kb) and kb[2] > equal.bytes_per_token("key", 2)
    assert vb[4] == min(vb) and vb[4] < equal.bytes_per_token("value", 4)
    half = math.floor(bits * 2 * d / 8 + 1e-9) / 2
    for b in kb + vb:  # the default spread: budgets within 1 bit per element of the average (a plan for
        # the lowest budget may store a few bytes less, e.g. one token scale fewer)
        assert half - d / 8 - 3 <= b <= half + d / 8 + 1e-9
    wide = build_codec(prof, bits=bits, layer_weights=w, layer_spread=3.0)
    assert wide.bits_per_element <= bits + 1e-9
    xs = codec.to_storage("key", 2, sample(prof, "key", 2, 1, 8))
    assert torch.equal(codec.unpack("key", 2, codec.pack("key", 2, xs)), codec.fake_quant("key", 2, xs))


def test_layer_weights_from_the_profile_meta_drive_spectralquant_only():
    prof = _sens_profile()
    w = [[1.0, 1.0]] * 6
    w[1] = [40.0, 1.0]
    prof.meta["kv_sensitivity"] = w
    sq = build_codec(prof, bits=3.25)
    assert sq.config["layer_adaptive"]
    assert sq.bytes_per_token("key", 1) > build_codec(prof, bits=3.25, layer_weights=False).bytes_per_token("key", 1)
    tq = build_codec(prof, bits=3.25, method="turboquant")
    assert not tq.config["layer_adaptive"]
    assert build_codec(prof, bits=3.25, method="turboquant", layer_weights=torch.tensor(w)).config["layer_adaptive"]
    assert len(sq.config["predicted"]) == 6 and all(0 < p < 1 for row in sq.config["predicted"] for p in row)
    for bad in (torch.ones(5, 2), torch.full((6, 2), -1.0), torch.full((6,), float("nan"))):
        with pytest.raises(ValueError, match="layer_weights"):
            build_codec(prof, bits=3.25, layer_weights=bad)


def test_rotated_signal_tier():
    prof = PROFILE64
    codec = build_codec(prof, bits=3.25, signal_scale="rotated", signal_bits=None)
    assert codec.bits_per_element <= 3.25
    for layer in range(2):
        for kind in ("key", "value"):
            B = getattr(codec.layers[layer], f"{kind}_basis")[0]
            assert torch.allclose(B @ B.T, torch.eye(64), atol=1e-4)
            fmt = codec.format(kind, layer)
            assert len(fmt.groups) <= 3
            xs = codec.to_storage(kind, layer, sample(prof, kind, layer, 1, 64))
            err = (codec.fake_quant(kind, layer, xs) - xs).pow(2).sum() / xs.pow(2).sum()
            assert err < 0.1


# -- the fast layout (uniform levels, codes packed inside bytes) -------------------------------------

@pytest.mark.parametrize("method", ["turboquant", "spectralquant"])
@pytest.mark.parametrize("d", [64, 128])
def test_fast_layout_codec_budget_pack_and_fake_quant(method, d):
    from sqcompile.quant.fast_layout import FastLayout

    profile = PROFILE64 if d == 64 else PROFILE128
    for bits in (4.25, 3.25, 2.69):
        codec = codec_for(method, d, bits, layout="fast")
        assert codec.config["layout"] == "fast"
        assert bits - 16 / d - 1e-9 <= codec.bits_per_element <= bits + 1e-9, (bits, codec.bits_per_element)
        for kind in ("key", "value"):
            fmt = codec.format(kind, 0)
            assert fmt.packing == "fast" and fmt.qjl_bits == 0
            assert all(g.bits in (0, 1, 2, 4, 8) for g in fmt.groups)
            x = sample(profile, kind, 0, 2, 17, seed=7)
            xs = codec.to_storage(kind, 0, x)
            packed = codec.pack(kind, 0, xs)
            assert packed.shape == (2, 2, 17, fmt.bytes_per_token())
            assert sum(n for _, _, n in fmt.layout()) == fmt.bytes_per_token()
            deq = codec.unpack(kind, 0, packed)
            assert torch.equal(deq, codec.fake_quant(kind, 0, xs).float())
            # the bytes are exactly FastLayout's (what decode_attention_fast reads)
            lay = fmt.fast_layout()
            assert isinstance(lay, FastLayout) and torch.equal(lay.quantize(xs), packed)
            assert torch.allclose(lay.dequantize(packed), deq, atol=1e-6, rtol=1e-6)
            rel = ((deq - xs.float()).norm() / xs.float().norm()).item()
            assert rel < {4.25: 0.15, 3.25: 0.3, 2.69: 0.45}[bits], (kind, bits, rel)


def test_fast_layout_spectral_gives_the_leading_pca_block_more_bits():
    """spectralquant + fast: groups are blocks of PCA dims (rotated within themselves), so when two groups differ
    the high-variance block (first) has the more bits; its predicted error beats the data-oblivious layout's."""
    sq = codec_for("spectralquant", 128, 3.25, layout="fast")
    tq = codec_for("turboquant", 128, 3.25, layout="fast")
    for kind in ("key", "value"):
        groups = sq.format(kind, 0).groups
        assert all(a.bits >= b.bits for a, b in zip(groups, groups[1:])), sq.describe()
    assert any(len({g.bits for g in sq.format(k, 0).groups}) > 1 for k in ("key", "value")), sq.describe()
    x = sample(PROFILE128, "key", 0, 1, 256, seed=9)
    err = {}
    for name, codec in (("sq", sq), ("tq", tq)):
        xs = codec.to_storage("key", 0, x)
        err[name] = ((codec.fake_quant("key", 0, xs) - xs).norm() / xs.norm()).item()
    assert err["sq"] < 0.8 * err["tq"], err


def test_fast_layout_bad_combinations_are_clear_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        codec_for("turboquant", 64, 4.25, layout="nibbles")
    with pytest.raises(ValueError, match="no QJL"):
        codec_for("spectralquant", 64, 4.25, layout="fast", qjl="signal")
    import sqcompile

    with pytest.raises(ValueError, match="option 'layout'"):
        sqcompile.Options.from_dict({"layout": "nibbles"})
    fmt = codec_for("turboquant", 64, 4.25).format("key", 0)  # Lloyd-Max levels are not uniform
    with pytest.raises(ValueError, match="uniform"):
        TensorFormat(64, fmt.groups, fmt.channel_scale, packing="fast")
