"""How long do the exact-slot kernels take per decode step? (GPU)

Device time per launch of `exact_split_triton` (the sink, the outlier slots and the new token as one extra split)
and `store_exact_step_triton` (a decode step's slot update), `triton.testing.do_bench_cudagraph` median, at a
Llama-3-8B decode step's shape: B=8, 32/8 heads, d=128, 5 slots, 32K tokens. The e2e step runs each once per layer.
With `--base FILE` (another sink_triton.py) that file's kernels are timed on the same inputs. `exact_split` is
checked against its torch form first; the full checks are tests/test_exact_slots_cuda.py (`pytest -m cuda`).

    PYTHONPATH=$PWD python3 benchmarks/exact_slots.py [--base old_sink_triton.py] [--out exact_slots.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import torch


def timings(mod, batch: int = 8, q_heads: int = 32, kv_heads: int = 8, slots: int = 5, head_dim: int = 128,
            tokens: int = 32768) -> dict:
    import triton.testing

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, q_heads, head_dim, device="cuda", generator=g).to(torch.bfloat16)
    mean = torch.randn(kv_heads, head_dim, device="cuda", generator=g)
    sk = torch.randn(batch, kv_heads, slots, head_dim, device="cuda", generator=g)
    sv = torch.randn_like(sk)
    pos = torch.randint(0, tokens - 1, (batch, slots), device="cuda", generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.uint8, device="cuda")
    new_k = torch.randn(batch, kv_heads, 1, head_dim, device="cuda", generator=g).to(torch.bfloat16)
    new_v = torch.randn(batch, kv_heads, 1, head_dim, device="cuda", generator=g)
    new_pos = torch.tensor([tokens - 1], device="cuda")
    bufs = [sk.clone(), sv.clone(), pos.clone(), torch.zeros(batch, slots, device="cuda")]
    new_key = new_k.float()

    def split():
        return mod.exact_split_triton(q, mean, mask, 0.088, sk, sv, pos, new_k, new_v, new_pos)

    def store():
        return mod.store_exact_step_triton(*bufs, new_key, new_v, new_pos, None, mean, True, slots - 1)

    from sqcompile.kernels.sink import exact_split_torch

    ref, got = exact_split_torch(q, mean, mask, 0.088, sk, sv, pos, new_k, new_v, new_pos), split()
    err = max((got[i] - ref[i]).abs().max().item() for i in (0, 1))
    if not err < 1e-3:  # correctness first (tests/test_exact_slots_cuda.py checks both kernels fully)
        raise RuntimeError(f"exact_split_triton differs from exact_split_torch by {err:.3g}")
    store()
    torch.cuda.synchronize()
    return {"exact_split_us": 1e3 * triton.testing.do_bench_cudagraph(split, rep=50, return_mode="median"),
            "store_step_us": 1e3 * triton.testing.do_bench_cudagraph(store, rep=50, return_mode="median")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="another sink_triton.py to time beside this tree's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/exact_slots.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from sqcompile.kernels import sink_triton

    rows = {"this": timings(sink_triton)}
    if args.base:
        spec = importlib.util.spec_from_file_location("sink_triton_base", args.base)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
        rows["base"] = timings(base)
    device = torch.cuda.get_device_name()
    print(f"{device}, B=8, 32/8 heads, d=128, 5 slots: device us per launch (do_bench_cudagraph median)")
    for name, r in rows.items():
        print(f"| {name} | exact_split {r['exact_split_us']:.2f} us | store_exact step {r['store_step_us']:.2f} us |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
