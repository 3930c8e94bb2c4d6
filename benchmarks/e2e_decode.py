"""End-to-end decode throughput of a Llama-3-8B-shaped model (random weights, bf16) on one GPU (issue #6).

Rows, at each (context, batch): eager HF with DynamicCache; torch.compile (Inductor) with StaticCache;
sqcompile (backend="spectralquant" + SpectralCache, fused decode attention). The caches are filled with
`context` tokens of random K/V (speed does not depend on their values), then `--steps` greedy decode steps
are timed with CUDA events, one event pair per step; the table reports the median step. Also: compile time
(first call minus a steady call) for Inductor vs sqcompile, and the largest context that fits a fixed KV
memory budget for FP16 vs sqcompile (from the exact bytes per token, checked by allocating one cache).

    python benchmarks/e2e_decode.py --out e2e.json [--layers 32] [--contexts 4096 32768] [--batches 1 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sqcompile.calibrate import cache_kwarg
from sqcompile.kernels.sink import OUTLIER_TOKENS

DEV = "cuda"
HIDDEN, FFN, HEADS, VOCAB = 4096, 14336, 32, 128256


def build_model(layers: int, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=DEV).to(dtype)
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(1.0)
        model.model.rotary_emb.inv_freq.copy_(
            1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=DEV, dtype=torch.float32) / 128)))
    return model.eval()


def fill_dynamic(model, batch, ctx):
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    for l in range(cfg.num_hidden_layers):
        k = torch.randn(batch, 8, ctx, 128, device=DEV, dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), l)
    return cache


def fill_static(model, batch, ctx, steps):
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=ctx + steps + 8)
    for l in range(cfg.num_hidden_layers):
        k = torch.randn(batch, 8, ctx, 128, device=DEV, dtype=torch.bfloat16)
        cache.layers[l].update(k, torch.randn_like(k))
    return cache


def row_name(layout: str, sink: str, outliers: int, all_outliers: list) -> str:
    return (("sqcompile" if layout == "planes" else f"sqcompile_{layout}") + ("" if sink == "on" else "_nosink")
            + ("" if outliers == all_outliers[0] else f"_out{outliers}"))


def fill_spectral(model, batch, ctx, steps, bits, layout="planes", keep_sink=True, outlier_tokens=None):
    from sqcompile.cache import SpectralCache

    extra = {} if outlier_tokens is None else dict(outlier_tokens=outlier_tokens)
    cache = SpectralCache(model, bits=bits, max_cache_len=ctx + steps + 8, layout=layout, keep_sink=keep_sink, **extra)
    chunk = 4096
    for l, layer in enumerate(cache.layers):
        k0 = torch.zeros(batch, 8, 1, 128, device=DEV, dtype=torch.bfloat16)
        layer.lazy_initialization(k0, k0)
        for s in range(0, ctx, chunk):
            n = min(chunk, ctx - s)
            k = torch.randn(batch, 8, n, 128, device=DEV, dtype=torch.float32)
            v = torch.randn_like(k)
            pos = torch.arange(s, s + n, device=DEV)
            if layer.fast:
                torch.ops.sqcompile.quantize_write_fast(k, v, layer.keys, layer.values, pos, layer.k_basis, layer.k_mean,
                                                        layer.k_layout, layer.v_layout)
                continue
            torch.ops.sqcompile.quantize_write(k, v, layer.keys, layer.values, pos, layer.k_basis, layer.k_mean,
                                               layer.k_codebooks, layer.k_channel_scale, layer.v_codebooks,
                                               layer.v_channel_scale, layer.k_qjl_proj, layer.k_groups, layer.v_groups,
                                               layer.qjl_dims, layer.qjl_bits)
        layer.cumulative_length.fill_(ctx)
        if layer.slots:  # exact tokens as a prompt would leave them: the sink at 0, outliers spread over the context
            layer.sink_k.normal_(), layer.sink_v.normal_()
            layer.sink_pos.copy_(torch.linspace(0, ctx - 1, layer.slots, device=DEV).long()[None].expand(batch, -1))
            layer.sink_crit.fill_(0.0)  # decode steps' keys replace them: the selection runs as in a real run
    return cache


def _cuda_calls() -> int:
    from sqcompile.kernels import decode_attention_cuda as dc
    return dc.STATS["calls"]


def profile_steps(label, step_fn, cache, batch, n=3, top=12):
    """Device time per decode step by kernel (torch.profiler over n steps), the top entries."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randint(0, min(1000, VOCAB), (batch, 1), device=DEV)
    kv = {cache_kwarg(step_fn): cache}
    if DEV != "cuda":
        print(f"--- {label}: --profile-step times CUDA kernels; skipped on {DEV}")
        return
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step_fn(input_ids=x, use_cache=True, **kv)
        torch.cuda.synchronize()
    tot: dict = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            tot[e.name] = tot.get(e.name, 0.0) + e.device_time / n
    print(f"--- {label}: device us per step, all kernels {sum(tot.values()):.0f}")
    for name, us in sorted(tot.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us:9.1f}  {name[:110]}")


def time_decode(step_fn, cache, batch, steps, warmup=2, profile=None):
    """Median time of one decode step (ms) and the time of the very first call (s, includes compilation);
    `profile`: a label, to cProfile the first call and print its top functions by cumulative time."""
    x = torch.randint(0, min(1000, VOCAB), (batch, 1), device=DEV)
    kv = {cache_kwarg(step_fn): cache}
    times = []
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    with torch.no_grad():
        step_fn(input_ids=x, use_cache=True, **kv)
        if DEV == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        if prof is not None:
            import pstats
            prof.disable()
            print(f"--- first call of {profile}: {first:.1f} s")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(r"sqcompile|compile_fx|codecache|nvrtc|autotune|"
                                                                    r"cudagraph|fx_passes|graph_lowering|scheduler", 25)
        for i in range(warmup + steps):
            if DEV == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
            t1 = time.perf_counter()
            logits = step_fn(input_ids=x, use_cache=True, **kv).logits
            if DEV == "cuda":
                e.record()
                torch.cuda.synchronize()
            x = logits[:, -1:].argmax(-1)
            if i >= warmup:
                times.append(s.elapsed_time(e) if DEV == "cuda" else 1000 * (time.perf_counter() - t1))
    return statistics.median(times), first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--bits", type=float, default=2.69)
    ap.add_argument("--budget-gb", type=float, default=40.0, help="KV memory budget for the max-context row")
    ap.add_argument("--rows", default="eager,inductor,sqcompile")
    ap.add_argument("--layouts", nargs="+", default=["planes", "fast"], choices=["planes", "fast"],
                    help="SpectralCache layouts timed as sqcompile rows (planes: decode_attention; fast: decode_attention_fast)")
    ap.add_argument("--out", default="e2e_decode.json")
    ap.add_argument("--sink", nargs="+", default=["on"], choices=["on", "off"],
                    help="SpectralCache(keep_sink=...): 'on off' times both (the off rows get a _nosink suffix)")
    ap.add_argument("--outliers", nargs="+", type=int, default=[OUTLIER_TOKENS],
                    help="SpectralCache(outlier_tokens=...): rows after the first get an _out<N> suffix")
    ap.add_argument("--profile-compile", action="store_true",
                    help="cProfile each row's first call (compilation) and print its top functions")
    ap.add_argument("--profile-step", action="store_true",
                    help="torch.profiler over 3 decode steps of each row after its timing: top CUDA kernels")
    ap.add_argument("--cudagraphs", action="store_true",
                    help="both compiled rows as CUDA graphs (Inductor mode='reduce-overhead'; sqcompile "
                         "options={'cudagraphs': True}): no per-kernel host time")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of the script itself (tiny model, no timing value)")
    args = ap.parse_args()
    global DEV, HIDDEN, FFN, HEADS, VOCAB
    if args.tiny:
        DEV, HIDDEN, FFN, HEADS, VOCAB = "cpu", 1024, 256, 8, 512
        args.budget_gb = min(args.budget_gb, 0.05)  # the max-context row allocates its cache: keep it small on a CPU

    import sqcompile
    from sqcompile.cache import SpectralCache

    torch.manual_seed(0)
    model = build_model(args.layers)
    fwd = model.forward
    results = []
    for knob in ("cache_size_limit", "recompile_limit"):  # one graph per (context, batch, layout): no eager fallback
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    # dynamic=False: every (context, batch) row gets its own static-shape graph, on both sides. With the default,
    # dynamo recompiles a function with dynamic shapes once it has seen a second shape, so the later rows of a
    # run measured dynamic-shape graphs (4K batch 1 as the fourth row: 8.9 ms per step on an H100; alone, 4.3 ms on
    # an H200).
    inductor = (torch.compile(fwd, mode="reduce-overhead", dynamic=False) if args.cudagraphs
                else torch.compile(fwd, dynamic=False))
    sqs = {lay: torch.compile(fwd, backend=sqcompile.spectralquant, dynamic=False,
                              options={"bits": args.bits, "moe": False, "cudagraphs": args.cudagraphs})
           for lay in args.layouts}
    compile_times = {}
    rows = args.rows.split(",")
    for ctx in args.contexts:
        for b in args.batches:
            row = {"context": ctx, "batch": b}
            if "eager" in rows:
                cache = fill_dynamic(model, b, ctx)
                row["eager_ms"], _ = time_decode(fwd, cache, b, args.steps)
                del cache
            if "inductor" in rows:
                cache = fill_static(model, b, ctx, args.steps + 3)
                row["inductor_ms"], first = time_decode(inductor, cache, b, args.steps, profile=(
                    "inductor" if args.profile_compile and "inductor" not in compile_times else None))
                if args.profile_step:
                    profile_steps(f"inductor {ctx} x {b}", inductor, cache, b)
                compile_times.setdefault("inductor", first)
                del cache
            names = []
            if "sqcompile" in rows:
                for lay, sink, out in ((lay, sink, out) for lay in args.layouts for sink in args.sink
                                       for out in args.outliers):
                    name = row_name(lay, sink, out, args.outliers)
                    names.append(name)
                    cache = fill_spectral(model, b, ctx, args.steps + 3, args.bits, lay, keep_sink=sink == "on",
                                          outlier_tokens=out)
                    calls0 = _cuda_calls()
                    row[f"{name}_ms"], first = time_decode(sqs[lay], cache, b, args.steps, profile=(
                        name if args.profile_compile and name not in compile_times else None))
                    if args.profile_step:
                        profile_steps(f"{name} {ctx} x {b}", sqs[lay], cache, b)
                    if lay == "fast":  # which decode kernel ran: the CUDA one counts its launches
                        row[f"{name}_cuda_kernel_launches"] = _cuda_calls() - calls0
                    compile_times.setdefault(name, first)
                    del cache
            torch.cuda.empty_cache() if DEV == "cuda" else None
            for k in ["eager", "inductor"] + names:
                if f"{k}_ms" in row:
                    row[f"{k}_tok_s"] = b * 1000.0 / row[f"{k}_ms"]
            results.append(row)
            print(json.dumps(row), flush=True)

    # largest context in a fixed KV budget: exact bytes per token, checked by allocating one SpectralCache
    probe = SpectralCache(model, bits=args.bits, max_cache_len=1024, layout=args.layouts[0])
    sq_bpt = probe.packed_bytes_per_token()
    fp16_bpt = model.config.num_hidden_layers * 8 * 128 * 2 * 2
    budget = args.budget_gb * 2**30
    max_ctx = {"fp16": int(budget // fp16_bpt), "sqcompile": int(budget // sq_bpt)}
    check = SpectralCache(model, bits=args.bits, max_cache_len=max_ctx["sqcompile"], layout=args.layouts[0])
    k0 = torch.zeros(1, 8, 1, 128, device=DEV, dtype=torch.bfloat16)
    for layer in check.layers:  # allocate every layer's packed buffers (no forward: eager would dequantize all)
        layer.lazy_initialization(k0, k0)
    max_ctx["sqcompile_allocated_gb"] = check.nbytes / 2**30
    del check
    summary = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__, "layers": args.layers,
               "bits": args.bits, "rows": results, "compile_s": compile_times, "max_context": max_ctx,
               "bytes_per_token": {"fp16": fp16_bpt, "sqcompile": sq_bpt}}
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{summary['device']}, Llama-3-8B shape ({args.layers} layers, random bf16 weights), sqcompile at "
          f"{args.bits} bits/element ({16 / args.bits:.2f}x)")
    names = [row_name(lay, sink, out, args.outliers) for lay in args.layouts for sink in args.sink
             for out in args.outliers]
    print("| context | batch | eager tok/s | Inductor+StaticCache tok/s | "
          + " | ".join(f"{n} tok/s | {n} / Inductor" for n in names) + " |")
    print("|---|---|---|---|" + "---|---|" * len(names))
    nan = float("nan")
    for r in results:
        cells = []
        for n in names:
            ratio = r.get(f"{n}_tok_s", 0) / r["inductor_tok_s"] if "inductor_tok_s" in r else nan
            cells.append(f"{r.get(f'{n}_tok_s', nan):.1f} | {ratio:.2f}x")
        print(f"| {r['context']} | {r['batch']} | {r.get('eager_tok_s', nan):.1f} | "
              f"{r.get('inductor_tok_s', nan):.1f} | " + " | ".join(cells) + " |")
    ct = compile_times
    for n in names:
        print(f"first call (compile) s: Inductor {ct.get('inductor', nan):.1f}, {n} "
              f"{ct.get(n, nan):.1f} (ratio {ct.get(n, 0) / max(ct.get('inductor', 1e-9), 1e-9):.2f}x)")
    print(f"max context in {args.budget_gb} GB of KV: FP16 {max_ctx['fp16']}, sqcompile {max_ctx['sqcompile']} "
          f"({max_ctx['sqcompile'] / max_ctx['fp16']:.2f}x); allocated {max_ctx['sqcompile_allocated_gb']:.2f} GB")


if __name__ == "__main__":
    main()
