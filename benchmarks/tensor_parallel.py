"""Tensor-parallel decode on N GPUs (NCCL): a Llama-3-8B-shaped model (random weights, bf16) sharded with
`sqcompile.parallel.parallelize` (q/k/v/gate/up colwise, o_proj/down rowwise), one decode step timed per row:

    inductor   torch.compile (Inductor) + StaticCache            (each rank: its kv-heads in FP16/bf16)
    sqcompile  backend="spectralquant" + SpectralCache            (each rank: its kv-heads' packed codes)

At each (context, batch) the caches are filled by one prefill of `context` random tokens through the compiled
model, then `--steps` greedy decode steps are timed (synchronized per step, as HF generate does; the median is
reported). Each rank's KV bytes are reported too (the packed cache holds 1/N of the unsharded one's).

    torchrun --nproc-per-node 8 benchmarks/tensor_parallel.py --out tp.json [--layers 8] [--contexts 4096 32768]
             [--batches 1 8] [--cudagraphs]
    # smoke test on CPU with gloo (tiny shapes):
    torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --device cpu --tiny --layers 2 --contexts 32 --batches 1 \
             --steps 3 --lower eager
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=16, vocab_size=256)
    else:  # Llama-3-8B
        shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=128256)
    cfg = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=max(args.contexts) + args.steps + 8,
                      **shape)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def time_decode(model, cache, context, batch, steps, vocab, device):
    """(median ms per decode step, last logits) after a prefill of `context` tokens into `cache`."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, context), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            x = logits.argmax(-1, keepdim=True)
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1]
            sync()
            times.append(1e3 * (time.perf_counter() - t0))
    warm = times[2:] if len(times) > 4 else times[1:] or times
    return statistics.median(warm), logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="a tiny Llama (8 heads, 4 kv-heads, head_dim 16) for CPU")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bits", type=float, default=2.69)
    p.add_argument("--layout", default="fast", choices=["fast", "planes"])
    p.add_argument("--cudagraphs", action="store_true")
    p.add_argument("--lower", default="inductor", choices=["inductor", "eager"],
                   help="eager: both rows without Inductor (a quick CPU smoke test; no timing meaning)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import transformers

    import sqcompile
    from sqcompile import parallel
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    mesh = init_device_mesh(args.device, (world,))
    model = build_model(args, device)
    cfg = model.config
    parallel.parallelize(model, mesh)
    profile = sqcompile.SpectralProfile.random(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                               num_heads=cfg.num_attention_heads, seed=0)
    forward = model.forward
    rows = []
    for name in ("inductor", "sqcompile"):
        torch._dynamo.reset()
        if name == "inductor":
            model.forward = torch.compile(forward, backend="inductor" if args.lower == "inductor" else "eager",
                                          mode="reduce-overhead" if args.cudagraphs else None)
        else:
            model.forward = torch.compile(forward, backend="spectralquant", options={
                "profile": profile, "bits": args.bits, "layout": args.layout, "cudagraphs": args.cudagraphs,
                "lower": args.lower})
        for context in args.contexts:
            for batch in args.batches:
                cap = context + args.steps + 8
                if name == "inductor":
                    cache = transformers.StaticCache(config=cfg, max_cache_len=cap)
                else:
                    cache = sqcompile.SpectralCache(model, profile, bits=args.bits, max_cache_len=cap,
                                                    max_batch_size=batch, layout=args.layout)
                ms, _ = time_decode(model, cache, context, batch, args.steps, cfg.vocab_size, device)
                kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
                held = [None] * world
                dist.all_gather_object(held, (ms, kv))
                rows.append(dict(row=name, context=context, batch=batch, world=world,
                                 ms_per_step=[h[0] for h in held], kv_bytes_per_rank=[h[1] for h in held]))
                del cache
    if rank == 0:
        print(f"{world} ranks, {args.device}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / "
              f"{cfg.num_key_value_heads} kv-heads, head_dim {cfg.head_dim}, bits {args.bits} ({args.layout})")
        print("| row | context | batch | ms/step (max over ranks) | KV bytes per rank |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['row']} | {r['context']} | {r['batch']} | {max(r['ms_per_step']):.3f} | "
                  f"{r['kv_bytes_per_rank'][0]} |")
        for r in rows:
            if r["row"] == "sqcompile":
                base = next(b for b in rows if b["row"] == "inductor" and (b["context"], b["batch"]) ==
                            (r["context"], r["batch"]))
                print(f"context {r['context']} batch {r['batch']}: sqcompile {max(base['ms_per_step']) / max(r['ms_per_step']):.2f}x "
                      f"Inductor, KV bytes {base['kv_bytes_per_rank'][0] / r['kv_bytes_per_rank'][0]:.2f}x smaller")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
