"""Fused MoE benchmark (GPU): HF MoE blocks vs torch._grouped_mm vs sqcompile's fused Triton op.

Shapes: Mixtral (8 experts, top-2, hidden 4096, FFN 14336) and Qwen-MoE (64 experts, top-8, hidden 2048,
FFN 1408), bf16, T in {1, 16, 256, 4096} tokens, balanced routing and skewed routing (90% of tokens to
one expert). For each case the fused op is first checked against the HF block, then every row is timed
with the median of `triton.testing.do_bench`. Weight bandwidth = bytes of the experts actually used
(3 * H * FFN * 2 bytes each) / time. Prints a table last; writes JSON to --out.

    python benchmarks/moe.py --out moe.json            # full run
    python benchmarks/moe.py --out moe.json --quick    # one shape, T in {1, 256}, no torch.compile rows

Each row is guarded: a failure is recorded in the JSON (and the table) and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

SHAPES = {
    "mixtral": dict(experts=8, top_k=2, hidden=4096, ffn=14336, renormalize=True),
    "qwen_moe": dict(experts=64, top_k=8, hidden=2048, ffn=1408, renormalize=False),
    "tiny": dict(experts=4, top_k=2, hidden=32, ffn=24, renormalize=True),  # CPU smoke test of the script
}


def make_block(name: str, shape: dict, dtype, device, impl: str | None):
    """The HF block for a shape (Mixtral's for 'mixtral', Qwen3-MoE's, i.e. no shared expert, for 'qwen_moe')."""
    if name == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                            num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        cls = MixtralSparseMoeBlock
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["ffn"],
                             num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
                             norm_topk_prob=shape["renormalize"])
        cls = Qwen3MoeSparseMoeBlock
    cfg._experts_implementation = impl  # a setter on transformers 5.x configs
    with torch.device(device):
        block = cls(cfg)
    gen = torch.Generator(device=device).manual_seed(0)  # drawn on the device: a Mixtral layer is 1.4 G numbers
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device) / math.sqrt(p.shape[-1]))
    return block.to(dtype).eval()


def make_inputs(tokens: int, shape: dict, block, skewed: bool, dtype, device):
    """Hidden states; skewed: 90% of tokens pushed toward expert 0 along its router row."""
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    x = torch.randn(tokens, shape["hidden"], generator=gen)
    if skewed:
        u = block.gate.weight[0].float().cpu()
        u = u / u.norm()
        n_hot = max(1, int(round(0.9 * tokens)))
        x[:n_hot] += 12.0 * u
    return x.to(device=device, dtype=dtype)


def routing_stats(block, x, top_k):
    logits = F.linear(x, block.gate.weight).float()
    ids = torch.topk(torch.softmax(logits, -1), top_k, -1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=block.gate.weight.shape[0])
    return int((counts > 0).sum()), float(counts.max()) / ids.numel()


def grouped_mm_moe(x, gate_weight, w1, w2, top_k, renormalize):
    """A minimal sort + torch._grouped_mm MoE (what the grouped form does without HF's overhead)."""
    return grouped_mm_moe_of_logits(x, F.linear(x, gate_weight), w1, w2, top_k, renormalize)


def grouped_mm_moe_of_logits(x, logits, w1, w2, top_k, renormalize):
    """`grouped_mm_moe` from given router logits."""
    mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    T, H = x.shape
    weights, ids = torch.topk(torch.softmax(logits.float(), -1), top_k, -1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat)
    hist_in = flat.float() if x.device.type == "cpu" else flat.int()  # histc: CPU wants float, CUDA int
    counts = torch.histc(hist_in, bins=w1.shape[0], min=0, max=w1.shape[0] - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // top_k]
    gate_up = mm(xs, w1.transpose(-2, -1), offs=offs)
    gate, up = gate_up.chunk(2, -1)
    h = F.silu(gate) * up
    out = mm(h, w2.transpose(-2, -1), offs=offs).float() * weights.reshape(-1)[order, None]
    result = torch.zeros(T * top_k, H, device=x.device, dtype=torch.float32)
    result[order] = out
    return result.view(T, top_k, H).sum(1).to(x.dtype)


def bench(fn, cudagraph: bool = False) -> float:
    if not torch.cuda.is_available():  # CPU smoke run (TRITON_INTERPRET=1): a rough timer
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[1] * 1e6
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    if cudagraph:
        ms = tt.do_bench_cudagraph(fn, rep=100, return_mode="median")
    else:
        ms = tt.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms * 1e3  # microseconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="moe_bench.json", help="JSON output path")
    parser.add_argument("--shapes", default="mixtral,qwen_moe")
    parser.add_argument("--tokens", default="1,16,256,4096")
    parser.add_argument("--routing", default="balanced,skewed")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--quick", action="store_true", help="smoke run: mixtral, T in {1, 256}, no compile")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the script itself on CPU: tiny shape, fp32, TRITON_INTERPRET=1 required")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.no_compile = "mixtral", "1,256", True
    if args.cpu_smoke:
        args.shapes, args.tokens, args.no_compile = "tiny", "1,16", True
    elif not torch.cuda.is_available():
        print("benchmarks/moe.py needs a CUDA GPU (or --cpu-smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    import transformers
    import triton

    from sqcompile.kernels import fused_moe as fm

    torch._dynamo.config.cache_size_limit = 64
    device, dtype = ("cpu", torch.float32) if args.cpu_smoke else ("cuda", torch.bfloat16)
    env = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, python=platform.python_version(),
               has_grouped_mm=hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm"))
    print(json.dumps(env))
    results = []

    def record(**row):
        results.append(row)
        us = row.get("us")
        msg = f"{row['shape']:9s} T={row['tokens']:5d} {row['routing']:8s} {row['row']:22s} "
        if us is not None:
            msg += f"{us:10.1f} us  {row.get('weight_GBps', 0):8.1f} GB/s"
        elif "rel_err" in row:
            msg += f"rel err fused {row['rel_err']:.3g}, torch reference {row['rel_err_torch_ref']:.3g}"
        else:
            msg += f"ERROR {row.get('error')}"
        print(msg, flush=True)
        with open(args.out, "w") as f:  # keep partial results if the run is cut short
            json.dump(dict(env=env, results=results), f, indent=1)

    for name in args.shapes.split(","):
        shape = SHAPES[name]
        E, k, H, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["ffn"]
        block = make_block(name, shape, dtype, device, impl="grouped_mm")

        def hf_loop(x3, block=block):
            """HF's per-expert Python loop ("eager" experts), on the same weights."""
            cfg = block.experts.config
            cfg._experts_implementation = "eager"
            try:
                return block(x3)
            finally:
                cfg._experts_implementation = "grouped_mm"
        w1, w2, gate_w = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach(), block.gate.weight.detach()
        expert_bytes = 3 * H * inter * w1.element_size()
        compiled = {}

        def fused_of_x(x, gate_w=gate_w, w1=w1, w2=w2, k=k, renormalize=shape["renormalize"]):
            return torch.ops.sqcompile.fused_moe_triton(x, F.linear(x, gate_w), w1, w2, k, renormalize, "softmax")
        for tokens in (int(t) for t in args.tokens.split(",")):
            for routing in args.routing.split(","):
                x = make_inputs(tokens, shape, block, routing == "skewed", dtype, device)
                x3 = x[None]
                used, hot = routing_stats(block, x, k)
                base = dict(shape=name, tokens=tokens, routing=routing, experts_used=used, hottest_share=hot)
                gbps = lambda us: used * expert_bytes / (us * 1e-6) / 1e9  # noqa: E731

                def fused():
                    return torch.ops.sqcompile.fused_moe_triton(x, F.linear(x, gate_w), w1, w2, k,
                                                                shape["renormalize"], "softmax")

                # correctness first: fused vs the HF block (and vs the torch reference)
                try:
                    with torch.no_grad():
                        ref = block(x3)[0].float()
                        got = fused().float()
                        torch_ref = fm.fused_moe_reference(x, F.linear(x, gate_w), w1, w2, k,
                                                           shape["renormalize"]).float()
                    scale = ref.abs().max().item()
                    err = (got - ref).abs().max().item() / scale
                    err_ref = (torch_ref - ref).abs().max().item() / scale
                    ok = err <= 3e-2
                    record(**base, row="check", us=None, rel_err=err, rel_err_torch_ref=err_ref, ok=ok)
                    if not ok:
                        print(f"  !! fused op differs from the HF block: rel err {err:.3g} "
                              f"(torch reference {err_ref:.3g})", flush=True)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    record(**base, row="check", us=None, error=f"{type(e).__name__}: {e}", ok=False)

                rows = [("hf_eager", lambda: block(x3), False)]
                if tokens <= 256:
                    rows.append(("hf_eager_loop", lambda: hf_loop(x3), False))
                if not args.no_compile:
                    if tokens not in compiled:
                        compiled[tokens] = torch.compile(block, dynamic=False)
                    rows.append(("hf_inductor", lambda: compiled[tokens](x3), False))
                if env["has_grouped_mm"]:
                    rows.append(("torch_grouped_mm",
                                 lambda: grouped_mm_moe(x, gate_w, w1, w2, k, shape["renormalize"]), False))
                rows.append(("sqcompile_fused", fused, False))
                if not args.no_compile:  # the triton_op traced and lowered by Inductor
                    if "fused" not in compiled:
                        compiled["fused"] = torch.compile(fused_of_x, dynamic=False)
                    rows.append(("sqcompile_fused_inductor", lambda: compiled["fused"](x), False))
                if device == "cuda":
                    rows.append(("sqcompile_fused_cudagraph", fused, True))
                for row, fn, cg in rows:
                    try:
                        with torch.no_grad():
                            t0 = time.time()
                            us = bench(fn, cudagraph=cg)
                        record(**base, row=row, us=us, weight_GBps=gbps(us), wall_s=time.time() - t0)
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        record(**base, row=row, us=None, error=f"{type(e).__name__}: {str(e)[:300]}")
        del block, compiled
        if device == "cuda":
            torch.cuda.empty_cache()

    # the table: speed-up vs HF eager per case
    if device == "cuda":
        torch.cuda.synchronize()
    print("\nshape     T     routing  row                          us     x HF eager   GB/s   (check)")
    by_case = {}
    for r in results:
        by_case.setdefault((r["shape"], r["tokens"], r["routing"]), []).append(r)
    for (name, tokens, routing), rows in by_case.items():
        check = next((r for r in rows if r["row"] == "check"), {})
        hf = next((r["us"] for r in rows if r["row"] == "hf_eager" and r.get("us")), None)
        for r in rows:
            if r["row"] == "check":
                continue
            if r.get("us") is None:
                print(f"{name:9s} {tokens:5d} {routing:8s} {r['row']:26s} ERROR {r.get('error', '')[:60]}")
                continue
            r["speedup_vs_hf_eager"] = hf / r["us"] if hf else None
            sp = f"{r['speedup_vs_hf_eager']:8.2f}x" if hf else "       -"
            print(f"{name:9s} {tokens:5d} {routing:8s} {r['row']:26s} {r['us']:9.1f} {sp}  {r['weight_GBps']:7.1f}"
                  f"   {'ok' if check.get('ok') else 'FAIL'} {check.get('rel_err', float('nan')):.2g}")
    with open(args.out, "w") as f:
        json.dump(dict(env=env, results=results), f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
