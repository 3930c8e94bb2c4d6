"""Where the wall time of one CUDA-graph decode step goes (GPU script; issue: the e2e step's non-kernel time).

For the rows of `e2e_decode.py --cudagraphs` (Inductor + StaticCache; sqcompile + SpectralCache) and one more,
`sqcompile_nonstatic` (the same SpectralCache with its per-layer constants -- bases, means -- replaced by copies
without a static address: what every SpectralCache did before they were marked static), at each (context, batch):

1. wall per step, as `e2e_decode.time_decode` times it (a CUDA event pair around the call, synchronized after each
   step), median; and the host time of the call alone (perf_counter from the call to its return);
2. torch.profiler (CPU and CUDA activity) over a few steps, one `record_function` range each: per step the device
   time of all kernels and copies, their count, the span from the first one's start to the last one's end (its
   idle part: gaps between kernels inside the graph), the lead from the step's entry on the host to the first
   kernel on the device (host work before the graph launch, and the launch), and the launches: CUDA graphs, and
   kernels or copies launched outside a graph.

Correctness first: the first step's logits of `sqcompile` and `sqcompile_nonstatic`, on caches filled from one
seed, must agree (the static addresses change no arithmetic).

    PYTHONPATH=$PWD python3 benchmarks/e2e_step_gaps.py --layers 8 --contexts 32768 4096 --batches 8 1 --out gaps.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import e2e_decode as E  # noqa: E402

from sqcompile.cache import SpectralLayer  # noqa: E402


def unstatic(cache) -> None:
    """The pre-fix SpectralCache: each layer's constants as fresh copies, which carry no static-address mark."""
    for layer in cache.layers:
        for name in SpectralLayer.CONSTANTS:
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                setattr(layer, name, t.clone())


def host_and_wall(step_fn, cache, batch, steps, warmup=3):
    """(median wall ms by CUDA events, median host ms of the call alone, last logits)."""
    x = torch.randint(0, min(1000, E.VOCAB), (batch, 1), device=E.DEV)
    walls, hosts = [], []
    with torch.no_grad():
        for i in range(warmup + steps):
            if E.DEV == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
            t0 = time.perf_counter()
            logits = step_fn(input_ids=x, past_key_values=cache, use_cache=True).logits
            t1 = time.perf_counter()
            if E.DEV == "cuda":
                e.record()
                torch.cuda.synchronize()
            if i >= warmup:
                hosts.append(1e3 * (t1 - t0))
                walls.append(s.elapsed_time(e) if E.DEV == "cuda" else 1e3 * (time.perf_counter() - t0))
            x = logits[:, -1:].argmax(-1)
    return statistics.median(walls), statistics.median(hosts)


def pipelined(step_fn, cache, batch, steps) -> float:
    """ms per step of `steps` decode steps issued back to back (the next input is the argmax on the device; one
    event pair and one synchronization around them all): the host prepares step i+1 while the GPU runs step i, as a
    generation loop that does not synchronize every step would."""
    x = torch.randint(0, min(1000, E.VOCAB), (batch, 1), device=E.DEV)
    with torch.no_grad():
        if E.DEV != "cuda":
            return float("nan")
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(steps):
            x = step_fn(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        e.record()
        torch.cuda.synchronize()
    return s.elapsed_time(e) / steps


def profile_gaps(step_fn, cache, batch, n=4, trace=None) -> dict:
    """Medians over steps 1..n-1 of n profiled steps (synchronized after each, as `host_and_wall`), read from the
    chrome trace (`trace`: keep it at that path): the host's time from the step's entry to its cudaGraphLaunch
    call and that call's own time; the graph's kernels and copies (those after the launch): their count, the time
    from the launch call's start to the first one, their span and the idle time inside it."""
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    if E.DEV != "cuda":
        return {}
    x = torch.randint(0, min(1000, E.VOCAB), (batch, 1), device=E.DEV)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            with record_function(f"decode_step_{i}"):
                logits = step_fn(input_ids=x, past_key_values=cache, use_cache=True).logits
            torch.cuda.synchronize()
            x = logits[:, -1:].argmax(-1)
    path = trace or tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    if not trace:
        os.remove(path)
    return gaps_from_trace(ev)


def gaps_from_trace(ev: list) -> dict:
    """`profile_gaps`' medians from a chrome trace's events (steps after the first)."""
    steps = sorted((e for e in ev if e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    dev = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = sorted((e for e in ev if e.get("cat") == "cuda_runtime" and e["name"] == "cudaGraphLaunch"),
                      key=lambda e: e["ts"])
    per = []
    for i, st in enumerate(steps[1:], 1):
        a = st["ts"]
        nxt = steps[i + 1]["ts"] if i + 1 < len(steps) else float("inf")
        gl = [e for e in launches if a <= e["ts"] < nxt]
        if not gl:
            continue
        g = gl[0]
        ops = [e for e in dev if g["ts"] <= e["ts"] < nxt and e["ts"] <= g["ts"] + g["dur"] + 1e6]
        ops = [e for e in ops if e["name"].find("ArgMax") < 0]  # the harness's argmax after the step
        busy, end = 0.0, None  # union of the device intervals
        for e in ops:
            s0, t0 = e["ts"], e["ts"] + e["dur"]
            if end is None or s0 >= end:
                busy, end = busy + t0 - s0, t0
            elif t0 > end:
                busy, end = busy + t0 - end, t0
        span = ops[-1]["ts"] + ops[-1]["dur"] - ops[0]["ts"]
        per.append({"entry_to_graph_launch_us": g["ts"] - a, "graph_launch_call_us": g["dur"],
                    "launch_to_first_kernel_us": ops[0]["ts"] - g["ts"], "graph_ops": len(ops),
                    "graph_span_us": span, "graph_busy_us": busy, "graph_idle_us": span - busy,
                    "graph_launches": len(gl)})
    return {k: statistics.median(p[k] for p in per) for k in per[0]} if per else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bits", type=float, default=2.69)
    ap.add_argument("--rows", default="inductor,sqcompile,sqcompile_nonstatic")
    ap.add_argument("--out", default="e2e_step_gaps.json")
    ap.add_argument("--trace-dir", default=None, help="write one chrome trace per row and shape here")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of the script itself (no timing value)")
    args = ap.parse_args()
    if args.tiny:
        E.DEV, E.HIDDEN, E.FFN, E.HEADS, E.VOCAB = "cpu", 1024, 256, 8, 512
    import sqcompile

    cudagraphs = E.DEV == "cuda"
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    torch.manual_seed(0)
    model = E.build_model(args.layers)
    fwd = model.forward
    rows = args.rows.split(",")
    lower = "inductor" if not args.tiny else "eager"
    inductor = torch.compile(fwd, mode="reduce-overhead", dynamic=False) if cudagraphs else \
        torch.compile(fwd, backend="eager", dynamic=False)
    sq = torch.compile(fwd, backend=sqcompile.spectralquant, dynamic=False,
                       options={"bits": args.bits, "moe": False, "cudagraphs": cudagraphs, "lower": lower})
    results = []
    room = 2 * args.steps + 16  # the first call, warm-up, timed, pipelined and profiled steps all write the cache
    for ctx in args.contexts:
        for b in args.batches:
            first_logits = {}
            for name in rows:
                if name == "inductor":
                    cache, fn = E.fill_static(model, b, ctx, room), inductor
                else:
                    torch.manual_seed(1)
                    cache, fn = E.fill_spectral(model, b, ctx, room, args.bits, "fast"), sq
                    if name == "sqcompile_nonstatic":
                        unstatic(cache)
                    with torch.no_grad():  # the first step (compiles; the correctness check reads it)
                        torch.manual_seed(2)
                        x = torch.randint(0, min(1000, E.VOCAB), (b, 1), device=E.DEV)
                        first_logits[name] = fn(input_ids=x, past_key_values=cache, use_cache=True).logits.float().clone()
                wall, host = host_and_wall(fn, cache, b, args.steps)
                trace = f"{args.trace_dir}/trace_{name}_{ctx}_{b}.json" if args.trace_dir else None
                row = {"context": ctx, "batch": b, "row": name, "wall_ms": wall, "host_call_ms": host,
                       "pipelined_ms": pipelined(fn, cache, b, args.steps), **profile_gaps(fn, cache, b, trace=trace)}
                results.append(row)
                print(json.dumps(row), flush=True)
                del cache
                if E.DEV == "cuda":
                    torch.cuda.empty_cache()
            if len(first_logits) == 2:
                a, c = first_logits["sqcompile"], first_logits["sqcompile_nonstatic"]
                rel = ((a - c).norm() / c.norm()).item()
                ok = rel < 1e-2 and bool(torch.isfinite(a).all())
                print(f"CHECK {ctx} x {b}: first-step logits, static vs non-static constants: rel {rel:.2e} "
                      f"{'OK' if ok else 'FAIL'}", flush=True)
                results.append({"context": ctx, "batch": b, "check_rel": rel, "ok": ok})
    dev = torch.cuda.get_device_name() if E.DEV == "cuda" else "cpu"
    with open(args.out, "w") as f:
        json.dump({"device": dev, "torch": torch.__version__, "layers": args.layers, "bits": args.bits,
                   "rows": results}, f, indent=1)
    print(f"\n{dev}, torch {torch.__version__}, {args.layers} layers of Llama-3-8B shape, CUDA graphs: {cudagraphs}")
    print("| context | batch | row | wall ms (synced) | tok/s | pipelined ms | tok/s | host call ms | entry to "
          "graph launch us | launch call us | graph span ms | graph busy ms | graph ops |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in results:
        if "row" in r:
            print(f"| {r['context']} | {r['batch']} | {r['row']} | {r['wall_ms']:.3f} | {r['batch'] * 1e3 / r['wall_ms']:.1f} | "
                  f"{r['pipelined_ms']:.3f} | {r['batch'] * 1e3 / r['pipelined_ms']:.1f} | {r['host_call_ms']:.3f} | "
                  f"{r.get('entry_to_graph_launch_us', nan):.0f} | {r.get('graph_launch_call_us', nan):.0f} | "
                  f"{r.get('graph_span_us', nan) / 1e3:.3f} | {r.get('graph_busy_us', nan) / 1e3:.3f} | "
                  f"{r.get('graph_ops', nan):.0f} |")

if __name__ == "__main__":
    main()
