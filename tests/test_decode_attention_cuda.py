"""The CUDA decode kernel (sqcompile/kernels/decode_attention_cuda.py).

On CPU: its register-fragment permutations, checked against an independent byte-level decode of the packed
rows (what each thread reads, per the kernel's rule), and the layouts it accepts. On a CUDA machine: the
kernel itself against the torch reference (fresh random inputs, outputs poisoned first): the tests marked `cuda`
(pytest -m cuda on a GPU machine; skipped without one).
"""
from __future__ import annotations

import math

import pytest
import torch

from sqcompile.kernels import decode_attention_cuda as dc
from sqcompile.quant.fast_layout import FastGroup, FastLayout, layout_for_budget

LAYOUTS = [  # (d, K groups, V groups): (start, stop, bits)
    (128, [(0, 128, 2)], [(0, 64, 4), (64, 128, 2)]),
    (128, [(0, 16, 4), (16, 128, 2)], [(0, 32, 4), (32, 128, 2)]),  # odd bytes per thread for K
    (128, [(0, 64, 4), (64, 128, 4)], [(0, 16, 8), (16, 128, 4)]),
    (64, [(0, 16, 4), (16, 64, 2)], [(0, 32, 4), (32, 64, 2)]),
    (64, [(0, 64, 1)], [(0, 16, 4), (16, 64, 0)]),  # 1-bit keys, a dropped value tail
]


def _lay(d, groups):
    return FastLayout(d, tuple(FastGroup(a, b, bits) for a, b, bits in groups))


def _code(row: torch.Tensor, lay: FastLayout, gi: int, byte: int, e: int) -> torch.Tensor:
    g = lay.groups[gi]
    x = row[..., lay.code_offsets()[gi] + byte].to(torch.int64)
    return (x >> (g.bits * e)) & ((1 << g.bits) - 1)


@pytest.mark.parametrize("d,kg,vg", LAYOUTS)
def test_fragment_permutations_match_a_byte_level_decode(d, kg, vg):
    kl, vl = _lay(d, kg), _lay(d, vg)
    assert dc.supports(kl, vl, d, 4, 64) is None
    pl = dc._Plan(d, 4, kl, vl, 4, 4)
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, d)
    kp, vp = kl.quantize(x), vl.quantize(x)
    kc = torch.cat([c for c, g in zip(kl.unpack(kp)[0], kl.groups) if g.bits], -1)  # codes by coordinate
    vc = torch.cat([c for c, g in zip(vl.unpack(vp)[0], vl.groups) if g.bits], -1)
    kcol = {j: i for i, j in enumerate(j for g in kl.groups if g.bits for j in range(g.start, g.stop))}
    vcol = {j: i for i, j in enumerate(j for g in vl.groups if g.bits for j in range(g.start, g.stop))}
    # K: thread tig's bytes [tig L, (tig + 1) L); pair p of a 16-dim chunk -> columns 2 tig + 8 hh + lane
    for gi, g in enumerate(kl.groups):
        if not g.bits:
            continue
        E, L = 8 // g.bits, g.n * g.bits // 32
        for tig in range(4):
            for p in range(g.n // 8):
                kk, hh = divmod(p, 2)
                for lane in range(2):
                    if L % 2:
                        i, k = divmod(p, E // 2)
                        got = _code(kp, kl, gi, tig * L + i, 2 * k + lane)
                        e = 2 * k + lane
                    else:
                        m, e = divmod(p, E)
                        got = _code(kp, kl, gi, tig * L + 2 * m + lane, e)
                    fc = g.start + 16 * kk + 2 * tig + 8 * hh + lane
                    assert torch.equal(got, kc[..., kcol[pl.kmap[fc]]]), (gi, tig, p, lane)
                    assert pl.kpow[fc] == 2.0 ** (-g.bits * e)
    # V: thread gid's bytes [gid L', (gid + 1) L'); slot e of byte i -> output row 16 kk + gid + 8 hh
    for gi, g in enumerate(vl.groups):
        if not g.bits:
            continue
        E, Lp = 8 // g.bits, g.n * g.bits // 64
        for gid in range(8):
            for i in range(Lp):
                for e in range(E):
                    kk, hh = divmod(i * E + e, 2)
                    r = g.start + 16 * kk + gid + 8 * hh
                    assert torch.equal(_code(vp, vl, gi, gid * Lp + i, e), vc[..., vcol[pl.vmap[r]]])
                    assert pl.vpow[r] == 2.0 ** (-g.bits * e) and pl.vgrp[r] == gi
    assert sorted(pl.kmap) == list(range(d)) and sorted(pl.vmap) == list(range(d))


def test_supports_names_what_it_cannot_read():
    kl, vl = layout_for_budget(3.25, 128)
    assert dc.supports(kl, vl, 128, 4, 4096) is None
    assert "query heads" in dc.supports(kl, vl, 128, 16, 4096)
    assert "capacity" in dc.supports(kl, vl, 128, 4, 4100)
    bad = _lay(64, [(0, 16, 4), (16, 64, 2)])  # V [16:64]@2: 12 bytes over 8 threads
    assert "V group [16:64]@2" in dc.supports(bad, bad, 64, 4, 64)  # as keys it is fine (4 threads)


def test_selection_choice():
    kl, vl = layout_for_budget(3.25, 128)
    q = torch.zeros(1, 4, 128)
    kp = torch.zeros(1, 1, 64, kl.bytes_per_token(), dtype=torch.uint8)
    assert dc.available(q, kp, kl.flat_groups(), vl.flat_groups(), "triton") == "the Triton kernel was chosen"
    assert "CUDA device" in dc.available(q, kp, kl.flat_groups(), vl.flat_groups())  # auto: why not, a CPU tensor
    with pytest.raises(ValueError, match="CUDA decode kernel was chosen but cannot run"):
        dc.available(q, kp, kl.flat_groups(), vl.flat_groups(), "cuda")
    with pytest.raises(ValueError, match="auto, cuda or triton"):
        dc.available(q, kp, kl.flat_groups(), vl.flat_groups(), "bogus")


@pytest.mark.cuda
@pytest.mark.parametrize("d,kg,vg", LAYOUTS)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_cuda_kernel_equals_reference(d, kg, vg, G):
    from sqcompile.kernels.decode_attention_fast import decode_attention_fast_reference

    kl, vl = _lay(d, kg), _lay(d, vg)
    gen = torch.Generator(device="cuda").manual_seed(G)
    B, H, T = 3, 2, 328
    kp = kl.quantize(torch.randn(B, H, T, d, device="cuda", generator=gen))
    vp = vl.quantize(torch.randn(B, H, T, d, device="cuda", generator=gen))
    q = torch.randn(B, H * G, d, device="cuda", generator=gen).half()
    basis = torch.linalg.qr(torch.randn(H, d, d, device="cuda", generator=gen))[0]
    args = (q, kp, vp, torch.tensor([1, 200, T], device="cuda", dtype=torch.int32), basis,
            kl.column_factor(None, H, "cuda"), vl.column_factor(None, H, "cuda"), kl.flat_groups(), vl.flat_groups(),
            1 / math.sqrt(d))
    mask = torch.rand(B, T, device="cuda", generator=gen) > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        ref = decode_attention_fast_reference(*args, kv_mask=m)
        out = dc.decode_attention_fast_cuda(*args, kv_mask=m, poison=True)
        assert torch.isfinite(out).all()
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 5e-3


def test_parameter_block_points_at_the_values_it_was_given():
    """`_Args` (the cuLaunchKernel parameter block, reused across calls): entry i points at parameter i."""
    import ctypes

    a = dc._Args("ppi")
    for x, n in ((torch.zeros(3), 7), (torch.ones(5), -2)):  # a second call overwrites in place
        a.set((x, x[1:], n))
        got = [ctypes.cast(a.arr[i], ctypes.POINTER(t)).contents.value
               for i, t in enumerate((ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int))]
        assert got == [x.data_ptr(), x[1:].data_ptr(), n]


@pytest.mark.cuda
def test_cuda_kernel_under_cudagraph_trees():
    """Inductor's cudagraph trees (mode="reduce-overhead") warm a graph up with every allocation of the thread
    routed to the graph's pool and then reject live pool tensors that are not outputs: the op's cached scratch
    and query matrices must come from the default pool (`_persistent`). Needs triton compiled for the GPU, not
    interpreted (an interpreted Inductor kernel's host copies cannot be captured): conftest.py never sets
    TRITON_INTERPRET where CUDA is present."""
    from sqcompile.kernels.decode_attention_fast import decode_attention_fast_reference

    torch._dynamo.reset()
    dc._LAUNCHES.clear(), dc._QCACHE.clear()
    d, H, G, B, T = 128, 2, 4, 2, 264
    kl, vl = _lay(d, LAYOUTS[1][1]), _lay(d, LAYOUTS[1][2])
    gen = torch.Generator(device="cuda").manual_seed(5)
    kp = kl.quantize(torch.randn(B, H, T, d, device="cuda", generator=gen))
    vp = vl.quantize(torch.randn(B, H, T, d, device="cuda", generator=gen))
    basis = torch.linalg.qr(torch.randn(H, d, d, device="cuda", generator=gen))[0]
    kf, vf = kl.column_factor(None, H, "cuda"), vl.column_factor(None, H, "cuda")
    lengths = torch.tensor([T, 100], device="cuda", dtype=torch.int32)

    def step(q):
        return torch.ops.sqcompile.decode_attention_fast_cuda(q, kp, vp, lengths, basis, kf, vf, kl.flat_groups(),
                                                              vl.flat_groups(), 1 / math.sqrt(d)) * 2

    comp = torch.compile(step, mode="reduce-overhead")
    for i in range(4):  # warm-up, record, replays
        q = torch.randn(B, H * G, d, device="cuda", generator=gen).half()
        out = comp(q).clone()
        ref = 2 * decode_attention_fast_reference(q, kp, vp, lengths, basis, kf, vf, kl.flat_groups(),
                                                  vl.flat_groups(), 1 / math.sqrt(d))
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 5e-3, (i, err)
    torch._dynamo.reset()


def test_plan_compiles_its_kernels_once(monkeypatch):
    """`_Plan.compiled`: one compile for all KERNELS (here the per-kernel fallback, NVRTC faked), and the
    split kernel's shared-memory limit raised once when the plan needs >= 48 KB."""
    calls, configured = [], []

    class FakeKernel:
        def __init__(self, name):
            self.name = name

        def set_shared_memory_config(self, n):
            configured.append((self.name, n))

    monkeypatch.setattr(dc, "_compile_all", lambda source: {})
    monkeypatch.setattr(torch.cuda, "_compile_kernel", lambda source, name: calls.append(name) or FakeKernel(name))
    kl, vl = layout_for_budget(4.25, 128)
    pl = dc._Plan(128, 8, kl, vl, 4, 8)
    assert pl.smem >= 48 * 1024
    got = [pl.compiled(n) for n in dc.KERNELS + dc.KERNELS]
    assert [k.name for k in got] == list(dc.KERNELS) * 2
    assert calls == list(dc.KERNELS) and configured == [("sq_fast_decode", pl.smem)]


def test_default_splits_fill_whole_waves():
    # B=8 x 8 kv-heads on 132 SMs, at most 2 CTAs per SM: 4 splits (256 CTAs), not 5 (320: a third CTA on 56 SMs)
    assert dc.default_splits(64, 4096 // dc.TN, 8, 2, 132) == 4
    for rows in (1, 8, 64, 100, 264, 1000):
        for tokens in (32, 1000, 4096, 65536, 1 << 20):
            n = dc.default_splits(rows, -(-tokens // dc.TN), 8, 2, 132)
            assert 1 <= n <= 256
            assert rows * n <= 2 * 132 or n == 1  # whole waves unless one split is already more than a wave
            assert n == 1 or -(-tokens // dc.TN) >= 2 * 8 * (n - 1)  # >= 2 tiles per warp, but for the last split


def test_write_slots_cover_every_coded_group_once():
    """The fused write's code generation: one run of threads (code bytes, the scale by its first thread) per coded
    group of K then V, at the layout's byte offsets; 0-bit groups get none."""
    d, kg, vg = LAYOUTS[4]
    kl, vl = _lay(d, kg), _lay(d, vg)
    pl = dc._Plan(d, 4, kl, vl, 4, 2)
    slots = pl._write_slots()
    assert [(k, g.start, g.stop) for _, k, g, *_ in slots] == [("k", 0, 64), ("v", 0, 16)]
    assert [s[0] for s in slots] == [0, 1] and [s[-1] for s in slots] == [0, kl.groups[0].code_bytes]
    assert "vrow[8]" in pl.source and "sq_fast_query_write" in pl.source  # V scale after its 8 code bytes
    assert dc.write_supported(kl, vl, d, (2, 2, 1, d)) is None
    assert "one new token" in dc.write_supported(kl, vl, d, (2, 2, 3, d))
    chan = FastLayout(d, (FastGroup(0, d, 4, "channel"),))
    assert "token-scaled" in dc.write_supported(chan, vl, d, (2, 2, 1, d))


def test_fused_write_op_is_the_write_then_the_attention_on_cpu():
    """`sqcompile::decode_attention_fast_write` off CUDA: quantize_write_fast, then decode_attention_fast."""
    from sqcompile.kernels import decode_attention_fast  # noqa: F401  (registers the op)
    from sqcompile.kernels.fast_cache import layout_spec

    d, kg, vg = LAYOUTS[1]
    kl, vl = _lay(d, kg), _lay(d, vg)
    gen = torch.Generator().manual_seed(3)
    B, H, G, T = 2, 2, 4, 40
    kp = kl.quantize(torch.randn(B, H, T, d, generator=gen))
    vp = vl.quantize(torch.randn(B, H, T, d, generator=gen))
    q = torch.randn(B, H * G, d, generator=gen)
    basis = torch.linalg.qr(torch.randn(H, d, d, generator=gen))[0]
    mean = torch.randn(H, d, generator=gen)
    key, val = torch.randn(B, H, 1, d, generator=gen), torch.randn(B, H, 1, d, generator=gen)
    pos, lengths = torch.tensor([30]), torch.full((B,), 31, dtype=torch.int32)
    ks, vs = layout_spec(kl), layout_spec(vl)
    attn = (basis, kl.column_factor(None, H), vl.column_factor(None, H), kl.flat_groups(), vl.flat_groups(), 0.1)
    kp2, vp2 = kp.clone(), vp.clone()
    out = torch.ops.sqcompile.decode_attention_fast_write(q, kp, vp, lengths, *attn, key, val, pos, mean, ks, vs)
    torch.ops.sqcompile.quantize_write_fast(key, val, kp2, vp2, pos, basis, mean, ks, vs)
    ref = torch.ops.sqcompile.decode_attention_fast(q, kp2, vp2, lengths, *attn)
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2) and torch.equal(out, ref)
    assert not torch.equal(kp[:, :, 30], kl.quantize(torch.zeros(B, H, 1, d))[:, :, 0])


@pytest.mark.cuda
@pytest.mark.parametrize("d,kg,vg", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_write_stores_what_the_write_op_stores(d, kg, vg, dtype, monkeypatch):
    """The write inside the decode kernel's query launch: the row at the position holds the bytes of the torch
    form of quantize_write_fast (a code may move one level where a value sits on a decision boundary: the key
    rotation sums in another order), no other row changes, the attention equals write-then-attend, and a
    position past the capacity writes nothing."""
    from sqcompile.kernels.fast_cache import layout_spec, quantize_write_fast

    kl, vl = _lay(d, kg), _lay(d, vg)
    gen = torch.Generator(device="cuda").manual_seed(d + len(kg))
    B, H, G, T = 3, 2, 4, 264
    kp = kl.quantize(torch.randn(B, H, T, d, device="cuda", generator=gen))
    vp = vl.quantize(torch.randn(B, H, T, d, device="cuda", generator=gen))
    q = torch.randn(B, H * G, d, device="cuda", generator=gen).half()
    basis = torch.linalg.qr(torch.randn(H, d, d, device="cuda", generator=gen))[0]
    mean = torch.randn(H, d, device="cuda", generator=gen)
    key = (3 * torch.randn(B, H, 1, d, device="cuda", generator=gen)).to(dtype)
    val = torch.randn(B, H, 1, d, device="cuda", generator=gen).to(dtype)
    ks, vs = layout_spec(kl), layout_spec(vl)
    attn = dict(k_basis=basis, k_factor=kl.column_factor(None, H, "cuda"), v_factor=vl.column_factor(None, H, "cuda"),
                k_groups=kl.flat_groups(), v_groups=vl.flat_groups(), scale=1 / math.sqrt(d))
    for p in (200, T - 1):
        pos = torch.tensor([p], device="cuda")
        lengths = torch.full((B,), p + 1, dtype=torch.int32, device="cuda")
        kf, vf, kr, vr = kp.clone(), vp.clone(), kp.clone(), vp.clone()
        out = dc.decode_attention_fast_cuda(q, kf, vf, lengths, **attn, poison=True,
                                            write=(key, val, pos, basis, mean, ks, vs))
        quantize_write_fast(key, val, kr, vr, pos, basis, mean, ks, vs, impl="torch")
        others = torch.ones(T, dtype=torch.bool)
        others[p] = False
        assert torch.equal(kf[:, :, others], kp[:, :, others]) and torch.equal(vf[:, :, others], vp[:, :, others])
        assert torch.equal(vf, vr)  # values: no rotation, so the bytes are exact
        kc, kc_ref = kl.unpack(kf[:, :, p])[0], kl.unpack(kr[:, :, p])[0]
        for a, b in zip(kc, kc_ref):
            if a is not None:
                assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 0.02
        ref = dc.decode_attention_fast_cuda(q, kr, vr, lengths, **attn)
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 5e-3
    kf, vf = kp.clone(), vp.clone()
    dc.decode_attention_fast_cuda(q, kf, vf, lengths, **attn, write=(key, val, torch.tensor([T], device="cuda"),
                                                                     basis, mean, ks, vs))
    assert torch.equal(kf, kp) and torch.equal(vf, vp)


@pytest.mark.cuda
@pytest.mark.parametrize("G", [1, 4])
def test_every_gpu_path_merges_the_exact_sink(G, monkeypatch):
    """The exact sink token (sqcompile.kernels.sink) as one more split: the CUDA merge, the CUDA kernel with the
    fused write, the op's dispatch and the two Triton kernels equal their torch references."""
    from sqcompile.kernels import decode_attention as da
    from sqcompile.kernels import decode_attention_fast as fa
    from sqcompile.kernels.fast_cache import layout_spec
    from test_decode_attention import attention_args, make_format
    from test_decode_attention import random_cache as random_planes

    d, kg, vg = LAYOUTS[0]
    kl, vl = _lay(d, kg), _lay(d, vg)
    gen = torch.Generator(device="cuda").manual_seed(40 + G)
    B, H, T = 3, 2, 264
    kp = kl.quantize(torch.randn(B, H, T, d, device="cuda", generator=gen))
    vp = vl.quantize(torch.randn(B, H, T, d, device="cuda", generator=gen))
    q = torch.randn(B, H * G, d, device="cuda", generator=gen).half()
    basis = torch.linalg.qr(torch.randn(H, d, d, device="cuda", generator=gen))[0]
    lengths = torch.tensor([1, 200, T], device="cuda", dtype=torch.int32)
    args = (q, kp, vp, lengths, basis, kl.column_factor(None, H, "cuda"), vl.column_factor(None, H, "cuda"),
            kl.flat_groups(), vl.flat_groups(), 1 / math.sqrt(d))
    mask = torch.rand(B, T, device="cuda", generator=gen) > 0.3
    score = torch.randn(B, H * G, device="cuda", generator=gen) * 2 + 4
    score[0, :1] = float("-inf")
    value = torch.randn(B, H, d, device="cuda", generator=gen)
    pos = torch.tensor([0, 130, -1], device="cuda", dtype=torch.int32)  # packed copies to skip (none in row 2)
    sink = dict(kv_mask=mask, sink_score=score, sink_value=value, sink_pos=pos)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    ref = fa.decode_attention_fast_reference(*args, **sink)
    assert rel(fa.decode_attention_fast_reference(*args, kv_mask=mask), ref) > 1e-2  # the sink has a say
    assert rel(dc.decode_attention_fast_cuda(*args, **sink, poison=True), ref) < 5e-3
    assert rel(torch.ops.sqcompile.decode_attention_fast(*args, **sink), ref) < 5e-3
    assert rel(fa.decode_attention_fast_triton(*args, **sink, poison=True), ref) < 5e-3
    # the fused write: a position no one reads changes nothing but the row it writes
    mean = torch.zeros(H, d, device="cuda")
    key = torch.randn(B, H, 1, d, device="cuda", generator=gen)
    wpos = torch.tensor([T - 1], device="cuda")
    kf, vf = kp.clone(), vp.clone()
    out = torch.ops.sqcompile.decode_attention_fast_write(q, kf, vf, *args[3:], key, key, wpos, mean, layout_spec(kl),
                                                          layout_spec(vl), **sink)
    mask_w = mask.clone()
    mask_w[:, T - 1] = False  # the new row is masked out: the result must be the sink-merged attention above
    out_w = torch.ops.sqcompile.decode_attention_fast_write(q, kp.clone(), vp.clone(), *args[3:], key, key, wpos, mean,
                                                            layout_spec(kl), layout_spec(vl), kv_mask=mask_w,
                                                            sink_score=score, sink_value=value, sink_pos=pos)
    ref_w = fa.decode_attention_fast_reference(*args[:1], kf, vf, *args[3:], **sink)
    assert rel(out, ref_w) < 5e-3
    assert rel(out_w, fa.decode_attention_fast_reference(*args, kv_mask=mask_w, sink_score=score,
                                                         sink_value=value, sink_pos=pos)) < 5e-3
    # no mask at all: the kernel's own skip of the sink's packed copy (the mask-free tiles)
    nomask = dict(sink_score=score, sink_value=value, sink_pos=pos)
    assert rel(dc.decode_attention_fast_cuda(*args, **nomask, poison=True),
               fa.decode_attention_fast_reference(*args, **nomask)) < 5e-3
    # a value per query head (the sink and a step's new token merged into one split, `extra_inputs`)
    per_head = dict(sink_score=score, sink_value=torch.randn(B, H * G, d, device="cuda", generator=gen), sink_pos=pos)
    ref_h = fa.decode_attention_fast_reference(*args, **per_head)
    assert rel(dc.decode_attention_fast_cuda(*args, **per_head, poison=True), ref_h) < 5e-3
    assert rel(fa.decode_attention_fast_triton(*args, **per_head, poison=True), ref_h) < 5e-3
    # the sink and the outlier tokens: up to MAX_SLOTS packed copies per row to skip (the kernel's register list)
    from sqcompile.kernels.sink import MAX_SLOTS
    many = torch.stack([torch.randperm(200, device="cuda", generator=gen)[:MAX_SLOTS] for _ in range(B)]).int()
    many[2, 3:] = -1
    for sp in (torch.tensor([[0, 5, 77], [130, -1, 199], [-1, -1, -1]], device="cuda", dtype=torch.int32), many):
        for m in (None, mask):
            slots = dict(kv_mask=m, sink_score=score, sink_value=value, sink_pos=sp)
            ref_s = fa.decode_attention_fast_reference(*args, **slots)
            if m is None:  # the other skips count (under the random mask they may hit masked tokens only)
                assert rel(ref_s, fa.decode_attention_fast_reference(*args, sink_score=score, sink_value=value,
                                                                     sink_pos=sp[:, 0])) > 1e-3
            assert rel(dc.decode_attention_fast_cuda(*args, **slots, poison=True), ref_s) < 5e-3
            assert rel(fa.decode_attention_fast_triton(*args, **slots, poison=True), ref_s) < 5e-3
    # the bit-plane op's Triton kernels
    kfmt, vfmt = make_format("turbo4", d, H, torch.Generator().manual_seed(1)), make_format("hybrid", d, H, torch.Generator().manual_seed(2))
    pargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v)
             for k, v in attention_args(kfmt, vfmt, H, d, torch.Generator().manual_seed(3)).items()}
    kpp = random_planes(kfmt, B, H, T, torch.Generator().manual_seed(4)).cuda()
    vpp = random_planes(vfmt, B, H, T, torch.Generator().manual_seed(5)).cuda()
    pref = da.decode_attention_reference(q.float(), kpp, vpp, lengths, scale=0.125, **sink, **pargs)
    pout = da.decode_attention_triton(q.float(), kpp, vpp, lengths, scale=0.125, poison=True, **sink, **pargs)
    assert rel(pout, pref) < 5e-3


@pytest.mark.cuda
def test_exact_slot_ops_on_cuda_match_torch(monkeypatch):
    """sqcompile::exact_split and sqcompile::store_exact on CUDA (their Triton kernels) equal the torch forms on
    the CPU: the decode step's extra split (slots, mask, the new token in a slot) and a step's slot update."""
    from sqcompile.kernels.sink import exact_split_torch, store_exact_torch

    gen = torch.Generator().manual_seed(7)
    B, Hkv, G, S, d, T = 3, 8, 4, 5, 128, 40
    q, mean = torch.randn(B, Hkv * G, d, generator=gen), torch.randn(Hkv, d, generator=gen)
    sk, sv = torch.randn(B, Hkv, S, d, generator=gen), torch.randn(B, Hkv, S, d, generator=gen)
    pos = torch.tensor([[0, 5, -1, 9, 30], [2, 3, 7, -1, 11], [-1] * 5])
    mask = torch.rand(B, T, generator=gen) > 0.2
    new = (torch.randn(B, Hkv, 1, d, generator=gen), torch.randn(B, Hkv, 1, d, generator=gen), torch.tensor([7]))
    args = (q, mean, mask, 0.09, sk, sv, pos, *new)
    ref = exact_split_torch(*args)
    got = torch.ops.sqcompile.exact_split(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    assert torch.allclose(got[0].cpu(), ref[0], atol=1e-4) and torch.allclose(got[1].cpu(), ref[1], atol=1e-4)
    bufs = [sk.clone(), sv.clone(), pos.clone(), torch.randn(B, S, generator=gen).abs() * 50]
    key = mean[None, :, None, :] + 3 * torch.randn(B, Hkv, 1, d, generator=gen)
    step = (key, new[1], torch.tensor([12]), torch.tensor([[4], [0], [9]]), mean, True, S - 1)
    mine = [t.cuda() for t in bufs]
    store_exact_torch(*bufs, *step)
    torch.ops.sqcompile.store_exact(*mine, *[a.cuda() if isinstance(a, torch.Tensor) else a for a in step])
    for a, b in zip(mine, bufs):  # one token: the torch form's top-k keeps the slot order but for the one replaced
        a = a.cpu()
        if a.dim() == 2:
            assert torch.equal(a.sort(1).values, b.sort(1).values) if a.dtype != torch.float32 else \
                torch.allclose(a.sort(1).values, b.sort(1).values)
        else:
            assert torch.allclose(a.sum(2), b.sum(2), atol=1e-4)  # the same rows, in whatever slot order


def test_query_matrix_cache_never_serves_another_basis_at_the_same_address():
    """The op caches each basis's query matrix by the basis tensor's address and version. A second compile's basis
    allocated where a dropped first one lived (same address, same version) would read the first's entry, so an
    entry keeps the tensors it names alive: their memory is never handed to another tensor while it exists."""
    import gc
    import weakref

    kl, vl = layout_for_budget(3.25, 64)
    pl = dc.plan(64, 4, kl.spec(), vl.spec(), 8, 2)
    factor = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) + 0.5
    dc._QCACHE.clear()
    dc._PINNED.clear()
    first = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1))
    first_matrix = dc._query_matrix(pl, first, factor, 0.125)[0].clone()
    address, dropped = first.data_ptr(), weakref.ref(first)
    del first
    gc.collect()
    assert dropped() is not None and dropped().data_ptr() == address  # pinned: the address stays taken
    second = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(2))
    assert second.data_ptr() != address
    got = dc._query_matrix(pl, second, factor, 0.125)[0]
    dc._QCACHE.clear()
    want = dc._query_matrix(pl, second, factor, 0.125)[0]
    assert torch.equal(got, want) and not torch.equal(got, first_matrix)
    # an in-place change of a basis is seen too (its version moves)
    second.mul_(2)
    assert torch.allclose(dc._query_matrix(pl, second, factor, 0.125)[0], 2 * want)
    dc._QCACHE.clear()
    dc._PINNED.clear()
