"""GPU check and timing of the exact-slot kernels (`sqcompile.kernels.sink_triton`) at a Llama-3-8B decode step's shape.

1. `exact_split_triton` and `store_exact_step_triton` (compiled Triton, outputs poisoned first) equal their torch
   references (`sink.exact_split_torch`, `sink.store_exact_torch`) on fresh random inputs: B=8, 32/8 heads, d=128, the
   sink and 4 outlier slots (one empty, one masked, one at the new token's position), a uint8 token mask.
2. Device time per launch (`triton.testing.do_bench_cudagraph`, median), and, with `--base FILE` (an older
   sink_triton.py), of that file's kernels on the same inputs: the e2e step runs each once per layer.

    PYTHONPATH=$PWD python3 benchmarks/check_sink_triton_gpu.py [--base old_sink_triton.py] [--out sink.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json

import torch
import triton.testing

from sqcompile.kernels import sink_triton
from sqcompile.kernels.sink import exact_split_torch, store_exact_torch

DEV = "cuda"


def inputs(B=8, Hq=32, Hkv=8, S=5, d=128, T=32768, seed=0):
    T = T if DEV == "cuda" else 1024
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    q, mean = r(B, Hq, d).to(torch.bfloat16), r(Hkv, d)
    sk, sv = r(B, Hkv, S, d), r(B, Hkv, S, d)
    pos = torch.randint(0, T - 1, (B, S), device=DEV, generator=g)
    pos[0, 2], pos[1, 1] = -1, 7  # an empty slot; a slot the mask hides
    new_pos = torch.tensor([T - 1], device=DEV)
    pos[2, 3] = T - 1  # a slot that holds the new token itself
    mask = torch.ones(B, T, dtype=torch.uint8, device=DEV)
    mask[1, :64] = 0
    new_k, new_v = r(B, Hkv, 1, d).to(torch.bfloat16), r(B, Hkv, 1, d)
    return q, mean, mask, sk, sv, pos, new_k, new_v, new_pos


def check_exact_split(args) -> float:
    q, mean, mask, sk, sv, pos, new_k, new_v, new_pos = args
    B, Hq, d = q.shape
    ref = exact_split_torch(q, mean, mask, 0.088, sk, sv, pos, new_k, new_v, new_pos)
    out = (torch.full((B, Hq), float("nan"), device=DEV), torch.full((B, Hq, d), float("nan"), device=DEV),
           torch.full(pos.shape, -7, dtype=torch.int32, device=DEV))
    got = sink_triton.exact_split_triton(q, mean, mask, 0.088, sk, sv, pos, new_k, new_v, new_pos, *out)
    assert torch.equal(torch.isinf(got[0]), torch.isinf(ref[0])) and torch.equal(got[2], pos.int())
    fin = torch.isfinite(ref[0])
    err = max((got[0][fin] - ref[0][fin]).abs().max().item(), (got[1] - ref[1]).abs().max().item())
    assert err < 1e-3, err
    return err


def canonical(buffers):
    """The slot buffers with the outlier slots (1..S-1) ordered by position: the torch form re-sorts them by their
    criterion, the step kernel writes in place (as tests/test_sink.py compares them)."""
    k, v, p, c = buffers
    order = torch.cat([torch.zeros_like(p[:, :1]), 1 + p[:, 1:].argsort(1)], 1)
    take = order[:, None, :, None].expand_as(k)
    return k.gather(2, take), v.gather(2, take), p.gather(1, order), c.gather(1, order)


def check_store(args) -> float:
    q, mean, mask, sk, sv, pos, new_k, new_v, new_pos = args
    B, Hkv, S, d = sk.shape
    g = torch.Generator(device=DEV).manual_seed(3)
    bufs = [sk.clone(), sv.clone(), pos.clone(), torch.rand(B, S, device=DEV, generator=g) * 200 * d]
    bufs[3][:, 0] = float("-inf")
    mine = [t.clone() for t in bufs]
    worst = 0.0
    for step in range(6):  # keys near the mean and far from it: some steps take a slot, some not
        scale = (0.1, 5.0, 1.0, 30.0, 0.5, 10.0)[step]
        key = mean[None, :, None, :] + scale * torch.randn(B, Hkv, 1, d, device=DEV, generator=g)
        val = torch.randn(B, Hkv, 1, d, device=DEV, generator=g)
        at = torch.tensor([40000 + step], device=DEV)
        store_exact_torch(*bufs, key, val, at, None, mean, True, S - 1)
        sink_triton.store_exact_step_triton(*mine, key, val, at, None, mean, True, S - 1)
        for a, b in zip(canonical(mine), canonical(bufs)):
            worst = max(worst, (a.double() - b.double()).abs().max().item() if a.is_floating_point() else
                        float(not torch.equal(a, b)))
    assert worst < 1e-3, worst
    return worst


def time_kernels(mod, args) -> dict:
    q, mean, mask, sk, sv, pos, new_k, new_v, new_pos = args
    B, Hkv, S, d = sk.shape
    bufs = [sk.clone(), sv.clone(), pos.clone(), torch.zeros(B, S, device=DEV)]
    key, val = new_k.float(), new_v
    split = lambda: mod.exact_split_triton(q, mean, mask, 0.088, sk, sv, pos, new_k, new_v, new_pos)  # noqa: E731
    store = lambda: mod.store_exact_step_triton(*bufs, key, val, new_pos, None, mean, True, S - 1)  # noqa: E731
    split(), store()
    torch.cuda.synchronize()
    return {"exact_split_us": 1e3 * triton.testing.do_bench_cudagraph(split, rep=50, return_mode="median"),
            "store_step_us": 1e3 * triton.testing.do_bench_cudagraph(store, rep=50, return_mode="median")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="an older sink_triton.py to time beside this one")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU run of the checks (TRITON_INTERPRET=1), no timing")
    a = ap.parse_args()
    if a.smoke:
        global DEV
        DEV = "cpu"
    args = inputs()
    e1, e2 = check_exact_split(args), check_store(args)
    print(f"CHECK exact_split_triton vs torch: max abs err {e1:.2e} OK; store_exact_step_triton vs torch: {e2:.2e} OK")
    if a.smoke:
        return
    rows = {"this": time_kernels(sink_triton, args)}
    if a.base:
        spec = importlib.util.spec_from_file_location("sink_triton_base", a.base)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
        rows["base"] = time_kernels(base, args)
    dev = torch.cuda.get_device_name()
    print(f"{dev}, B=8, 32/8 heads, d=128, 5 slots: device us per launch (do_bench_cudagraph median)")
    for name, r in rows.items():
        print(f"| {name} | exact_split {r['exact_split_us']:.2f} us | store_exact step {r['store_step_us']:.2f} us |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
