"""The recent window (`SpectralCache(recent_window=W)`) read by the decode kernels: the ring of the last W tokens'
exact K/V is one more set of exact tokens in the decode op's extra split (`sqcompile::exact_split`: its torch form
and its Triton kernel, interpreted here, outputs poisoned first), and the codes are read only before the window
(`sink.codes_lengths`). Checked against dense attention over the dequantized cache with the exact rows put over it,
and end to end: the compiled decode step equals the eager cache while the ring wraps."""
from __future__ import annotations

import math

import pytest
import torch

from sqcompile.kernels import decode_attention_fast as fa
from sqcompile.kernels.sink import codes_lengths, exact_split_torch, put_window
from sqcompile.quant.fast_layout import FastLayout, layout_for_budget
from test_decode_attention_fast import make_args, random_cache, rel_err


def _ring(B, Hkv, W, d, lengths, gen):
    """A ring as the cache leaves it after `lengths[b]` tokens of row b: position p in slot p % W for the last
    min(W, L) positions, -1 elsewhere; random fp16 K/V."""
    wk = torch.randn(B, Hkv, W, d, generator=gen).half()
    wv = torch.randn(B, Hkv, W, d, generator=gen).half()
    wp = torch.full((B, W), -1, dtype=torch.int64)
    for b, L in enumerate(lengths):
        for p in range(max(0, L - W), L):
            wp[b, p % W] = p
    return wk, wv, wp


def _dense(q, kp, vp, lengths, args, scale, kl, vl, exact):
    """Softmax attention over every position < lengths[b], in the value storage basis, keys as q . (k - k_mean)
    (the kernels drop q . k_mean): rows of the codes, with the exact rows (`exact`: list of (k model basis
    [B, Hkv, n, d], v storage [B, Hkv, n, d], pos [B, n]) applied in order, later ones over earlier) put over them."""
    B, Hq, d = q.shape
    Hkv, T = kp.shape[1], kp.shape[2]
    G = Hq // Hkv
    def deq(lay: FastLayout, packed, fac):
        codes, scales = lay.unpack(packed)
        parts = []
        for gr, c, s in zip(lay.groups, codes, scales):
            if gr.bits == 0:
                parts.append(torch.zeros(B, Hkv, T, gr.n))
                continue
            x = (c.float() - gr.offset) * fac.float()[None, :, None, gr.start:gr.stop]
            parts.append(x * s[..., None] if gr.stores_scale else x)
        return torch.cat(parts, -1)

    k = deq(kl, kp, args["k_factor"]) @ args["k_basis"]  # centered keys in the model basis
    v = deq(vl, vp, args["v_factor"])
    for ek, ev, ep, mean in exact:
        for b in range(B):
            for s in range(ep.shape[1]):
                p = int(ep[b, s])
                if 0 <= p < T:
                    k[b, :, p] = ek[b, :, s].float() - mean
                    v[b, :, p] = ev[b, :, s].float()
    sc = torch.einsum("bhgd,bhtd->bhgt", q.float().reshape(B, Hkv, G, d), k) * scale
    valid = torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]
    sc = sc.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhgt,bhtd->bhgd", torch.softmax(sc, -1), v).reshape(B, Hq, d)


def test_put_window_puts_the_rows_it_holds():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, 4, generator=gen)
    rows = torch.randn(2, 3, 4, 4, generator=gen)
    pos = torch.tensor([[8, 9, 6, 7], [-1, 1, 2, -1]])
    out = put_window(x, rows, pos)
    expect = x.clone()
    for b in range(2):
        for s in range(4):
            if pos[b, s] >= 0:
                expect[b, :, pos[b, s]] = rows[b, :, s]
    assert torch.equal(out, expect)
    with pytest.raises(ValueError, match="pos"):
        put_window(x, rows, pos[:, :3])


def test_codes_lengths_end_where_the_ring_begins():
    pos = torch.tensor([[8, 9, 6, 7], [-1, 1, 2, -1], [-1, -1, -1, -1], [4, 1, 2, 3]])
    got = codes_lengths(torch.tensor(10), pos)
    assert got.dtype == torch.int32 and got.tolist() == [6, 1, 10, 1]
    assert codes_lengths(torch.tensor([5, 0, 3, 2]), pos).tolist() == [5, 0, 3, 1]


CASES = [  # (G, d, W, lengths: ragged, one full ring that wrapped, one shorter than W, one without tokens)
    (1, 64, 8, [30, 5, 8]),
    (4, 128, 5, [23, 3, 12]),
    (8, 256, 40, [70, 17, 0]),
    (4, 64, 33, [33, 64, 1]),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("G,d,W,lengths", CASES)
def test_window_split_triton_equals_torch(G, d, W, lengths):
    """`exact_split_triton` with the ring (interpreted; outputs poisoned) equals `exact_split_torch`: the window
    alone, and with exact slots and the new token (a slot and the new token inside the window count once; a
    masked window position counts not at all); rings of W > its block (several blocks), wrapped, shorter than W."""
    from sqcompile.kernels.sink_triton import exact_split_triton

    gen = torch.Generator().manual_seed(G * 1000 + d + W)
    B, Hkv, S = len(lengths), 2, 3
    Hq, T = G * Hkv, max(lengths) + 8
    q, mean = torch.randn(B, Hq, d, generator=gen), torch.randn(Hkv, d, generator=gen)
    wk, wv, wp = _ring(B, Hkv, W, d, lengths, gen)
    sk, sv = torch.randn(B, Hkv, S, d, generator=gen), torch.randn(B, Hkv, S, d, generator=gen)
    last = max(lengths) - 1
    sp = torch.tensor([[0, last, -1]] + [[0, 1, -1]] * (B - 1))  # row 0: a slot at the window's newest position
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, max(0, lengths[0] - 2)] = False  # a window position the mask hides
    new = (torch.randn(B, Hkv, 1, d, generator=gen), torch.randn(B, Hkv, 1, d, generator=gen), torch.tensor([last]))
    for parts in ("window", "all"):
        slots = (sk, sv, sp) if parts == "all" else (None,) * 3
        fresh = new if parts == "all" else (None,) * 3
        args = (q, mean, mask, 0.3, *slots, *fresh)
        ref = exact_split_torch(*args, wk, wv, wp)
        score, value = torch.full((B, Hq), float("nan")), torch.full((B, Hq, d), float("nan"))
        pos = torch.full((B, S if parts == "all" else 1), -7, dtype=torch.int32)
        got = exact_split_triton(*args, score=score, value=value, pos=pos, window=(wk, wv, wp))
        assert torch.equal(torch.isinf(got[0]), torch.isinf(ref[0])), parts
        fin = torch.isfinite(ref[0])
        assert torch.allclose(got[0][fin], ref[0][fin], atol=1e-4), parts
        assert torch.allclose(got[1], ref[1], atol=1e-4), (parts, (got[1] - ref[1]).abs().max())
        assert torch.isfinite(got[1]).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("G,d,W,lengths", CASES)
@pytest.mark.parametrize("with_new", [False, True])
def test_codes_before_the_window_plus_the_split_equal_dense_attention(G, d, W, lengths, with_new):
    """What a compiled decode step computes (the fast decode kernel over the codes before the window, interpreted,
    outputs poisoned, and the extra split holding the ring and the exact slots) equals dense attention over the
    codes with the exact rows put over them in the eager read's order (window, then slots, then the new token).
    Ragged rows without the step's own token; with it (one position for the batch, as the cache's rows advance
    together), every row as long as the first."""
    gen = torch.Generator().manual_seed(G * 7 + d + W + with_new)
    B, Hkv = len(lengths), 2
    Hq = G * Hkv
    lens = [max(lengths[0], 1)] * B if with_new else lengths
    T = -(-(max(lens) + 4) // 8) * 8
    kl, vl = layout_for_budget(2.75 if d != 64 else 3.25, d)
    args = make_args(kl, vl, Hkv, gen)
    kp, vp = random_cache(kl, B, Hkv, T, gen), random_cache(vl, B, Hkv, T, gen)
    q = torch.randn(B, Hq, d, generator=gen)
    mean = torch.randn(Hkv, d, generator=gen)
    scale = 0.5 / math.sqrt(d)
    wk, wv, wp = _ring(B, Hkv, W, d, lens, gen)  # the ring holds the step's own token too (the write comes first)
    sk, sv = torch.randn(B, Hkv, 2, d, generator=gen), torch.randn(B, Hkv, 2, d, generator=gen)
    sp = torch.tensor([[0 if L else -1, L - 2 if L >= 2 else -1] for L in lens])  # one slot inside the window
    exact = [(wk, wv, wp, mean), (sk, sv, sp, mean)]
    new = (None,) * 3
    length = torch.tensor(lens)  # per row, the positions written before this step's token (without one: all)
    if with_new:
        newest = torch.tensor([lens[0] - 1])
        new = (torch.randn(B, Hkv, 1, d, generator=gen), torch.randn(B, Hkv, 1, d, generator=gen), newest)
        exact.append((new[0], new[1], newest.expand(B)[:, None], mean))
        length = newest[0].expand(B)
    ref = _dense(q, kp, vp, lens, args, scale, kl, vl, exact)
    from sqcompile.kernels.sink_triton import exact_split_triton

    score, value, spos = exact_split_triton(q, mean, None, scale, sk, sv, sp, *new, window=(wk, wv, wp))
    code_len = codes_lengths(length, wp)
    assert code_len.tolist() == [min(max(0, L - W), int(n)) for L, n in zip(lens, length)]
    for how in ("reference", "triton"):
        if how == "reference":
            out = fa.decode_attention_fast_reference(q, kp, vp, code_len, scale=scale, sink_score=score,
                                                     sink_value=value, sink_pos=spos, **args)
        else:
            out = fa.decode_attention_fast_triton(q, kp, vp, code_len, scale=scale, num_splits=3, block_n=16,
                                                  poison=True, sink_score=score, sink_value=value, sink_pos=spos,
                                                  **args)
        assert torch.isfinite(out[torch.tensor(lens) > 0]).all(), how
        assert rel_err(out, ref.nan_to_num(0.0)) < 2e-3, (how, rel_err(out, ref.nan_to_num(0.0)))


def test_compiled_decode_reads_the_window_and_equals_the_eager_cache():
    """Tiny Llama, recent_window=8, prefill 12 tokens + 8 greedy decode steps (the ring wraps twice): the compiled
    step (the backend's decode op with the window in its exact split) gives the eager cache's logits, the decode
    graph reads no dequantized cache, and the rings hold the same tokens."""
    from sqcompile.cache import SpectralCache
    from test_hf_models import _model
    from test_spectral_cache import _lockstep, recording_backend

    torch._dynamo.reset()
    model = _model("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    graphs = []
    step = torch.compile(model.forward, backend=recording_backend(graphs))
    kw = dict(bits=2.75, max_cache_len=32, layout="fast", recent_window=8)
    eager_cache, compiled_cache = SpectralCache(model, **kw), SpectralCache(model, **kw)
    with torch.no_grad():
        _lockstep(model, step, eager_cache, compiled_cache, ids, 8)
    targets = [str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"]
    assert sum(t.endswith("decode_attention_fast_write.default") for t in targets) == model.config.num_hidden_layers
    assert not any("dequantize_fast" in t or "scaled_dot_product_attention" in t for t in targets), targets
    splits = [n for n in graphs[-1].graph.nodes if str(n.target).endswith("exact_split.default")]
    assert splits and all(len(n.args) == 13 for n in splits)  # the ring's three tensors are inputs of the split
    for le, lc in zip(eager_cache.layers, compiled_cache.layers):
        assert torch.equal(le.window_pos, lc.window_pos) and torch.equal(le.window_k, lc.window_k)
        assert torch.equal(le.keys, lc.keys)


def test_optimize_generates_with_the_window_as_the_eager_cache_does():
    """`sqcompile.optimize(..., recent_window=8).generate` (prefill + 10 greedy tokens: the ring wraps) gives the
    greedy tokens of the uncompiled model over an eager SpectralCache with the same window, its caches hold the
    ring, and its report has every attention layer rewritten."""
    import sqcompile
    from sqcompile.cache import SpectralCache
    from sqcompile.hf import cache_kwarg
    from test_hf_models import _model

    torch._dynamo.reset()
    model = _model("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    eager = SpectralCache(model, bits=2.75, max_cache_len=32, layout="fast", recent_window=8)
    with torch.no_grad():
        ref = model.generate(ids, **{cache_kwarg(model): eager}, **gen)
    opt = sqcompile.optimize(model, None, bits=2.75, max_cache_len=32, layout="fast", recent_window=8, lower="eager")
    assert opt.cache().layers[0].recent_window == 8
    out = opt.generate(ids, **gen)
    assert torch.equal(out, ref), (out, ref)
    layers = {s.layer for s in opt.report.by_kind("attention")}
    assert layers == set(range(model.config.num_hidden_layers))
    assert all(s.rewritten for s in opt.report.by_kind("attention"))
    with pytest.raises(ValueError, match="recent_window"):
        sqcompile.optimize(model, None, recent_window=-1)


@pytest.mark.cuda
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("W", [0, 32])
def test_cuda_step_with_the_window_equals_the_reference(G, W):
    """On CUDA, what a compiled decode step runs (`sqcompile::exact_split`'s Triton kernel with the ring, then the
    CUDA kernel over the codes before the window, output poisoned) equals the torch forms of both; head_dim 128,
    2.75 bits, ragged rows, one ring that wrapped and one shorter than W."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sqcompile.kernels import decode_attention_cuda as dc

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(G + W)
    B, Hkv, d, T = 3, 2, 128, 328
    Hq = G * Hkv
    kl, vl = layout_for_budget(2.75, d)
    assert dc.supports(kl, vl, d, G, T) is None
    kp = kl.quantize(torch.randn(B, Hkv, T, d, device=dev, generator=gen))
    vp = vl.quantize(torch.randn(B, Hkv, T, d, device=dev, generator=gen))
    q = torch.randn(B, Hq, d, device=dev, generator=gen).half()
    basis = torch.linalg.qr(torch.randn(Hkv, d, d, device=dev, generator=gen))[0]
    args = dict(k_basis=basis, k_factor=kl.column_factor(None, Hkv, dev), v_factor=vl.column_factor(None, Hkv, dev),
                k_groups=kl.flat_groups(), v_groups=vl.flat_groups())
    mean = torch.randn(Hkv, d, device=dev, generator=gen)
    lens = [T, 200, 20]
    sk, sv = torch.randn(B, Hkv, 2, d, device=dev, generator=gen), torch.randn(B, Hkv, 2, d, device=dev, generator=gen)
    sp = torch.tensor([[0, L - 3] for L in lens], device=dev)
    scale = 1 / math.sqrt(d)
    written = torch.tensor(lens, device=dev)
    if W:
        wk, wv, wp = (t.to(dev) for t in _ring(B, Hkv, W, d, lens, torch.Generator().manual_seed(W)))
        window = (wk, wv, wp)
        code_len = codes_lengths(written, wp)
    else:
        window, code_len = (), written.int()
    ref_s, ref_v = exact_split_torch(q, mean, None, scale, sk, sv, sp, None, None, None, *window)
    ref = fa.decode_attention_fast_reference(q, kp, vp, code_len, scale=scale, sink_score=ref_s, sink_value=ref_v,
                                             sink_pos=sp.int(), **args)
    score, value, pos = torch.ops.sqcompile.exact_split(q, mean, None, scale, sk, sv, sp, None, None, None, *window)
    out = dc.decode_attention_fast_cuda(q, kp, vp, code_len, scale=scale, poison=True, sink_score=score,
                                        sink_value=value, sink_pos=pos, **args)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-3, rel_err(out, ref)
