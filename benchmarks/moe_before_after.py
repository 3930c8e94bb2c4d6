"""The fused MoE op before and after a change (GPU): another version of fused_moe.py against the current one, eager and
under torch.compile (Inductor), optionally next to HF's MoE block under Inductor.

Every row is first checked (the current op against `fused_moe_reference`, the other version against the current
op), then all rows are timed in interleaved repeats (clock drift under sustained load hits every row alike; the
median per row is reported), then each row's kernels are profiled once. Inputs and shapes as in moe_tune.py.

    git show HEAD:sqcompile/kernels/fused_moe.py > /tmp/fused_moe_before.py
    PYTHONPATH=$PWD python3 benchmarks/moe_before_after.py --before /tmp/fused_moe_before.py --shapes mixtral --hf

--variants adds compiled rows of the current op with some `_config` fields changed; --energy SECONDS runs every
compiled row back to back that long (interleaved, twice) and reads NVML's energy counter: us and mJ per call at the
power cap, the regime a long prefill runs in (BENCHMARKS.md, "Fused MoE").
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from moe import SHAPES, grouped_mm_moe_of_logits, make_block
from moe_tune import compiled_with, inputs, interleaved_medians, load_before, sustained

from sqcompile.kernels import fused_moe as fm


def parse_variants(text: str) -> dict:
    """'pair:W_PAIR=1;bn64:BLOCK_N=64,W_PAIR=1' -> {'pair': {'W_PAIR': 1}, 'bn64': {...}} (integer values)."""
    variants = {}
    for item in filter(None, text.split(";")):
        label, _, fields = item.partition(":")
        variants[label] = {key: int(value) for key, value in (f.split("=") for f in fields.split(",") if f)}
    return variants


def case(name: str, tokens: int, before, repeats: int, compiled: bool, hf: bool, grouped_mm: bool = False,
         variants: dict | None = None, energy_s: float = 0.0) -> dict:
    shape = SHAPES[name]
    k, renormalize = shape["top_k"], shape["renormalize"]
    x, logits, w1, w2 = inputs(shape, tokens, torch.bfloat16, "cuda")
    fns = {"before": lambda: before.fused_moe_triton(x, logits, w1, w2, k, renormalize),
           "after": lambda: fm.fused_moe_triton(x, logits, w1, w2, k, renormalize)}
    if compiled:
        def op(ns):
            return torch.compile(lambda x, l: getattr(torch.ops, ns).fused_moe_triton(x, l, w1, w2, k, renormalize,
                                                                                        "softmax"), dynamic=False)
        before_c, after_c = op("sqcompile_before"), op("sqcompile")
        fns["before_inductor"] = lambda: before_c(x, logits)
        fns["after_inductor"] = lambda: after_c(x, logits)
        E, H, inter = shape["experts"], shape["hidden"], shape["ffn"]
        for label, fields in (variants or {}).items():  # `_config`'s choice with some fields changed
            cfg = dict(fm.device_config(tokens * k, E, H, inter, x.device, x.dtype), **fields)
            fns[f"after_{label}_inductor"] = compiled_with(cfg, f"{name}_{tokens}_{label}", x, logits, w1, w2, k,
                                                           renormalize)
    with torch.no_grad():
        ref = fm.fused_moe_reference(x, logits, w1, w2, k, renormalize).float()
        after = fns["after"]().float()
        checks = {"after_vs_reference": float((after - ref).norm() / ref.norm()),
                  "before_vs_after": float((fns["before"]().float() - after).norm() / after.norm())}
        for row in fns:
            if row.endswith("_inductor"):
                checks[f"{row}_vs_after"] = float((fns[row]().float() - after).norm() / after.norm())
    print(f"{name} T={tokens} checks {checks}", flush=True)
    if hf:
        block = make_block(name, shape, torch.bfloat16, "cuda", impl="grouped_mm")
        hf_c = torch.compile(block, dynamic=False)
        x3 = x[None]
        with torch.no_grad():
            hf_c(x3)
        fns["hf_inductor"] = lambda: hf_c(x3)
    if grouped_mm:  # benchmarks/moe.py's sort + torch._grouped_mm row (eager), on the same inputs
        fns["torch_grouped_mm"] = lambda: grouped_mm_moe_of_logits(x, logits, w1, w2, k, renormalize)
        with torch.no_grad():
            checks["torch_grouped_mm_vs_reference"] = float((fns["torch_grouped_mm"]().float() - ref).norm()
                                                            / ref.norm())
        print(f"  torch_grouped_mm vs reference {checks['torch_grouped_mm_vs_reference']:.3g}", flush=True)
    with torch.no_grad():
        rows = interleaved_medians(fns, repeats)
    for row, r in rows.items():
        print(f"  {row:16s} {r['us']:9.1f} us (min {min(r['us_repeats']):.1f} max {max(r['us_repeats']):.1f})  "
              f"{r['kernels_us']}", flush=True)
    result = {"shape": name, "tokens": tokens, "repeats": repeats, "checks": checks, "rows": rows}
    if energy_s > 0:  # the compiled rows back to back at the power cap: time and energy per call
        with torch.no_grad():
            result["sustained"] = sustained({row: fn for row, fn in fns.items()
                                             if row.endswith("_inductor")}, energy_s)
        for row, r in result["sustained"].items():
            print(f"  sustained {row:22s} {r['us']:9.1f} us {r['mj']:8.2f} mJ/call  "
                  f"{[(v['us'], v['mj'], v['watts'], v['sm_mhz']) for v in r['runs']]}", flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the other fused_moe.py")
    ap.add_argument("--shapes", default="mixtral")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--hf", action="store_true", help="also HF's block under torch.compile")
    ap.add_argument("--grouped-mm", action="store_true", help="also benchmarks/moe.py's torch._grouped_mm row")
    ap.add_argument("--variants", default="", help="compiled rows of the current op with `_config` fields changed, "
                    "e.g. 'pair:W_PAIR=1;bn64:BLOCK_N=64'")
    ap.add_argument("--energy", type=float, default=0.0, metavar="SECONDS",
                    help="also run each compiled row back to back this long (twice, interleaved): us and mJ per call "
                    "from NVML's energy counter, at the power cap")
    ap.add_argument("--out", default="moe_before_after.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/moe_before_after.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch._dynamo.config.cache_size_limit = 64
    # the on-disk caches key on the graph dynamo sees (one call of the op), not on the op's Python body: on a warm
    # machine they hand back a graph compiled from an earlier version of fused_moe.py
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    before = load_before(args.before)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    for name in args.shapes.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            results["cases"].append(case(name, tokens, before, args.repeat, not args.no_compile, args.hf,
                                         args.grouped_mm, parse_variants(args.variants), args.energy))
            with open(args.out, "w") as f:  # partial results survive a cut-off run
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
