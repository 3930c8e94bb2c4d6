"""The backend on a model sharded across processes (tensor parallel, PyTorch DTensor): each rank compresses and
attends over its own kv-heads and holds 1/N of the packed KV cache.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py            # CPU, gloo (also 4: 8 query / 4 kv-heads)
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --device cuda   # one GPU per rank, NCCL

Every rank builds the same small random Llama, shards it with `sqcompile.parallel.parallelize` (q/k/v colwise,
o_proj rowwise, MLP colwise/rowwise: transformers' tp_plan for Llama), compiles it with backend="spectralquant"
and generates with a `SpectralCache`. Rank 0 prints the backend's report (its heads: 8/N query, 4/N kv per
layer), each rank's packed cache bytes, and the greedy tokens and logits beside those of the unsharded model
compiled the same way (computed on every rank before sharding).
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

import sqcompile
from sqcompile import parallel

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--bits", type=float, default=4.25)
p.add_argument("--new-tokens", type=int, default=16)
p.add_argument("--lower", default="inductor", choices=["inductor", "eager"], help="eager: skip Inductor (faster on CPU)")
args = p.parse_args()

rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if args.device == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
mesh = init_device_mesh(args.device, (world,))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

torch.manual_seed(0)  # the same model and profile on every rank
config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=512)
model = LlamaForCausalLM(config).eval().to(args.device)
profile = sqcompile.SpectralProfile.random(2, 4, 16, num_heads=8, seed=1)
# a real one: sqcompile.calibrate(model, texts), here or on every rank after parallelize (the same profile)
ids = torch.randint(3, 256, (1, 24), device=args.device)
options = {"profile": profile, "bits": args.bits, "lower": args.lower}
# No outlier slots: a rank picks its outliers by its own kv-heads' keys, the unsharded cache by all of them
# (sqcompile.parallel), so only without them do both hold the same codes and give the same logits.
cache_kwargs = dict(bits=args.bits, max_cache_len=ids.shape[1] + args.new_tokens, outlier_tokens=0)
gen_kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True)

# The unsharded model, compiled the same way (the reference the sharded run must reproduce).
single = copy.deepcopy(model)
single.forward = torch.compile(single.forward, backend="spectralquant", options=options)
ref_cache = sqcompile.SpectralCache(single, profile, **cache_kwargs)
with torch.no_grad():
    ref = single.generate(ids, past_key_values=ref_cache, **gen_kwargs)
del single
torch._dynamo.reset()

parallel.parallelize(model, mesh)  # raises if the heads do not divide by the world size
report = sqcompile.explain(model, ids, options=options)  # every rank runs it (the all-reduce needs all ranks)
model.forward = torch.compile(model.forward, backend="spectralquant", options=options)
cache = sqcompile.SpectralCache(model, profile, **cache_kwargs)  # this rank's kv-heads only
with torch.no_grad():
    out = model.generate(ids, past_key_values=cache, **gen_kwargs)

held = [None] * world
dist.all_gather_object(held, (cache.codec.config["kv_heads"], cache.nbytes))
if rank == 0:
    print(report)
    for r, (heads, nbytes) in enumerate(held):
        print(f"rank {r}: kv-heads [{heads[0]}, {heads[1]}), packed KV {nbytes} bytes "
              f"({nbytes / ref_cache.nbytes:.3f} of the unsharded cache's {ref_cache.nbytes})")
    print("unsharded:", ref.sequences[0, ids.shape[1]:].tolist())
    print("sharded:  ", out.sequences[0, ids.shape[1]:].tolist())
    a, b = torch.stack(out.logits), torch.stack(ref.logits)
    print(f"max |sharded - unsharded| logits / max |logits| = {((a - b).abs().max() / b.abs().max()).item():.2e}")
dist.destroy_process_group()
