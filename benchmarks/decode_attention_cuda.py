"""The CUDA fast-layout decode kernel (sqcompile/kernels/decode_attention_cuda.py) vs FP16 SDPA and the
Triton fast-layout kernel. GPU script (not a test).

Correctness first (fresh random inputs, outputs poisoned with NaN, against the torch reference: full,
ragged, length-1 and masked lengths, a capacity that is not a multiple of the tile, G = 1/4/8, d = 64),
then medians of CUDA-graph replays (caches smaller than 3x L2 are copied and read in turn). A short
table last; JSON to --out.

    PYTHONPATH=$PWD python3 benchmarks/decode_attention_cuda.py --out $OUT/cuda.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone

import torch
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_attention_fast import FastSetup, copy_bandwidth, graph_us, log, rel_err  # noqa: E402

from sqcompile.kernels import decode_attention_cuda as dc  # noqa: E402
from sqcompile.kernels import decode_attention_fast as fa  # noqa: E402

VARIANTS = {"default": {}, "w4s4": dict(warps=4, stages=4, per_sm=4), "w4s4_sm8": dict(warps=4, stages=4, per_sm=8),
            "w4s3": dict(warps=4, stages=3, per_sm=4), "w4s6": dict(warps=4, stages=6, per_sm=4),
            "w2s4_sm8": dict(warps=2, stages=4, per_sm=8), "w8s3_sm2": dict(warps=8, stages=3, per_sm=2),
            "w4s2_sm8": dict(warps=4, stages=2, per_sm=8), "w4s4_sm2": dict(warps=4, stages=4, per_sm=2),
            # a fixed split count (B * kv-heads * splits CTAs): 2 and 4 fill 132 SMs evenly at B=8, 8 kv-heads
            "w4s4_n2": dict(warps=4, stages=4, num_splits=2), "w4s4_n4": dict(warps=4, stages=4, num_splits=4),
            "w8s4_n2": dict(warps=8, stages=4, num_splits=2), "w8s2_n4": dict(warps=8, stages=2, num_splits=4),
            "w4s4_n16": dict(warps=4, stages=4, num_splits=16), "w4s2_n16": dict(warps=4, stages=2, num_splits=16),
            "w4s4_n32": dict(warps=4, stages=4, num_splits=32), "w8s3_n4": dict(warps=8, stages=3, num_splits=4),
            "w8s4_n4": dict(warps=8, stages=4, num_splits=4), "w8s2_n8": dict(warps=8, stages=2, num_splits=8),
            "w8s3_n8": dict(warps=8, stages=3, num_splits=8),
            # 64 rows x 33 splits = 2112 CTAs = 8 whole waves of 2 CTAs on each of 132 SMs (66: 16 waves)
            "w8s2_n33": dict(warps=8, stages=2, num_splits=33), "w8s2_n66": dict(warps=8, stages=2, num_splits=66),
            "w4s2_n33": dict(warps=4, stages=2, num_splits=33)}
CHECKED = ("default", "w4s4", "w2s4_sm8")  # variants the correctness checks run


def kernel_info(st, Hq, H, d, kw) -> dict:
    """Registers per thread and resident CTAs per SM of the split kernel that variant `kw` runs (the driver's
    numbers for the NVRTC build)."""
    import ctypes

    pl = dc.plan(d, Hq // H, st.kl.spec(), st.vl.spec(), kw.get("warps", 8), kw.get("stages", 2))
    k = pl.compiled("sq_fast_decode")
    lib, regs, ctas = ctypes.CDLL("libcuda.so.1"), ctypes.c_int(), ctypes.c_int()
    lib.cuFuncGetAttribute(ctypes.byref(regs), 4, k.func)  # CU_FUNC_ATTRIBUTE_NUM_REGS
    lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(ctas), k.func, 32 * pl.W, ctypes.c_size_t(pl.smem))
    return dict(regs=regs.value, ctas_per_sm=ctas.value, smem=pl.smem)


def checks(dev, gen, out):
    ok_all = True
    cases = [  # (bits, B, Hq, Hkv, d, S (capacity), lengths kind, mask)
        (2.69, 4, 32, 8, 128, 1000, "full", False), (2.69, 4, 32, 8, 128, 1000, "ragged", False),
        (3.25, 3, 32, 8, 128, 4104, "ragged", False), (4.25, 2, 32, 8, 128, 520, "one", False),
        (2.69, 3, 32, 8, 128, 776, "ragged", True), (4.25, 2, 8, 8, 128, 512, "ragged", False),
        (3.25, 2, 64, 8, 128, 512, "full", True), (4.25, 2, 12, 4, 64, 264, "ragged", False),
    ]
    for bits, B, Hq, H, d, S, lk, masked in cases:
        st = FastSetup(bits, H, d, dev, gen, align=2)
        kp, vp = st.fill(B, H, S, d, dev, gen)
        q = torch.randn(B, Hq, d, device=dev, generator=gen).half()
        L = {"full": torch.full((B,), S), "one": torch.ones(B),
             "ragged": torch.randint(1, S + 1, (B,), generator=torch.Generator().manual_seed(S))}[lk]
        L = L.to(dev, torch.int32)
        m = (torch.rand(B, S, device=dev, generator=gen) > 0.3) if masked else None
        if m is not None:
            m[:, 0] = True
        ref = fa.decode_attention_fast_reference(q, kp, vp, L, scale=1 / math.sqrt(d), kv_mask=m, **st.args)
        why = dc.supports(st.kl, st.vl, d, Hq // H, S)
        for vname in CHECKED:
            kw = VARIANTS[vname]
            try:
                o = dc.decode_attention_fast_cuda(q, kp, vp, L, scale=1 / math.sqrt(d), kv_mask=m, poison=True,
                                                  **st.args, **kw)
                torch.cuda.synchronize()
                e = rel_err(o, ref)
                ok = bool(torch.isfinite(o).all()) and e < 5e-3
            except Exception as exc:
                e, ok = float("nan"), False
                log(f"  {type(exc).__name__}: {str(exc)[:1500]}")
            ok_all &= ok
            out.append(dict(bits=bits, B=B, Hq=Hq, Hkv=H, d=d, S=S, lengths=lk, mask=masked, variant=vname,
                            rel_err=e, ok=ok, supported=why))
            log(f"check {bits} B{B} Hq{Hq}/{H} d{d} S{S} {lk}{' mask' if masked else ''} {vname}: rel err {e:.2e} "
                f"{'ok' if ok else 'FAIL'}{'' if why is None else ' (unsupported: ' + why + ')'}")
    return ok_all


def time_write(st, dev, gen, B=8, H=8, d=128, S=4096, kw=None):
    """P3: one decode step's quantize-on-write of one layer (B tokens, K and V): the torch form under Inductor
    (`fast_cache.quantize_write_fast_torch`, several Inductor kernels), the one-launch Triton op called directly, and the
    op as `quantize_write_fast` decomposes under Inductor on CUDA. Also: the fraction of written bytes equal
    to the torch form's (a code may move by one level where a value sits on a decision boundary)."""
    from sqcompile.kernels import fast_cache, quantize_write_fast_triton  # noqa: F401  (registers the op)

    kp, vp = st.fill(B, H, S + 8, d, dev, gen)  # random codes, so the attention checks below mean something
    key = torch.randn(B, H, 1, d, device=dev, generator=gen, dtype=torch.bfloat16)
    val = torch.randn(B, H, 1, d, device=dev, generator=gen, dtype=torch.bfloat16)
    pos = torch.tensor([S - 1], device=dev)
    basis, mean = st.args["k_basis"], torch.randn(H, d, device=dev, generator=gen)
    ks, vs = st.kl.spec(), st.vl.spec()

    def write_torch(key, val, kp, vp, pos):
        fast_cache.quantize_write_fast_torch(key, val, kp, vp, pos, basis, mean, ks, vs)

    def write(key, val, kp, vp, pos):
        fast_cache.quantize_write_fast(key, val, kp, vp, pos, basis, mean, ks, vs)

    def triton_op(key, val, kp, vp, pos):
        torch.ops.sqcompile.quantize_write_fast_triton(key, val, kp, vp, pos, basis, mean, ks, vs)

    ref0_k, ref0_v = kp.clone(), vp.clone()
    ref_k, ref_v = kp.clone(), vp.clone()
    write_torch(key, val, ref_k, ref_v, pos)  # the torch form, eager
    torch._dynamo.reset()
    comp_torch = torch.compile(write_torch)
    comp_torch(key, val, kp, vp, pos)
    t_torch = graph_us([lambda: comp_torch(key, val, kp, vp, pos)])
    torch._dynamo.reset()
    kp.copy_(ref0_k), vp.copy_(ref0_v)
    triton_op(key, val, kp, vp, pos)
    same = (float((kp[:, :, S - 1] == ref_k[:, :, S - 1]).float().mean()),
            float((vp[:, :, S - 1] == ref_v[:, :, S - 1]).float().mean()))
    t_op = graph_us([lambda: triton_op(key, val, kp, vp, pos)])
    comp = torch.compile(write)
    kp2, vp2 = ref0_k.clone(), ref0_v.clone()
    comp(key, val, kp2, vp2, pos)
    same_comp = bool(torch.equal(kp2, kp) and torch.equal(vp2, vp))
    t_comp = graph_us([lambda: comp(key, val, kp2, vp2, pos)])
    # what the write adds to a decode step: the write and then the 4K attention call in one graph, against the
    # attention call alone (a one-node graph also times the graph launch)
    q = torch.randn(B, 4 * H, d, device=dev, generator=gen).half()
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)

    kw = kw or {}

    def attend():
        return dc.decode_attention_fast_cuda(q, kp, vp, lens, scale=1 / math.sqrt(d), **st.args, **kw)

    t_attn = graph_us([attend])
    t_both = graph_us([lambda: (triton_op(key, val, kp, vp, pos), attend())])
    # the write inside the attention op's first launch (what sqcompile::decode_attention_fast_write runs)
    wr = (key, val, pos, basis, mean, ks, vs)
    kp3, vp3 = ref0_k.clone(), ref0_v.clone()
    out_fused = dc.decode_attention_fast_cuda(q, kp3, vp3, lens, scale=1 / math.sqrt(d), **st.args, write=wr, **kw)
    out_sep = attend()  # kp/vp hold the Triton op's row
    fused_same = (float((kp3[:, :, S - 1] == ref_k[:, :, S - 1]).float().mean()),
                  float((vp3[:, :, S - 1] == ref_v[:, :, S - 1]).float().mean()))
    rest_kept = bool(torch.equal(kp3[:, :, :S - 1], ref0_k[:, :, :S - 1]) and
                     torch.equal(vp3[:, :, S:], ref0_v[:, :, S:]))
    fused_err = rel_err(out_fused, out_sep)
    kp4, vp4 = ref0_k.clone(), ref0_v.clone()
    out_op = torch.ops.sqcompile.decode_attention_fast_write(
        q, kp4, vp4, lens, st.args["k_basis"], st.args["k_factor"], st.args["v_factor"], st.args["k_groups"],
        st.args["v_groups"], 1 / math.sqrt(d), key, val, pos, mean, ks, vs)
    op_same = bool(torch.equal(kp4, kp3) and torch.equal(vp4, vp3) and torch.equal(out_op, out_fused))
    t_fused = graph_us([lambda: dc.decode_attention_fast_cuda(q, kp3, vp3, lens, scale=1 / math.sqrt(d), **st.args,
                                                              write=wr, **kw)])
    return dict(inductor_torch_us=t_torch, triton_op_us=t_op, inductor_triton_us=t_comp,
                equal_bytes_k=same[0], equal_bytes_v=same[1], compiled_equals_op=same_comp,
                attention_us=t_attn, write_then_attention_us=t_both, write_increment_us=t_both - t_attn,
                fused_us=t_fused, fused_increment_us=t_fused - t_attn, fused_equal_bytes_k=fused_same[0],
                fused_equal_bytes_v=fused_same[1], fused_rest_untouched=rest_kept, fused_out_rel_err=fused_err,
                op_equals_fused=op_same)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode_attention_cuda.json")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--bits", type=float, nargs="+", default=[2.69, 3.25, 4.25])
    ap.add_argument("--tune", nargs="*", default=list(VARIANTS))
    ap.add_argument("--dump", default=None, help="write the generated CUDA source of the 2.69 plan here")
    ap.add_argument("--repeat", type=int, default=1, help="time the --tune variants this many times, interleaved; "
                    "each variant's median counts")
    ap.add_argument("--skip-write", action="store_true", help="no P3 write timing")
    ap.add_argument("--write-variants", nargs="+", default=["default"], help="variants the P3 timing runs")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    props = torch.cuda.get_device_properties(dev)
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv))
    meta["copy_TBps"] = copy_bandwidth(dev)
    log(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, copy {meta['copy_TBps']:.2f} TB/s")
    res = dict(meta=meta, checks=[], rows=[], tuning=[])
    ok = checks(dev, gen, res["checks"])
    log(f"correctness: {'all ok' if ok else 'FAILURES'}")
    if not ok:
        json.dump(res, open(args.out, "w"), indent=1)
        sys.exit(1)
    B, Hq, H, d = 8, 32, 8, 128
    scale = 1 / math.sqrt(d)
    for bi, bits in enumerate(args.bits):
        st = FastSetup(bits, H, d, dev, gen, align=2)
        log(f"\n## {bits}: K {st.kl.describe()} | V {st.vl.describe()}")
        for S in args.seq:
            kp, vp = st.fill(B, H, S, d, dev, gen)
            q = torch.randn(B, Hq, d, device=dev, generator=gen).half()
            lens = torch.full((B,), S, dtype=torch.int32, device=dev)
            n_c = max(1, min(8, math.ceil(3 * props.L2_cache_size / (B * H * S * (st.kb + st.vb)))))
            copies = [(kp, vp)] + [(kp.clone(), vp.clone()) for _ in range(n_c - 1)]
            t = {}
            names = args.tune if bi == 0 else [min((r for r in res["tuning"] if r["S"] == S),
                                                   key=lambda r: r["us"])["variant"]]
            runs: dict = {}
            for rep in range(args.repeat if bi == 0 else 1):
                for vname in names:
                    kw = VARIANTS[vname]
                    try:
                        dc.decode_attention_fast_cuda(q, kp, vp, lens, scale=scale, **st.args, **kw)
                        us = graph_us([lambda a=a, b_=b_, kw=kw: dc.decode_attention_fast_cuda(
                            q, a, b_, lens, scale=scale, **st.args, **kw) for a, b_ in copies])
                    except Exception as exc:
                        log(f"variant {vname}: {type(exc).__name__}: {str(exc)[:300]}")
                        continue
                    if vname not in runs and S == args.seq[0]:
                        info = kernel_info(st, Hq, H, d, kw)
                        res.setdefault("kernels", {})[vname] = info
                        log(f"variant {vname}: {info}")
                    runs.setdefault(vname, []).append(us)
                    log(f"S={S:6d} cuda {vname:10s} {us:8.1f} us{f' (repeat {rep})' if args.repeat > 1 else ''}")
            for vname, us in runs.items():
                t[vname] = sorted(us)[len(us) // 2]
                if bi == 0:
                    res["tuning"].append(dict(S=S, variant=vname, us=t[vname], runs=us))
            best = min(t, key=t.get)
            if bi == 0:  # host time per call, no CUDA graph (what an eager or Inductor caller pays)
                import time
                fns = {"op (cuda)": lambda kp=kp, vp=vp: torch.ops.sqcompile.decode_attention_fast(
                           q, kp, vp, lens, scale=scale, **st.args),
                       "triton": lambda kp=kp, vp=vp: fa.decode_attention_fast_triton(q, kp, vp, lens, scale=scale,
                                                                                      **st.args)}
                for name, f in fns.items():
                    f()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(100):
                        f()
                    torch.cuda.synchronize()
                    us = (time.perf_counter() - t0) * 1e4
                    res.setdefault("eager_loop", []).append(dict(S=S, what=name, us=us))
                    log(f"S={S:6d} eager loop {name}: {us:.1f} us per call (host + device, no graph)")
            t_tri = graph_us([lambda a=a, b_=b_: fa.decode_attention_fast_triton(q, a, b_, lens, scale=scale, **st.args)
                              for a, b_ in copies])
            del copies
            k16 = torch.randn(B, H, S, d, device=dev, generator=gen, dtype=torch.float16)
            v16 = torch.randn(B, H, S, d, device=dev, generator=gen, dtype=torch.float16)
            t_sdpa = graph_us([lambda k16=k16, v16=v16: torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], k16, v16, scale=scale, enable_gqa=True)])
            del k16, v16
            if bi == 0:
                for r in res["tuning"]:
                    if r["S"] == S:
                        r["sdpa_us"], r["x_sdpa"] = t_sdpa, t_sdpa / r["us"]
                        log(f"S={S:6d} cuda {r['variant']:12s} median {r['us']:8.1f} us x{t_sdpa / r['us']:5.3f} "
                            f"(runs {' '.join(f'{u:.1f}' for u in r['runs'])})")
            for impl, us, nbytes in (("fp16_sdpa", t_sdpa, 2 * B * H * S * d * 2),
                                     ("triton_fast", t_tri, B * H * S * (st.kb + st.vb)),
                                     ("cuda_fast", t[best], B * H * S * (st.kb + st.vb))):
                tb = nbytes / (us * 1e-6) / 1e12
                row = dict(bits=bits, bpe=8 * (st.kb + st.vb) / (2 * d), S=S, impl=impl, us=us,
                           x_sdpa=t_sdpa / us, TBps=tb, pct_copy=100 * tb / meta["copy_TBps"],
                           variant=best if impl == "cuda_fast" else None)
                res["rows"].append(row)
                log(f"S={S:6d} {impl:12s} {us:8.1f} us x{t_sdpa / us:5.2f} {tb:5.2f} TB/s ({row['pct_copy']:.0f}%)")
            del kp, vp
            torch.cuda.empty_cache()
            json.dump(res, open(args.out, "w"), indent=1)
    for bits, wv in [] if args.skip_write else [(b, v) for b in args.bits for v in args.write_variants]:
        st = FastSetup(bits, H, d, dev, gen, align=2)
        try:
            w = time_write(st, dev, gen, kw=VARIANTS[wv])
        except Exception as exc:
            log(f"write timing failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        att = [r for r in res["rows"] if r["bits"] == bits and r["S"] == 4096 and r["impl"] == "cuda_fast"]
        a_us = att[0]["us"] if att else float("nan")
        best = min(w["triton_op_us"], w["inductor_triton_us"])
        res.setdefault("write", []).append(dict(bits=bits, variant=wv, decode_4k_us=a_us, ratio=best / a_us, **w))
        log(f"P3 {bits}: write of one decode step, one layer (B=8): torch form under Inductor "
            f"{w['inductor_torch_us']:.1f} us; Triton op {w['triton_op_us']:.1f} us, under Inductor "
            f"{w['inductor_triton_us']:.1f} us (same bytes as the op: {w['compiled_equals_op']}); bytes equal to the "
            f"torch form K {100 * w['equal_bytes_k']:.1f}% V {100 * w['equal_bytes_v']:.1f}%; decode attention at 4K "
            f"{a_us:.1f} us -> {100 * best / a_us:.0f}%; in one graph with the attention call "
            f"{w['write_then_attention_us']:.1f} vs {w['attention_us']:.1f} us alone: the write adds "
            f"{w['write_increment_us']:.1f} us ({100 * w['write_increment_us'] / w['attention_us']:.0f}%)")
        log(f"P3 {bits} {wv} fused (the write in the attention op's query launch): {w['fused_us']:.1f} vs "
            f"{w['attention_us']:.1f} us alone: the write adds {w['fused_increment_us']:.2f} us "
            f"({100 * w['fused_increment_us'] / w['attention_us']:.1f}%); bytes equal to the torch form K "
            f"{100 * w['fused_equal_bytes_k']:.1f}% V {100 * w['fused_equal_bytes_v']:.1f}%, other rows untouched: "
            f"{w['fused_rest_untouched']}, output vs write-then-attend rel. err {w['fused_out_rel_err']:.2e}, "
            f"the op runs the fused kernel: {w['op_equals_fused']}")
    json.dump(res, open(args.out, "w"), indent=1)
    log(f"\n# {meta['device']}, copy {meta['copy_TBps']:.2f} TB/s, B={B} Hq={Hq} Hkv={H} d={d}")
    log(f"{'bits':>5} {'b/elem':>6} {'S':>6} {'impl':>12} {'us':>8} {'x sdpa':>7} {'TB/s':>6} {'%copy':>6} variant")
    for r in res["rows"]:
        log(f"{r['bits']:>5} {r['bpe']:6.3f} {r['S']:>6} {r['impl']:>12} {r['us']:8.1f} {r['x_sdpa']:7.2f} "
            f"{r['TBps']:6.2f} {r['pct_copy']:5.0f}% {r['variant'] or ''}")


if __name__ == "__main__":
    main()
