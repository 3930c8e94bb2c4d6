"""Where the host time of one compiled decode step goes (GPU script): cProfile over decode steps of the
Llama-3-8B-shaped model (2 layers) compiled with backend="spectralquant" and a fast-layout SpectralCache, once
per decode kernel (SQCOMPILE_DECODE_KERNEL=cuda / triton). Prints the step time and the top functions.

    PYTHONPATH=$PWD python3 benchmarks/profile_host.py
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from e2e_decode import build_model, fill_spectral  # noqa: E402

import sqcompile  # noqa: E402


def main():
    model = build_model(2)
    for kernel in ("cuda", "triton"):
        os.environ["SQCOMPILE_DECODE_KERNEL"] = kernel
        torch._dynamo.reset()
        step = torch.compile(model.forward, backend=sqcompile.spectralquant)
        cache = fill_spectral(model, 1, 4096, 40, 2.69, "fast")
        x = torch.randint(0, 1000, (1, 1), device="cuda")
        with torch.no_grad():
            for _ in range(5):
                step(input_ids=x, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                step(input_ids=x, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
            pr.disable()
            print(f"\n### kernel={kernel}: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms per step (2 layers, "
                  f"under cProfile)")
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
