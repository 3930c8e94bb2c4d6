"""Tile sweep for the fused MoE op's prefill path (GPU): which block sizes, warps and stages to put in
`sqcompile.kernels.fused_moe._config` for many rows per expert.

For each shape and token count: the op with `_config`'s own choice first (the baseline and the reference
output), then coordinate descent: the gate/up kernel's tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) with the
down kernel fixed, then its program order (GROUP_M), then the down kernel's (DOWN_BLOCK_N, DOWN_BLOCK_K, warps,
stages), then its order (DOWN_GROUP_M), then h stored in block order (H_SORTED), each stage starting from the
best so far. Every candidate is checked against the baseline output (relative error) before it is timed; median of
`triton.testing.do_bench` over the whole op (routing and alignment included, the same in every row). Prints the
best configurations last and writes JSON.

    PYTHONPATH=$PWD python3 benchmarks/moe_tune.py --out moe_tune.json
    TRITON_INTERPRET=1 python benchmarks/moe_tune.py --cpu-smoke     # checks the script itself on CPU
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from moe import SHAPES, bench  # benchmarks/moe.py: the same shapes and timer

from sqcompile.kernels import fused_moe as fm

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for gate/up
GATE_UP = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
           (64, 256, 64, 8, 3)]
# (DOWN_BLOCK_N, DOWN_BLOCK_K, DOWN_WARPS, DOWN_STAGES)
DOWN = [(128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3), (256, 64, 8, 4), (256, 32, 8, 4)]
# program order: GROUP_M blocks of rows at a time (fm.NO_GROUPING: row blocks vary fastest, the old order)
GROUPS = [fm.NO_GROUPING, 4, 8, 16, 32]
SMOKE_GATE_UP = [(16, 32, 32, 4, 2), (32, 32, 32, 4, 2)]
SMOKE_DOWN = [(32, 32, 4, 2), (64, 32, 4, 2)]
SMOKE_GROUPS = [fm.NO_GROUPING, 1]


def case(shape: dict, tokens: int, dtype, device, gate_up, down, groups) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    E, H, I, k = shape["experts"], shape["hidden"], shape["ffn"], shape["top_k"]
    w1 = (torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)).to(device=device, dtype=dtype)
    w2 = (torch.randn(E, H, I, generator=gen) / math.sqrt(I)).to(device=device, dtype=dtype)
    x = torch.randn(tokens, H, generator=gen).to(device=device, dtype=dtype)
    logits = torch.randn(tokens, E, generator=gen).to(device=device, dtype=dtype)

    def run():
        return fm.fused_moe_triton(x, logits, w1, w2, k, shape["renormalize"])

    fm._config_override = None
    base_cfg = fm._config(tokens * k, E, H, I)
    ref = run().float()
    rows = [{"stage": "baseline", "config": base_cfg, "us": bench(run), "rel_err": 0.0}]

    def trial(stage, cfg):
        fm._config_override = cfg
        try:
            out = run().float()
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            row = {"stage": stage, "config": dict(cfg), "rel_err": err,
                   "us": bench(run) if err < 2e-2 else float("nan")}
        except Exception as e:  # a config the compiler rejects (shared memory, registers) is recorded, not fatal
            row = {"stage": stage, "config": dict(cfg), "error": f"{type(e).__name__}: {str(e)[:160]}"}
        finally:
            fm._config_override = None
        rows.append(row)
        us = row.get("us", float("nan"))
        short = {k: v for k, v in cfg.items() if k not in ("SPLIT_K",)}
        print(f"  {stage:8s} {short} -> {us:9.1f} us  err {row.get('rel_err', float('nan')):.1e} "
              f"{row.get('error', '')}", flush=True)
        return us

    best_gu, best_us = None, float("inf")
    for bm, bn, bk, w, s in gate_up:
        cfg = dict(base_cfg, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s,
                   DOWN_WARPS=base_cfg["num_warps"], DOWN_STAGES=base_cfg["num_stages"], SPLIT_K=1,
                   GROUP_M=8, DOWN_GROUP_M=8)
        us = trial("gate_up", cfg)
        if us < best_us:
            best_gu, best_us = cfg, us
    best = best_gu
    for stage, key, values in (("group", "GROUP_M", groups), ("down", None, down), ("d_group", "DOWN_GROUP_M", groups),
                               ("h_sorted", "H_SORTED", [True])):
        start = dict(best)
        for v in values:
            if key is None:
                dbn, dbk, dw, ds = v
                cfg = dict(start, DOWN_BLOCK_N=dbn, DOWN_BLOCK_K=dbk, DOWN_WARPS=dw, DOWN_STAGES=ds)
            else:
                cfg = dict(start, **{key: v})
            if cfg == start and stage != "down":
                continue
            us = trial(stage, cfg)
            if us < best_us:
                best, best_us = cfg, us
    return {"tokens": tokens, "rows": rows, "baseline_us": rows[0]["us"], "best_us": best_us, "best": best}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,qwen_moe")
    ap.add_argument("--tokens", default="4096,256")
    ap.add_argument("--out", default="moe_tune.json")
    ap.add_argument("--gate-up", default="", help="gate/up candidates 'BM,BN,BK,warps,stages;...' (default: GATE_UP)")
    ap.add_argument("--down", default="", help="down candidates 'BN,BK,warps,stages;...' (default: DOWN)")
    ap.add_argument("--groups", default="", help="GROUP_M candidates 'a,b,...' (default: GROUPS)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape, fp32, TRITON_INTERPRET=1 required")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        shapes, tokens, dtype, device = ["tiny"], [40], torch.float32, "cpu"
        gate_up, down, groups = SMOKE_GATE_UP, SMOKE_DOWN, SMOKE_GROUPS
    else:
        if not torch.cuda.is_available():
            print("benchmarks/moe_tune.py needs a CUDA GPU (or --cpu-smoke with TRITON_INTERPRET=1)", file=sys.stderr)
            return 2
        shapes, tokens, dtype, device = args.shapes.split(","), [int(t) for t in args.tokens.split(",")], \
            torch.bfloat16, "cuda"
        gate_up, down, groups = GATE_UP, DOWN, GROUPS
        if args.gate_up:
            gate_up = [tuple(int(v) for v in c.split(",")) for c in args.gate_up.split(";")]
        if args.down:
            down = [tuple(int(v) for v in c.split(",")) for c in args.down.split(";")]
        if args.groups:
            groups = [int(v) for v in args.groups.split(",")]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": device_name, "torch": torch.__version__, "cases": {}}
    for name in shapes:
        for t in tokens:
            print(f"{name} T={t}", flush=True)
            results["cases"][f"{name}/{t}"] = case(SHAPES[name], t, dtype, device, gate_up, down, groups)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{device_name}\n| shape | T | _config now us | best us | speed-up | best config |\n|---|---|---|---|---|---|")
    for key, r in results["cases"].items():
        name, t = key.split("/")
        print(f"| {name} | {t} | {r['baseline_us']:.1f} | {r['best_us']:.1f} | {r['baseline_us'] / r['best_us']:.2f}x "
              f"| {r['best']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
