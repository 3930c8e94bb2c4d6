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
    PYTHONPATH=$PWD python3 benchmarks/moe_tune.py --candidates cands.json --out moe_cands.json   # a fixed list
    TRITON_INTERPRET=1 python benchmarks/moe_tune.py --cpu-smoke     # checks the script itself on CPU
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

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


def inputs(shape: dict, tokens: int, dtype, device):
    """Random weights, tokens and router logits (drawn on the device: a Mixtral layer is 1.4 G numbers)."""
    gen = torch.Generator(device=device).manual_seed(tokens)
    E, H, I = shape["experts"], shape["hidden"], shape["ffn"]

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)
    w1 = randn(E, 2 * I, H, scale=1 / math.sqrt(H))
    w2 = randn(E, H, I, scale=1 / math.sqrt(I))
    return randn(tokens, H), randn(tokens, E), w1, w2


def case(shape: dict, tokens: int, dtype, device, gate_up, down, groups) -> dict:
    E, H, I, k = shape["experts"], shape["hidden"], shape["ffn"], shape["top_k"]
    x, logits, w1, w2 = inputs(shape, tokens, dtype, device)

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


def load_before(path: str):
    """Another version of fused_moe.py (e.g. `git show HEAD:sqcompile/kernels/fused_moe.py > before.py`) as a module
    whose ops live in the namespace sqcompile_before, so that both versions run in one process."""
    import importlib.util

    source = open(path).read().replace('"sqcompile::', '"sqcompile_before::')
    spec = importlib.util.spec_from_loader("sqcompile.kernels.fused_moe_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sqcompile.kernels"
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def kernel_us(fn, iters: int = 3, top: int = 8) -> dict:
    """Device time per call of the `top` longest kernels of fn (torch.profiler), by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = {e.key[:60]: e.device_time_total / iters for e in prof.key_averages() if e.device_time_total > 0}
    return {k: round(v, 1) for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:top]}


class Energy:
    """The GPU's energy counter (NVML's total energy in mJ since driver load) and its SM clock, read from
    libnvidia-ml by ctypes (the driver's own library; pynvml may not be installed). `available`: False where it
    does not load or the counter is not supported."""

    def __init__(self, index: int = 0):
        import ctypes

        self._c = ctypes
        try:
            self._lib = ctypes.CDLL("libnvidia-ml.so.1")
            if self._lib.nvmlInit_v2() != 0:
                raise OSError("nvmlInit_v2 failed")
            self._handle = ctypes.c_void_p()
            if self._lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self._handle)) != 0:
                raise OSError("nvmlDeviceGetHandleByIndex_v2 failed")
            self.available = self.mj() is not None
        except OSError:
            self.available = False

    def mj(self):
        value = self._c.c_ulonglong()
        return value.value if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, self._c.byref(value)) == 0 \
            else None

    def sm_mhz(self):
        value = self._c.c_uint()
        return value.value if self._lib.nvmlDeviceGetClockInfo(self._handle, 1, self._c.byref(value)) == 0 else None


def sustained(fns: dict, seconds: float, repeats: int = 2) -> dict:
    """Each fn back to back for `seconds` (the GPU at its power cap, as in a long prefill), rows interleaved over
    `repeats` repeats (order reversed every other repeat): per row the median us per call, mJ per call from the energy
    counter, mean watts and the SM clock at the end. Empty where NVML is not available."""
    meter = Energy()
    if not meter.available:
        return {}
    out = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = fns[name]
            fn()
            torch.cuda.synchronize()
            calls, t0 = 0, time.perf_counter()
            e0 = meter.mj()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            while time.perf_counter() - t0 < seconds:
                for _ in range(8):
                    fn()
                calls += 8
                torch.cuda.synchronize()
            end.record()
            torch.cuda.synchronize()
            e1, mhz = meter.mj(), meter.sm_mhz()
            us = start.elapsed_time(end) * 1e3 / calls
            out[name].append({"us": round(us, 1), "mj": round((e1 - e0) / calls, 2),
                              "watts": round((e1 - e0) / (us * calls) * 1e3, 1), "sm_mhz": mhz})
    return {name: {"us": sorted(v["us"] for v in runs)[len(runs) // 2],
                   "mj": sorted(v["mj"] for v in runs)[len(runs) // 2], "runs": runs}
            for name, runs in out.items()}


def compiled_with(cfg: dict, tag: str, x, logits, w1, w2, k: int, renormalize: bool):
    """The op under torch.compile with `cfg` as its `_config` (read while tracing; own code object per tag)."""
    ns = dict(torch=torch, w1=w1, w2=w2, k=k, renormalize=renormalize)
    exec(compile("def op(x, l):\n    return torch.ops.sqcompile.fused_moe_triton(x, l, w1, w2, k, renormalize, "
                 "'softmax')\n", f"<{tag}>", "exec"), ns)
    c = torch.compile(ns["op"], dynamic=False)
    fm._config_override = cfg
    try:
        with torch.no_grad():
            c(x, logits)
    finally:
        fm._config_override = None
    return lambda: c(x, logits)


def interleaved_medians(fns: dict, repeats: int, top: int = 8, profile: bool = True) -> dict:
    """Time every fn of `fns` in `repeats` interleaved repeats (clock drift under sustained load hits every row alike):
    per name the median us, each repeat's us, and the `top` longest kernels' device times (`kernel_us`)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(bench(fn))
    rows = {}
    for name, fn in fns.items():
        t = sorted(times[name])
        rows[name] = {"us": float(t[len(t) // 2]), "us_repeats": [round(v, 1) for v in times[name]],
                      "kernels_us": kernel_us(fn, top=top) if profile else {}}
    return rows


def candidates(shape: dict, tokens: int, dtype, device, cands: list, dense_reference: bool, repeats: int = 1,
               before=None) -> dict:
    """A fixed list of candidates, each `{"name": ..., "config": {...}}` applied over `_config`'s choice.

    Each is checked against the baseline output first; then all are timed in `repeats` interleaved repeats (so that
    clock drift under sustained load hits every candidate alike) and the median per candidate is reported, with
    its longest kernels' times from the profiler. `before`: a `load_before` module, timed as the row "before".
    With dense_reference also the two GEMMs as dense cuBLAS bmm with the same rows per expert."""
    x, logits, w1, w2 = inputs(shape, tokens, dtype, device)
    k = shape["top_k"]
    E, H, I = shape["experts"], shape["hidden"], shape["ffn"]

    fm._config_override = None
    base_cfg = fm._config(tokens * k, E, H, I)
    fns = {}

    def with_config(cfg):
        def run():
            fm._config_override = cfg
            try:
                return fm.fused_moe_triton(x, logits, w1, w2, k, shape["renormalize"])
            finally:
                fm._config_override = None
        return run

    ref = with_config(None)().float()
    rows = {}
    todo = [("baseline", None)] + [(c["name"], dict(base_cfg, **c["config"])) for c in cands]
    if before is not None:
        fns["before"] = lambda: before.fused_moe_triton(x, logits, w1, w2, k, shape["renormalize"])
        rows["before"] = {"name": "before", "config": "before"}
    for name, cfg in todo:
        run = with_config(cfg)
        rows[name] = {"name": name, "config": cfg or base_cfg}
        try:
            err = float((run().float() - ref).norm() / ref.norm().clamp_min(1e-30))
            rows[name]["rel_err"] = err
            if err < 2e-2:
                fns[name] = run
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is recorded, not fatal
            rows[name]["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  {name:24s} {rows[name]['error']}", flush=True)
    if "before" in fns:
        rows["before"]["rel_err"] = float((fns["before"]().float() - ref).norm() / ref.norm().clamp_min(1e-30))
    for name, timed in interleaved_medians(fns, repeats, profile=device == "cuda").items():
        rows[name].update(timed)
        print(f"  {name:24s} {timed['us']:9.1f} us  (min {min(timed['us_repeats']):.1f} max {max(timed['us_repeats']):.1f}) "
              f"err {rows[name].get('rel_err', float('nan')):.1e}  {timed['kernels_us']}", flush=True)
    result = {"tokens": tokens, "repeats": repeats, "rows": list(rows.values())}
    if dense_reference and device == "cuda":
        rows_per_expert = tokens * k // E
        a = torch.randn(E, rows_per_expert, H, device=device, dtype=dtype)
        hh = torch.randn(E, rows_per_expert, I, device=device, dtype=dtype)
        result["dense_gate_up_us"] = bench(lambda: torch.bmm(a, w1.transpose(1, 2)))
        result["dense_down_us"] = bench(lambda: torch.bmm(hh, w2.transpose(1, 2)))
        print(f"  dense cuBLAS bmm: gate/up {result['dense_gate_up_us']:.1f} us, down {result['dense_down_us']:.1f} us",
              flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,qwen_moe")
    ap.add_argument("--tokens", default="4096,256")
    ap.add_argument("--out", default="moe_tune.json")
    ap.add_argument("--gate-up", default="", help="gate/up candidates 'BM,BN,BK,warps,stages;...' (default: GATE_UP)")
    ap.add_argument("--down", default="", help="down candidates 'BN,BK,warps,stages;...' (default: DOWN)")
    ap.add_argument("--groups", default="", help="GROUP_M candidates 'a,b,...' (default: GROUPS)")
    ap.add_argument("--candidates", default="", help="JSON list of {name, config}: time these instead of the sweep")
    ap.add_argument("--repeat", type=int, default=1, help="with --candidates: interleaved timing repeats")
    ap.add_argument("--before", default="", help="with --candidates: another fused_moe.py to time as 'before'")
    ap.add_argument("--dense-reference", action="store_true", help="with --candidates: also time dense cuBLAS bmm")
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
    if args.candidates:
        with open(args.candidates) as f:
            cands = json.load(f)
        before = load_before(args.before) if args.before else None
        for name in shapes:
            for t in tokens:
                print(f"{name} T={t}", flush=True)
                results["cases"][f"{name}/{t}"] = candidates(SHAPES[name], t, dtype, device, cands,
                                                             args.dense_reference, args.repeat, before)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        return 0
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
