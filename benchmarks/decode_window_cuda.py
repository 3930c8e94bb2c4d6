"""The recent window on the CUDA decode path: correctness, then speed. GPU script (not a test).

A compiled decode step with `SpectralCache(recent_window=W)` runs `sqcompile::exact_split` (one Triton launch: the
exact slots, the step's own token and the window's ring, merged into one split) and the CUDA fast-layout kernel over
the codes before the window (`sink.codes_lengths`), which merges that split. This script

1. checks that pair (outputs poisoned) against the torch reference (`exact_split_torch` +
   `decode_attention_fast_reference`), window off and on, G = 1/4/8, head_dim 128 (and 64/256 where the CUDA kernel
   takes the layout), ragged lengths, rings that wrapped and rings shorter than W;
2. times with `triton.testing.do_bench` (median; L2 flushed between calls; each variant one captured CUDA graph, so
   no host time): FP16 SDPA (enable_gqa, exactly S tokens) against the CUDA kernel alone (W = 0, no exact tokens) and
   the decode step's whole attention (exact split + kernel) at W = 0, 48, 128 with 5 exact slots and the new token
   (`codes_lengths` as one Inductor kernel, as in a compiled step);
3. times the decode step's write at 4K: the write fused into the kernel's first launch (the kernel with the write
   minus without), the ring's store (`SpectralLayer._store_window`: three index_copy_), against one call.

    PYTHONPATH=$PWD python3 benchmarks/decode_window_cuda.py --out $OUT/window.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_attention_fast import FastSetup, rel_err  # noqa: E402

from sqcompile.kernels import decode_attention_cuda as dc  # noqa: E402
from sqcompile.kernels import decode_attention_fast as fa  # noqa: E402
from sqcompile.kernels.fast_cache import layout_spec  # noqa: E402
from sqcompile.kernels.sink import codes_lengths, exact_split_torch  # noqa: E402


def log(*a):
    print(*a, flush=True)


def ring(B, H, W, d, lengths, dev, gen):
    """The ring after lengths[b] tokens of row b: position p in slot p % W, -1 where empty; random fp16 K/V."""
    wk = torch.randn(B, H, W, d, device=dev, generator=gen).half()
    wv = torch.randn(B, H, W, d, device=dev, generator=gen).half()
    wp = torch.full((B, W), -1, dtype=torch.int64, device=dev)
    for b, L in enumerate(lengths):
        p = torch.arange(max(0, L - W), L, device=dev)
        wp[b, p % W] = p
    return wk, wv, wp


def exact_inputs(B, H, d, S, W, lengths, dev, gen, slots=5):
    """Slots (the sink at 0 and outliers, one of them inside the window), the new token at the newest position,
    the ring: what the substitution pass hands the split."""
    sk = torch.randn(B, H, slots, d, device=dev, generator=gen)
    sv = torch.randn(B, H, slots, d, device=dev, generator=gen)
    sp = torch.stack([torch.tensor([0] + [max(0, L - 1 - 3 * i) for i in range(1, slots)]) for L in lengths]).to(dev)
    mean = torch.randn(H, d, device=dev, generator=gen)
    newest = max(lengths) - 1
    new = (torch.randn(B, H, 1, d, device=dev, generator=gen), torch.randn(B, H, 1, d, device=dev, generator=gen),
           torch.tensor([newest], device=dev))
    win = ring(B, H, W, d, lengths, dev, gen) if W else None
    return sk, sv, sp, mean, new, win


def step(q, kp, vp, st, scale, ex, lengths_written, poison=False, lens_fn=codes_lengths):
    """The decode step's attention as the compiled graph runs it: exact split, then the CUDA kernel."""
    sk, sv, sp, mean, new, win = ex
    score, value, pos = torch.ops.sqcompile.exact_split(q, mean, None, scale, sk, sv, sp, *new,
                                                        *(win if win is not None else ()))
    lens = lens_fn(lengths_written, win[2]) if win is not None else lengths_written
    return dc.decode_attention_fast_cuda(q, kp, vp, lens, scale=scale, **st.args, poison=poison, sink_score=score,
                                         sink_value=value, sink_pos=pos)


def reference(q, kp, vp, st, scale, ex, lengths_written):
    sk, sv, sp, mean, new, win = ex
    w = win if win is not None else (None,) * 3
    score, value = exact_split_torch(q, mean, None, scale, sk, sv, sp, *new, *w)
    lens = codes_lengths(lengths_written, win[2]) if win is not None else lengths_written
    return fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, **st.args, sink_score=score,
                                              sink_value=value, sink_pos=sp.int())


def checks(dev, gen):
    rows, ok_all = [], True
    cases = [  # (bits, B, Hq, Hkv, d, S capacity, W, lengths)
        (2.75, 3, 8, 8, 128, 1000, 0, [1000, 513, 77]), (2.75, 3, 8, 8, 128, 1000, 32, [1000, 513, 20]),
        (2.75, 3, 32, 8, 128, 4104, 128, [4104, 130, 100]), (3.25, 2, 64, 8, 128, 520, 32, [520, 31]),
        (3.25, 2, 32, 8, 128, 520, 0, [520, 31]), (3.25, 2, 12, 4, 64, 264, 40, [264, 100]),
        (2.75, 2, 16, 4, 256, 264, 32, [264, 40]), (2.75, 2, 16, 2, 256, 264, 0, [264, 40]),
    ]
    for bits, B, Hq, H, d, S, W, lengths in cases:
        st = FastSetup(bits, H, d, dev, gen, align=2)
        why = dc.supports(st.kl, st.vl, d, Hq // H, S)
        if why is not None:
            log(f"check bits={bits} d={d} G={Hq // H} W={W}: CUDA kernel does not take it ({why})")
            rows.append(dict(bits=bits, d=d, G=Hq // H, W=W, skipped=why))
            continue
        kp, vp = st.fill(B, H, S, d, dev, gen)
        q = torch.randn(B, Hq, d, device=dev, generator=gen).half()
        scale = 1 / math.sqrt(d)
        ex = exact_inputs(B, H, d, S, W, lengths, dev, gen)
        written = torch.tensor(lengths, device=dev) - 1  # before each row's own token (its exact copy is in `new`)
        written = torch.minimum(written, ex[4][2])
        ref = reference(q, kp, vp, st, scale, ex, written)
        out = step(q, kp, vp, st, scale, ex, written, poison=True)
        err = rel_err(out, ref)
        ok = bool(torch.isfinite(out).all()) and err < 5e-3
        ok_all &= ok
        rows.append(dict(bits=bits, B=B, Hq=Hq, Hkv=H, d=d, S=S, W=W, lengths=lengths, rel_err=err, ok=ok))
        log(f"check bits={bits} B={B} G={Hq // H} d={d} S={S} W={W} lengths={lengths}: rel err {err:.2e} "
            f"{'OK' if ok else 'FAIL'}")
    return rows, ok_all


def graphed(fn):
    """fn captured once as a CUDA graph (after two warm-up calls that fill the kernels' caches)."""
    fn(), fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def us(fn) -> float:
    g = graphed(fn)
    return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3


def timing(dev, gen, seqs, bits_list, windows, B=8, Hq=32, H=8, d=128):
    rows = []
    scale = 1 / math.sqrt(d)
    lens_fn = torch.compile(codes_lengths, fullgraph=True)  # one Inductor kernel, as in a compiled decode step
    for S in seqs:
        q4 = torch.randn(B, Hq, 1, d, device=dev, generator=gen).half()
        k16 = torch.randn(B, H, S, d, device=dev, generator=gen).half()
        v16 = torch.randn(B, H, S, d, device=dev, generator=gen).half()
        t_sdpa = us(lambda: F.scaled_dot_product_attention(q4, k16, v16, enable_gqa=True))
        del k16, v16
        q = q4[:, :, 0].contiguous()
        for bits in bits_list:
            st = FastSetup(bits, H, d, dev, gen, align=2)
            kp, vp = st.fill(B, H, S, d, dev, gen)
            full = torch.full((B,), S, dtype=torch.int32, device=dev)
            t_kernel = us(lambda: dc.decode_attention_fast_cuda(q, kp, vp, full, scale=scale, **st.args))
            row = dict(S=S, bits=bits, bits_per_element=st.bits_per_element, sdpa_us=t_sdpa, kernel_us=t_kernel)
            for W in windows:
                ex = exact_inputs(B, H, d, S, W, [S] * B, dev, gen)
                written = torch.full((B,), S - 1, device=dev)  # one length per row (the kernel reads B of them)
                row[f"step_W{W}_us"] = us(lambda: step(q, kp, vp, st, scale, ex, written, lens_fn=lens_fn))
                sk, sv, sp, mean, new, win = ex
                row[f"split_W{W}_us"] = us(lambda: torch.ops.sqcompile.exact_split(
                    q, mean, None, scale, sk, sv, sp, *new, *(win if win is not None else ())))
            rows.append(row)
            log(json.dumps(row))
            del kp, vp
        torch.cuda.empty_cache()
    return rows


def write_cost(dev, gen, bits, S=4096, B=8, Hq=32, H=8, d=128, W=32):
    """The decode step's write at S: fused into the kernel's first launch, and the ring's store, vs one call."""
    st = FastSetup(bits, H, d, dev, gen, align=2)
    kp, vp = st.fill(B, H, S, d, dev, gen)
    q = torch.randn(B, Hq, d, device=dev, generator=gen).half()
    scale = 1 / math.sqrt(d)
    full = torch.full((B,), S - 1, dtype=torch.int32, device=dev)
    key = torch.randn(B, H, 1, d, device=dev, generator=gen)
    val = torch.randn(B, H, 1, d, device=dev, generator=gen)
    pos = torch.tensor([S - 1], device=dev)
    mean = torch.randn(H, d, device=dev, generator=gen)
    wr = (key, val, pos, st.args["k_basis"], mean, layout_spec(st.kl), layout_spec(st.vl))
    t_attn = us(lambda: dc.decode_attention_fast_cuda(q, kp, vp, full, scale=scale, **st.args))
    t_fused = us(lambda: dc.decode_attention_fast_cuda(q, kp, vp, full, scale=scale, **st.args, write=wr))
    wk, wv, wp = ring(B, H, W, d, [S - 1] * B, dev, gen)

    def store_window():  # SpectralLayer._store_window for one token
        slot = pos % W
        wk.index_copy_(2, slot, key.to(torch.float16))
        wv.index_copy_(2, slot, val.to(torch.float16))
        wp.index_copy_(1, slot, pos[None, :].expand(B, 1).contiguous())

    t_ring = us(store_window)
    # what a compiled decode step runs: Inductor fuses the slot arithmetic and the casts into the copies
    compiled = torch.compile(store_window, backend="inductor", fullgraph=True)
    compiled()
    t_ring_compiled = us(compiled)
    return dict(S=S, bits=bits, W=W, attention_us=t_attn, fused_write_us=t_fused, fused_increment_us=t_fused - t_attn,
                ring_store_us=t_ring, ring_store_inductor_us=t_ring_compiled,
                write_share=(t_fused - t_attn + t_ring) / t_attn,
                write_share_inductor=(t_fused - t_attn + t_ring_compiled) / t_attn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode_window_cuda.json")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--bits", type=float, nargs="+", default=[2.75, 3.25])
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 48, 128])
    ap.add_argument("--write-window", type=int, default=48, help="the ring size of the write timing")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv))
    log(res)
    res["checks"], ok = checks(dev, gen)
    log("checks:", "all OK" if ok else "FAILURES")
    res["timing"] = timing(dev, gen, args.seq, args.bits, args.windows)
    res["write"] = [write_cost(dev, gen, b, W=args.write_window) for b in args.bits]
    for w in res["write"]:
        log(json.dumps(w))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    log(f"\n{res['device']}, B=8, 32 query / 8 kv heads, d=128, do_bench median of CUDA-graph replays (us)")
    head = "| S | bits | SDPA | kernel W=0 (no exact) | " + " | ".join(f"step W={W}" for W in args.windows) + \
        " | x SDPA (" + ", ".join(f"W={W}" for W in args.windows) + ") |"
    log(head)
    log("|" + "---|" * (head.count("|") - 1))
    for r in res["timing"]:
        steps = [r[f"step_W{W}_us"] for W in args.windows]
        log(f"| {r['S']} | {r['bits']:g} ({r['bits_per_element']:.2f}) | {r['sdpa_us']:.1f} | {r['kernel_us']:.1f} "
            f"({r['sdpa_us'] / r['kernel_us']:.2f}x) | " + " | ".join(f"{t:.1f}" for t in steps) + " | " +
            ", ".join(f"{r['sdpa_us'] / t:.2f}x" for t in steps) + " |")
    log("split alone (us): " + "; ".join(f"S={r['S']} bits={r['bits']:g}: " + ", ".join(
        f"W={W} {r[f'split_W{W}_us']:.1f}" for W in args.windows) for r in res["timing"]))
    for w in res["write"]:
        log(f"write at 4K, bits {w['bits']:g}: attention {w['attention_us']:.1f} us, fused write +"
            f"{w['fused_increment_us']:.2f} us, ring store (W={w['W']}) {w['ring_store_us']:.2f} us eager / "
            f"{w['ring_store_inductor_us']:.2f} us under Inductor: {100 * w['write_share']:.1f}% / "
            f"{100 * w['write_share_inductor']:.1f}% of the call")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
