"""Per-kernel device times of the CUDA decode op (sq_fast_query / sq_fast_decode / sq_fast_merge) from
torch.profiler over CUDA-graph replays: B=8, 32/8 heads, d=128, 2.69 bits, S in {4K, 16K, 64K}, per_sm 2/4/8.
GPU script (not a test):

    PYTHONPATH=$PWD python3 benchmarks/profile_decode_kernels.py
"""
import math, sys, torch
sys.path.insert(0, "benchmarks")
from decode_attention_fast import FastSetup
from sqcompile.kernels import decode_attention_cuda as dc
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda"); gen = torch.Generator(device=dev).manual_seed(0)
st = FastSetup(2.69, 8, 128, dev, gen, align=2)
for S in [4096, 16384, 65536]:
    kp, vp = st.fill(8, 8, S, 128, dev, gen)
    q = torch.randn(8, 32, 128, device=dev, generator=gen).half()
    L = torch.full((8,), S, device=dev, dtype=torch.int32)
    for per_sm in (2, 4, 8):
        f = lambda: dc.decode_attention_fast_cuda(q, kp, vp, L, scale=1 / math.sqrt(128), **st.args, warps=4, stages=4, per_sm=per_sm)
        for _ in range(5): f()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20): f()
        g.replay(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay(); torch.cuda.synchronize()
        ev = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                ev.setdefault(e.name, []).append(e.device_time)
        s = " ".join(f"{k[:16]}={sum(v)/len(v):.1f}us(n{len(v)})" for k, v in ev.items())
        st_ = dc._LAUNCHES[[k for k in dc._LAUNCHES if k[3] == tuple(kp.shape) and k[-1] == per_sm][0]]
        print(f"S={S} per_sm={per_sm} nsplit={st_.nsplit}: {s}", flush=True)
    del kp, vp
