"""Decode attention over the packed SpectralQuant cache vs FP16 SDPA (GPU script, not a test).

Rows per (bits, S): FP16 SDPA (enable_gqa), naive dequantize + SDPA (sqcompile.quant unpack/decode,
then SDPA), and the fused Triton kernel (sqcompile.kernels.decode_attention). Shapes: B=8, 32 query
heads, 8 kv-heads, head_dim 128. Formats: build_codec(None, bits=..., method="turboquant").
Correctness first (fused vs the torch reference, and Triton quantize_write vs the reference), then
median times of CUDA-graph replays (triton.testing.do_bench_cudagraph; no host launch overhead, as
under torch.compile(mode="reduce-overhead"); caches smaller than 3x the L2 are copied and read in
turn so the bytes come from HBM), also the eager do_bench times (L2 cleared between repetitions, host
launch included), bytes read, achieved TB/s, and quantize_write (one decode step, one layer) against
one decode-attention call.

    python benchmarks/decode_attention.py --out results.json [--seq 4096 16384 65536] [--tune] [--qjl]
    python benchmarks/decode_attention.py --offline-sass [VARIANT ...] --bits 2.69   # CPU only: SASS mix
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from sqcompile.kernels import decode_attention as da
from sqcompile.kernels import quantize_write as qw
from sqcompile.kernels._bitplanes import PackedLayout, kernel_args
from sqcompile.quant import packing
from sqcompile.quant.codec import build_codec

VARIANTS = {  # name -> decode_attention_triton keyword arguments (tuned on an H200; BENCHMARKS.md)
    "bn64_l1_w4": dict(block_n=64, unpack=1, lookup=1, num_warps=4, num_stages=2),
    "bn32_l1_w4_sp16": dict(block_n=32, unpack=1, lookup=1, num_warps=4, num_stages=2, num_splits=16),
    "bn64_l1_w4_r128": dict(block_n=64, unpack=1, lookup=1, num_warps=4, num_stages=2, maxnreg=128),
    "bn64_l1_w4_r128_sp16": dict(block_n=64, unpack=1, lookup=1, num_warps=4, num_stages=2, maxnreg=128,
                                 num_splits=16),
    "bn32_l1_w4_r96_sp16": dict(block_n=32, unpack=1, lookup=1, num_warps=4, num_stages=2, maxnreg=96,
                                num_splits=16),
    "bn64_l2_w4": dict(block_n=64, unpack=1, lookup=2, num_warps=4, num_stages=2),
    "bn64_l2_w4_r128": dict(block_n=64, unpack=1, lookup=2, num_warps=4, num_stages=2, maxnreg=128),
    "bn64_l1_w4_s1": dict(block_n=64, unpack=1, lookup=1, num_warps=4, num_stages=1),
}


def graph_us(fns) -> float:
    """Median us per call of the callables in `fns`, run back to back inside one CUDA graph (no
    host launch overhead: decode runs as a graph under torch.compile(mode="reduce-overhead"))."""
    def run_all():
        for f in fns:
            f()
    return do_bench_cudagraph(run_all, rep=100, return_mode="median") * 1e3 / len(fns)


def log(*a):
    print(*a, flush=True)


def copy_bandwidth(dev) -> float:
    """TB/s of a 1 GiB device-to-device copy, bytes read + written."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3) / 1e12


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Setup:
    """One format (bits budget) with its kernel arguments."""

    def __init__(self, bits: float, H: int, d: int, dev, qjl: bool = False):
        codec = build_codec(None, bits=bits, method="turboquant", num_layers=1, num_kv_heads=H, head_dim=d,
                            qjl="all" if qjl else False)
        self.codec = codec.to(dev)
        self.kfmt, self.vfmt = self.codec.format("key", 0), self.codec.format("value", 0)
        lc = self.codec.layers[0]
        kg, kcb, kcs = kernel_args(self.kfmt)
        vg, vcb, vcs = kernel_args(self.vfmt)
        self.write_args = dict(k_basis=lc.key_basis.float().contiguous(), k_mean=lc.key_mean.float().contiguous(),
                               k_codebooks=kcb.to(dev), k_channel_scale=kcs.to(dev), v_codebooks=vcb.to(dev),
                               v_channel_scale=vcs.to(dev), k_qjl_proj=lc.qjl_matrix, k_groups=kg, v_groups=vg,
                               qjl_dims=self.kfmt.qjl_dims, qjl_bits=self.kfmt.qjl_bits)
        self.attn_args = {k: v for k, v in self.write_args.items() if k != "k_mean"}
        self.k_bytes, self.v_bytes = self.kfmt.bytes_per_token(), self.vfmt.bytes_per_token()
        self.bits_per_element = 8 * (self.k_bytes + self.v_bytes) / (2 * d)
        self.name = f"{bits:g}{'+qjl' if qjl else ''}"


def fill_cache(st: Setup, B, H, S, d, dev, gen, chunk=8192):
    """Quantize random post-RoPE-like keys / values with the Triton quantize_write, chunk by chunk."""
    kp = torch.empty(B, H, S, st.k_bytes, dtype=torch.uint8, device=dev)
    vp = torch.empty(B, H, S, st.v_bytes, dtype=torch.uint8, device=dev)
    k16 = torch.empty(B, H, S, d, dtype=torch.float16, device=dev)
    v16 = torch.empty(B, H, S, d, dtype=torch.float16, device=dev)
    for s0 in range(0, S, chunk):
        n = min(chunk, S - s0)
        k = torch.randn(B, H, n, d, device=dev, generator=gen) * 2 + 0.5
        v = torch.randn(B, H, n, d, device=dev, generator=gen)
        k16[:, :, s0:s0 + n] = k.half()
        v16[:, :, s0:s0 + n] = v.half()
        qw.quantize_write_triton(k.half(), v.half(), kp, vp, torch.arange(s0, s0 + n, device=dev), **st.write_args)
    return kp, vp, k16, v16


def naive_dequant_sdpa(st: Setup, q, kp, vp, scale):
    """What the issue measured: unpack + decode the whole cache with torch ops, rotate q, then SDPA."""
    B, Hq, d = q.shape
    kc, ks, _, _ = packing.unpack(st.kfmt, kp)
    vc, vs, _, _ = packing.unpack(st.vfmt, vp)
    k = st.kfmt.decode(kc, ks, kp).half()
    v = st.vfmt.decode(vc, vs, vp).half()
    Hkv = kp.shape[1]
    qs = torch.einsum("bhgd,hed->bhge", q.float().view(B, Hkv, Hq // Hkv, d), st.write_args["k_basis"])
    return torch.nn.functional.scaled_dot_product_attention(qs.reshape(B, Hq, 1, d).half(), k, v, scale=scale,
                                                            enable_gqa=True)[:, :, 0]


def offline_sass(bits_list, variants, H=8, Hq=32, d=128, splits=16):
    """No GPU needed: compile the decode kernel for sm_90 with the local Triton and its bundled ptxas,
    print registers/spills (cuobjdump -res-usage) and the main loop's SASS instruction mix (nvdisasm)."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptr = {"Q": "*fp16", "KP": "*u8", "VP": "*u8", "LEN": "*i32", "KBASIS": "*fp32", "KCS": "*fp32",
           "VCS": "*fp32", "KCB": "*fp32", "VCB": "*fp32", "QJLW": "*fp32", "OP": "*fp32", "LSE": "*fp32",
           "qk_scale": "fp32"}
    for bits in bits_list:
        codec = build_codec(None, bits=bits, method="turboquant", num_layers=1, num_kv_heads=H, head_dim=d)
        kl = PackedLayout.from_format(codec.format("key", 0))
        vl = PackedLayout.from_format(codec.format("value", 0))
        for vname in variants:
            kw = VARIANTS[vname]
            const = dict(HKV=H, G=Hq // H, BG=max(16, Hq // H), D=d, DP=d, K_BYTES=kl.row_bytes,
                         V_BYTES=vl.row_bytes, NSPLIT=kw.get("num_splits", splits), BLOCK_N=kw["block_n"],
                         **da.group_constexprs(kl, "K"), **da.group_constexprs(vl, "V"), QJL_M=0, QJL_MP=16,
                         QJL_OFF=0, QJL_NOFF=0, UNPACK=kw["unpack"], LOOKUP=kw["lookup"], DCH=32)
            sig = {n: "constexpr" if n in const else ptr.get(n, "i32") for n in da._decode_split_kernel.arg_names}
            opts = dict(num_warps=kw["num_warps"], num_stages=kw["num_stages"])
            if kw.get("maxnreg"):
                opts["maxnreg"] = kw["maxnreg"]
            ck = triton.compile(ASTSource(fn=da._decode_split_kernel, signature=sig, constexprs=const),
                                target=GPUTarget("cuda", 90, 32), options=opts)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(ck.asm["cubin"])
                res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", path], capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1].strip()
                sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", path], capture_output=True,
                                      text=True).stdout.splitlines()
            labels = {m.group(1): i for i, line in enumerate(sass) for m in [re.match(r"^\.(L_x_\d+):", line.strip())] if m}
            loop = (0, 0)
            for i, line in enumerate(sass):  # the longest backward branch encloses the token loop
                m = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", line)
                if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > loop[1] - loop[0]:
                    loop = (labels[m.group(1)], i)
            body = [line for line in sass[loop[0]:loop[1] + 1] if re.search(r"/\*[0-9a-f]{4}\*/", line)]
            mix: dict = {}
            for line in body:
                m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
                if m:
                    mix[m.group(1)] = mix.get(m.group(1), 0) + 1
            per_elem = len(body) * 32 * kw["num_warps"] / (kw["block_n"] * 2 * d)
            top = ", ".join(f"{k} {v}" for k, v in sorted(mix.items(), key=lambda x: -x[1])[:8])
            log(f"{bits:g} bits {vname:22s} {res}\n    loop: {len(body)} SASS/warp/block = {per_elem:.1f} "
                f"thread-instructions per K/V element; {top}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode_attention_results.json")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--bits", type=float, nargs="+", default=[4.25, 3.25, 2.69])
    ap.add_argument("--qjl", action="store_true", help="also run 3.25 bits with QJL on all key dims")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--tune", action="store_true", help="time every variant at the largest S, keep the best")
    ap.add_argument("--variant", default="bn64_l1_w4_r128_sp16", choices=sorted(VARIANTS))
    ap.add_argument("--splits", type=int, default=0)
    ap.add_argument("--naive-max-seq", type=int, default=65536)
    ap.add_argument("--asm-dir", default=None, help="write the decode kernel's TTGIR/PTX/SASS per format here")
    ap.add_argument("--offline-sass", nargs="*", default=None, metavar="VARIANT",
                    help="no GPU: compile VARIANTs (default: all) for sm_90 and print registers, spills and "
                         "the loop's SASS mix per K/V element, for --bits")
    args = ap.parse_args()
    if args.offline_sass is not None:
        offline_sass(args.bits, args.offline_sass or list(VARIANTS), H=args.kv_heads, Hq=args.heads, d=args.dim)
        return

    dev = torch.device("cuda")
    B, Hq, H, d = args.batch, args.heads, args.kv_heads, args.dim
    scale = 1 / math.sqrt(d)
    gen = torch.Generator(device=dev).manual_seed(0)
    props = torch.cuda.get_device_properties(dev)
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(sys.argv), B=B, Hq=Hq, Hkv=H, d=d)
    meta["copy_TBps"] = copy_bandwidth(dev)
    log(f"# {meta['device']} ({meta['sms']} SMs), torch {meta['torch']}, triton {meta['triton']}; "
        f"copy bandwidth {meta['copy_TBps']:.2f} TB/s (read+write)")

    setups = [Setup(b, H, d, dev) for b in args.bits]
    if args.qjl:
        setups.append(Setup(3.25, H, d, dev, qjl=True))
    rows, checks, tuning, resources = [], [], [], {}
    for st in setups:
        log(f"\n## {st.name} bits/elem budget: K {st.kfmt.describe()} | V {st.vfmt.describe()}")
        variant = VARIANTS[args.variant]
        best_name = args.variant
        for S in sorted(args.seq):
            kp, vp, k16, v16 = fill_cache(st, B, H, S, d, dev, gen)
            q = torch.randn(B, Hq, d, device=dev, generator=gen).half()
            lens = torch.full((B,), S, dtype=torch.int32, device=dev)
            lens_var = torch.randint(1, S + 1, (B,), device=dev, dtype=torch.int32)

            # ---- correctness first
            if S == min(args.seq):
                for name, L in (("full", lens), ("ragged", lens_var)):
                    ref = da.decode_attention_reference(q, kp, vp, L, scale=scale, **st.attn_args)
                    out = da.decode_attention_triton(q, kp, vp, L, scale=scale, poison=True, **variant,
                                                     **st.attn_args)
                    e = rel_err(out, ref)
                    checks.append(dict(bits=st.name, S=S, what=f"decode_attention {name}", rel_err=e,
                                       finite=bool(torch.isfinite(out).all())))
                    log(f"check decode_attention ({name} lengths) rel err {e:.2e}")
                    assert e < 1e-2 and torch.isfinite(out).all(), "fused kernel disagrees with the reference"
                n = 64
                kp_r, vp_r = kp[:, :, :n].clone(), vp[:, :, :n].clone()
                kp_t, vp_t = kp_r.clone(), vp_r.clone()
                pos = torch.arange(n, device=dev)
                qw.quantize_write_reference(k16[:, :, :n], v16[:, :, :n], kp_r, vp_r, pos, **st.write_args)
                qw.quantize_write_triton(k16[:, :, :n], v16[:, :, :n], kp_t, vp_t, pos, **st.write_args)
                kd = (kp_t != kp_r).any(-1).float().mean().item()
                vd = (vp_t != vp_r).any(-1).float().mean().item()
                checks.append(dict(bits=st.name, what="quantize_write rows differing", k=kd, v=vd))
                log(f"check quantize_write: rows differing from the reference K {kd:.4f} V {vd:.4f}")

            # ---- variants (once per format, at the largest S)
            if args.tune and S == max(args.seq):
                res = {}
                for vname, kw in VARIANTS.items():
                    try:
                        kw = dict(kw)
                        ns = kw.pop("num_splits", args.splits)
                        f = lambda: da.decode_attention_triton(q, kp, vp, lens, scale=scale, num_splits=ns,  # noqa: E731
                                                               **kw, **st.attn_args)
                        f()
                        torch.cuda.synchronize()
                        res[vname] = graph_us([f])
                        ck = da.LAST_COMPILED.get("decode_split")
                        tuning.append(dict(bits=st.name, S=S, variant=vname, us=res[vname],
                                           n_regs=getattr(ck, "n_regs", None), n_spills=getattr(ck, "n_spills", None)))
                        log(f"variant {vname:16s} {res[vname]:9.1f} us  regs {getattr(ck, 'n_regs', '?')} "
                            f"spills {getattr(ck, 'n_spills', '?')}")
                    except Exception as exc:  # a variant that fails to compile is reported, not fatal
                        log(f"variant {vname} failed: {type(exc).__name__}: {str(exc)[:200]}")
                best_name = min(res, key=res.get)
                variant = VARIANTS[best_name]
                log(f"best variant: {best_name}")

            # ---- timings
            vkw = dict(variant)
            nsplits = vkw.pop("num_splits", args.splits)

            def fused_on(kp_, vp_):
                return lambda: da.decode_attention_triton(q, kp_, vp_, lens, scale=scale, num_splits=nsplits,
                                                          **vkw, **st.attn_args)
            fused = fused_on(kp, vp)
            fused()
            ck = da.LAST_COMPILED.get("decode_split")
            resources[st.name] = dict(variant=best_name, n_regs=getattr(ck, "n_regs", None),
                                      n_spills=getattr(ck, "n_spills", None), shared=getattr(ck, "shared", None))
            if args.asm_dir and ck is not None and S == max(args.seq) and st.name in ("4.25", "2.69"):
                for kind in ("ttgir", "sass"):
                    try:
                        with open(f"{args.asm_dir}/decode_{st.name}.{kind}", "w") as f:
                            f.write(str(ck.asm[kind]))
                    except Exception as exc:
                        log(f"asm {kind}: {exc}")
            q4 = q[:, :, None]
            t_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q4, k16, v16, scale=scale, enable_gqa=True), warmup=25, rep=200, return_mode="median") * 1e3
            t_fused_eager = do_bench(fused, warmup=25, rep=200, return_mode="median") * 1e3
            t_sdpa_eager = t_sdpa
            # graph timings; a cache smaller than 3x the L2 is copied so back-to-back calls read HBM
            n_copies = max(1, min(8, math.ceil(3 * props.L2_cache_size / (B * H * S * (st.k_bytes + st.v_bytes)))))
            copies = [(kp, vp)] + [(kp.clone(), vp.clone()) for _ in range(n_copies - 1)]
            t_fused = graph_us([fused_on(a, b) for a, b in copies])
            del copies
            t_sdpa = graph_us([lambda: torch.nn.functional.scaled_dot_product_attention(
                q4, k16, v16, scale=scale, enable_gqa=True)])
            t_naive = None
            if S <= args.naive_max_seq:
                try:
                    t_naive = do_bench(lambda: naive_dequant_sdpa(st, q, kp, vp, scale), warmup=2, rep=50,
                                       return_mode="median") * 1e3
                except torch.OutOfMemoryError:
                    t_naive = None
            bytes_fp16 = 2 * B * H * S * d * 2
            bytes_fused = B * H * S * (st.k_bytes + st.v_bytes)
            for impl, t, nbytes in (("fp16_sdpa", t_sdpa, bytes_fp16), ("naive_dequant_sdpa", t_naive, None),
                                    ("sqcompile_fused", t_fused, bytes_fused)):
                if t is None:
                    continue
                row = dict(bits=st.name, bits_per_element=st.bits_per_element, S=S, impl=impl, us=t,
                           us_eager={"fp16_sdpa": t_sdpa_eager, "sqcompile_fused": t_fused_eager}.get(impl, t),
                           speedup_vs_fp16=t_sdpa / t, bytes_read=nbytes,
                           TBps=(nbytes / (t * 1e-6) / 1e12) if nbytes else None,
                           variant=best_name if impl == "sqcompile_fused" else None)
                rows.append(row)
                log(f"S={S:6d} {impl:20s} {t:10.1f} us  x{t_sdpa / t:5.2f} vs fp16"
                    + (f"  {nbytes / 1e6:8.1f} MB  {row['TBps']:.2f} TB/s" if nbytes else ""))

            # ---- quantize_write: one decode step (T_new = 1) of one layer, B = 8, vs one attention call
            if S == min(args.seq):
                kn = torch.randn(B, H, 1, d, device=dev, generator=gen).half()
                vn = torch.randn(B, H, 1, d, device=dev, generator=gen).half()
                pos = torch.tensor([S - 1], device=dev)
                kp2, vp2 = kp.clone(), vp.clone()
                wr = lambda: qw.quantize_write_triton(kn, vn, kp2, vp2, pos, check=False, **st.write_args)  # noqa: E731
                wr()
                t_w = do_bench(wr, warmup=25, rep=200, return_mode="median") * 1e3
                try:
                    t_w_graph = graph_us([wr])
                    t_a_graph = t_fused
                except Exception as exc:
                    log(f"cuda graph timing failed: {exc}")
                    t_w_graph = t_a_graph = None
                ckw = qw.LAST_COMPILED.get("quantize_write")
                rows.append(dict(bits=st.name, S=S, impl="quantize_write_step", us=t_w, us_cudagraph=t_w_graph,
                                 attention_us=t_fused_eager, attention_us_cudagraph=t_a_graph,
                                 ratio=t_w / t_fused_eager,
                                 ratio_cudagraph=(t_w_graph / t_a_graph) if t_w_graph else None,
                                 n_regs=getattr(ckw, "n_regs", None), n_spills=getattr(ckw, "n_spills", None)))
                log(f"quantize_write step: eager {t_w:.1f} us vs attention {t_fused_eager:.1f} us; graphs "
                    f"{t_w_graph} us vs {t_a_graph} us: ratio {rows[-1]['ratio_cudagraph']}")
            del kp, vp, k16, v16
            torch.cuda.empty_cache()

    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, checks=checks, tuning=tuning, resources=resources, rows=rows), f, indent=1)

    log(f"\n# {meta['device']}, copy {meta['copy_TBps']:.2f} TB/s, B={B} Hq={Hq} Hkv={H} d={d}")
    log(f"{'bits':>8} {'b/elem':>6} {'S':>6} {'impl':>20} {'us':>9} {'x fp16':>7} {'TB/s':>6} {'%copy':>6}")
    for r in rows:
        if r["impl"] == "quantize_write_step":
            rg = r["ratio_cudagraph"]
            log(f"{r['bits']:>8} {'':>6} {r['S']:>6} {'quantize_write':>20} {r['us_cudagraph'] or float('nan'):9.1f} "
                f"{'':>7} = {rg if rg is None else f'{rg:.1%}'} of one decode-attention call (graphs)")
            continue
        tb = f"{r['TBps']:6.2f} {100 * r['TBps'] / meta['copy_TBps']:5.0f}%" if r["TBps"] else ""
        log(f"{r['bits']:>8} {r['bits_per_element']:6.3f} {r['S']:>6} {r['impl']:>20} {r['us']:9.1f} "
            f"{r['speedup_vs_fp16']:7.2f} {tb}")
    log(f"resources: {resources}")


if __name__ == "__main__":
    main()
