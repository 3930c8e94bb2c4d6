"""The fused MoE op's prefill tiers side by side (GPU): all-Triton GEMMs, torch._grouped_mm for the down GEMM
("down"), torch._grouped_mm for both ("both"), next to benchmarks/moe.py's sort + torch._grouped_mm row.

Each tier is checked against `fused_moe_reference` first; then all rows are timed in interleaved rounds (median),
eager, and optionally under torch.compile (--inductor CASES, e.g. mixtral:4096); each row's kernels are profiled
once, and the two CUTLASS grouped GEMMs are also timed alone. Inputs as in moe_tune.py. --inductor all: every case.

    PYTHONPATH=$PWD python3 benchmarks/moe_grouped_tiers.py --cases mixtral:4096,mixtral:256,qwen_moe:4096 --out t.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from moe import SHAPES, bench, grouped_mm_moe_of_logits
from moe_tune import compiled_with, inputs, interleaved_medians

from sqcompile.kernels import fused_moe as fm

TIERS = ("triton", "down", "both")


def case(name: str, tokens: int, rounds: int, inductor: bool) -> dict:
    shape = SHAPES[name]
    k, renormalize = shape["top_k"], shape["renormalize"]
    E, H, inter = shape["experts"], shape["hidden"], shape["ffn"]
    x, logits, w1, w2 = inputs(shape, tokens, torch.bfloat16, "cuda")
    base = fm.device_config(tokens * k, E, H, inter, x.device, x.dtype)
    base.pop("GROUPED_MM", None)
    cfgs = {tier: dict(base, **({"GROUPED_MM": tier} if tier != "triton" else {})) for tier in TIERS}
    if not base.get("H_SORTED"):
        cfgs.pop("down")

    def with_cfg(cfg, fn):
        def run():
            fm._config_override = cfg
            try:
                return fn()
            finally:
                fm._config_override = None
        return run

    fns = {}
    for tier, cfg in cfgs.items():
        fns[tier] = with_cfg(cfg, lambda: fm.fused_moe_triton(x, logits, w1, w2, k, renormalize))
        if inductor:
            # the tier is read while tracing; dynamo caches per code object, so each tier compiles its own function
            fns[f"{tier}_inductor"] = compiled_with(cfg, f"{name}_{tokens}_{tier}", x, logits, w1, w2, k, renormalize)
    fns["torch_grouped_mm"] = lambda: grouped_mm_moe_of_logits(x, logits, w1, w2, k, renormalize)
    with torch.no_grad():
        ref = fm.fused_moe_reference(x, logits, w1, w2, k, renormalize).float()
        checks = {row: float((fn().float() - ref).norm() / ref.norm()) for row, fn in fns.items()}
    print(f"{name} T={tokens} checks {checks}", flush=True)
    with torch.no_grad():
        rows = interleaved_medians(fns, rounds, top=10)
        for row, r in rows.items():
            print(f"  {row:18s} {r['us']:9.1f} us (min {min(r['us_rounds']):.1f} max {max(r['us_rounds']):.1f})  "
                  f"{r['kernels_us']}", flush=True)
        # the two CUTLASS GEMMs alone, on the "both" tier's operands
        weights, ids = fm.route(logits, k, renormalize, "softmax")
        order, offs, _ = fm.sort_pairs_by_expert(ids, E)
        xs = x.index_select(0, order // k)
        mm = fm._grouped_mm_fn()
        h = torch.randn(xs.shape[0], inter, device="cuda", dtype=torch.bfloat16)
        rows["grouped_mm_gate_up_alone"] = {"us": bench(lambda: mm(xs, w1.transpose(1, 2), offs=offs))}
        rows["grouped_mm_down_alone"] = {"us": bench(lambda: mm(h, w2.transpose(1, 2), offs=offs))}
        print(f"  CUTLASS alone: gate/up {rows['grouped_mm_gate_up_alone']['us']:.1f} us, "
              f"down {rows['grouped_mm_down_alone']['us']:.1f} us", flush=True)
    return {"shape": name, "tokens": tokens, "rounds": rounds, "checks": checks, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="mixtral:4096,mixtral:256,qwen_moe:4096")
    ap.add_argument("--inductor", default="", help="cases also timed under torch.compile, e.g. mixtral:4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="moe_grouped_tiers.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/moe_grouped_tiers.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch._dynamo.config.cache_size_limit = 64
    # the tier is chosen while tracing (by `_config_override`): no cache may hand one tier's graph to another
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    compiled = set(args.cases.split(",") if args.inductor == "all" else args.inductor.split(",") if args.inductor
                   else ())
    for spec in args.cases.split(","):
        name, tokens = spec.split(":")
        results["cases"].append(case(name, int(tokens), args.rounds, spec in compiled))
        with open(args.out, "w") as f:  # partial results survive a cut-off run
            json.dump(results, f, indent=1)
    for c in results["cases"]:
        print(f"{c['shape']:9s} T={c['tokens']:5d}  " + "  ".join(f"{row} {r['us']:.1f}" for row, r in c["rows"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
