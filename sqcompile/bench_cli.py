"""`sqcompile bench`: run the GPU benchmarks (decode attention, MoE, end-to-end decode) and print their tables."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS = {
    "decode_attention": "decode_attention.py",
    "decode_attention_fast": "decode_attention_fast.py",
    "decode_attention_cuda": "decode_attention_cuda.py",
    "moe": "moe.py",
    "e2e": "e2e_decode.py",
}


def main(args) -> int:
    p = argparse.ArgumentParser(prog="sqcompile bench")
    p.add_argument("which", nargs="*", default=list(BENCHMARKS), help=f"any of {list(BENCHMARKS)}")
    p.add_argument("--out", default="bench-out", help="directory for the JSON files")
    ns = p.parse_args(getattr(args, "rest", None) or [])
    import torch

    if not torch.cuda.is_available():
        print("sqcompile bench: the benchmarks time GPU kernels and need a CUDA GPU (none found)", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print(f"sqcompile bench: benchmark scripts not found at {root} (run from a source checkout)", file=sys.stderr)
        return 2
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in ns.which:
        if name not in BENCHMARKS:
            print(f"sqcompile bench: unknown benchmark {name!r}; choose from {list(BENCHMARKS)}", file=sys.stderr)
            return 2
        print(f"== {name}", flush=True)
        r = subprocess.run([sys.executable, str(root / BENCHMARKS[name]), "--out", str(out / f"{name}.json")])
        status = status or r.returncode
    return status
