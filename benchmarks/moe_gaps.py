"""Where the fused MoE op's time goes at one shape (GPU): kernel time against the timed loop's wall time.

For the op's prefill tiers under torch.compile (x by TMA from a block-ordered copy, x gathered in the kernel,
both GEMMs by CUTLASS) and HF's block under torch.compile, on the same inputs as moe_tune.py:

- host syncs: one call under `torch.cuda.set_sync_debug_mode("warn")` (count and first messages; where there are
  any, the traceback of the first under "error");
- host time: how long ten calls take to enqueue, against their wall time back to back (a sync shows as enqueue
  time close to the wall time);
- the interleaved rounds of moe_before_after.py (`triton.testing.do_bench`, L2 flushed before each call);
- a profile of the same loop (flush, marker, call, marker; CUDA activity only): per call the span between the
  markers, the sum of the kernels inside and the largest idle gaps between them;
- each call alone after 0.25 s idle (GPU busy with a spin kernel while the call is enqueued): clocks unthrottled.

Log clocks beside it (`nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv -lms 100`); the JSON has
each phase's wall-clock start for lining them up.

    PYTHONPATH=$PWD python3 benchmarks/moe_gaps.py --shape mixtral --tokens 4096 --out gaps.json --trace-dir .
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import torch

from moe import SHAPES, make_block
from moe_tune import compiled_with, inputs, interleaved_medians

from sqcompile.kernels import fused_moe as fm


def sync_check(fn) -> dict:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    msgs = [str(w.message)[:300] for w in caught if "synchroniz" in str(w.message).lower()]
    out = {"count": len(msgs), "first": msgs[:3]}
    if msgs:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except Exception:  # noqa: BLE001 - the traceback is the result
            out["traceback"] = traceback.format_exc()[-3000:]
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    return out


def host_timing(fn, n: int = 10) -> dict:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"enqueue_us": round((t1 - t0) / n * 1e6, 1), "wall_us_back_to_back": round((t2 - t0) / n * 1e6, 1)}


def idle_first_us(fn, n: int = 5, idle_s: float = 0.25) -> dict:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        time.sleep(idle_s)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # ~0.5 ms of spin: the call is enqueued before the GPU reaches it
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return {"us": round(sorted(times)[n // 2], 1), "us_all": [round(t, 1) for t in times]}


def traced_loop(fn, path: str, iters: int = 6) -> dict:
    """The timed loop under the profiler: per call the span between two spin-kernel markers, its kernels' sum and
    the largest gaps (us)."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            torch.cuda._sleep(1000)
            fn()
            torch.cuda._sleep(1000)
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e),
                 key=lambda e: e["ts"])
    marks = [i for i, e in enumerate(gpu) if "spin_kernel" in e["name"]]
    calls = []
    for a, b in zip(marks[0::2], marks[1::2]):
        inner = gpu[a + 1:b]
        prev_end, prev_name, gaps = gpu[a]["ts"] + gpu[a]["dur"], "marker", []
        start = prev_end
        for e in inner:
            gaps.append([round(e["ts"] - prev_end, 1), prev_name[:40], e["name"][:40]])
            prev_end, prev_name = e["ts"] + e["dur"], e["name"]
        gaps.append([round(gpu[b]["ts"] - prev_end, 1), prev_name[:40], "marker"])
        calls.append({"span_us": round(gpu[b]["ts"] - start, 1),
                      "kernel_sum_us": round(sum(e["dur"] for e in inner), 1),
                      "kernels": len(inner), "gap_sum_us": round(sum(g[0] for g in gaps), 1),
                      "top_gaps": sorted(gaps, reverse=True)[:4],
                      "longest": sorted(([e["name"][:50], round(e["dur"], 1)] for e in inner),
                                        key=lambda v: -v[1])[:4]})
    return {"calls": calls}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="moe_gaps.json")
    ap.add_argument("--trace-dir", default="", help="keep the traces of the op's default tier and HF's block here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/moe_gaps.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch._dynamo.config.cache_size_limit = 64
    torch._inductor.config.fx_graph_cache = False  # the tier is read while tracing
    torch._functorch.config.enable_autograd_cache = False
    shape = SHAPES[args.shape]
    k, renormalize = shape["top_k"], shape["renormalize"]
    E, H, inter = shape["experts"], shape["hidden"], shape["ffn"]
    x, logits, w1, w2 = inputs(shape, args.tokens, torch.bfloat16, "cuda")
    base = fm.device_config(args.tokens * k, E, H, inter, x.device, x.dtype)
    cfgs = {"default": base, "x_gathered": dict(base, X_SORTED=False), "both": dict(base, GROUPED_MM="both")}
    phases = {"start": time.time()}
    fns = {}
    for tag, cfg in cfgs.items():
        fns[f"ours_{tag}_inductor"] = compiled_with(cfg, f"{args.shape}_{args.tokens}_{tag}", x, logits, w1, w2, k,
                                                    renormalize)
    block = make_block(args.shape, shape, torch.bfloat16, "cuda", impl="grouped_mm")
    hf_c = torch.compile(block, dynamic=False)
    x3 = x[None]
    with torch.no_grad():
        hf_c(x3)
    fns["hf_inductor"] = lambda: hf_c(x3)
    phases["compiled"] = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
              "tokens": args.tokens, "config": {k_: str(v) for k_, v in base.items()}, "rows": {}}
    with torch.no_grad():
        ref = fm.fused_moe_reference(x, logits, w1, w2, k, renormalize).float()
        for row, fn in fns.items():
            if row.startswith("ours"):
                err = float((fn().float() - ref).norm() / ref.norm())
                print(f"{row} vs reference {err:.3g}", flush=True)
                result["rows"].setdefault(row, {})["rel_err"] = err
        for row, fn in fns.items():
            r = result["rows"].setdefault(row, {})
            r["sync"] = sync_check(fn)
            r["host"] = host_timing(fn)
            print(f"{row:24s} syncs {r['sync']['count']}  host {r['host']}", flush=True)
        phases["rounds"] = time.time()
        timed = interleaved_medians(fns, args.rounds)
        phases["traces"] = time.time()
        for row, fn in fns.items():
            r = result["rows"][row]
            r.update(timed[row])
            keep = args.trace_dir and row in ("ours_default_inductor", "hf_inductor")
            path = os.path.join(args.trace_dir, f"trace_{row}.json") if keep else f"/tmp/trace_{row}.json"
            r["traced"] = traced_loop(fn, path)
        phases["idle_first"] = time.time()
        for row, fn in fns.items():
            result["rows"][row]["idle_first"] = idle_first_us(fn)
        phases["end"] = time.time()
    result["phases"] = phases
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'row':24s} {'timed us':>9s} {'rounds min-max':>16s} {'trace span':>10s} {'kernels':>8s} {'gaps':>7s} "
          f"{'idle-first':>10s} {'b2b wall':>8s} {'enqueue':>8s} syncs")
    for row, r in result["rows"].items():
        calls = r["traced"]["calls"]
        med = lambda key: sorted(c[key] for c in calls)[len(calls) // 2] if calls else float("nan")  # noqa: E731
        print(f"{row:24s} {r['us']:9.1f} {min(r['us_rounds']):7.1f}-{max(r['us_rounds']):<8.1f} "
              f"{med('span_us'):10.1f} {med('kernel_sum_us'):8.1f} {med('gap_sum_us'):7.1f} "
              f"{r['idle_first']['us']:10.1f} {r['host']['wall_us_back_to_back']:8.1f} {r['host']['enqueue_us']:8.1f} "
              f"{r['sync']['count']}")
        if calls:
            print(f"    gaps {calls[len(calls) // 2]['top_gaps']}\n    longest {calls[len(calls) // 2]['longest']}")
        print(f"    kernels (profiler, back to back) {r['kernels_us']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
