"""NVRTC compile time of the CUDA decode kernel's three kernels: one compile + one module load
(`decode_attention_cuda._compile_all`) against one `torch.cuda._compile_kernel` per kernel. GPU script:

    PYTHONPATH=$PWD python3 benchmarks/nvrtc_compile_time.py
"""
import time

import torch

from sqcompile.kernels import decode_attention_cuda as dc
from sqcompile.quant.fast_layout import layout_for_budget

torch.cuda.init()
for bits in (2.69, 3.25):
    kl, vl = layout_for_budget(bits, 128, align=2)
    a, b = dc._Plan(128, 4, kl, vl, 4, 4), dc._Plan(128, 4, kl, vl, 4, 3)  # two sources: no NVRTC cache between
    t = time.perf_counter()
    got = dc._compile_all(a.source)
    one = time.perf_counter() - t
    t = time.perf_counter()
    for n in dc.KERNELS:
        torch.cuda._compile_kernel(b.source, n)
    three = time.perf_counter() - t
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} bits {bits}: one compile "
          f"{'ok' if len(got) == 3 else 'UNAVAILABLE'} {one:.2f} s, three compiles {three:.2f} s")
