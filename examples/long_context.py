"""Long-context decode on a GPU: a Llama-3-8B-shaped model (random bf16 weights) generating with a SpectralCache
that holds 6x more context than FP16 in the same memory. `python examples/long_context.py [--context 65536]`"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sqcompile
from sqcompile.calibrate import cache_kwarg

ap = argparse.ArgumentParser()
ap.add_argument("--context", type=int, default=65536)
ap.add_argument("--layers", type=int, default=32)
ap.add_argument("--bits", type=float, default=2.69)
args = ap.parse_args()
if not torch.cuda.is_available():
    raise SystemExit("examples/long_context.py needs a CUDA GPU (try examples/smollm2_generate.py on CPU)")

cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=args.context + 64)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
opt = sqcompile.optimize(model, bits=args.bits, max_cache_len=args.context + 64)
cache = opt.cache()
kv = {cache_kwarg(model): cache}  # `cache=` from transformers 5.25 on, `past_key_values=` before
prompt = torch.randint(0, 1000, (1, args.context), device="cuda")
t0 = time.time()
with torch.no_grad():
    for i in range(0, args.context, 4096):  # chunked prefill into the compressed cache
        model(input_ids=prompt[:, i:i + 4096], use_cache=True, **kv)
    torch.cuda.synchronize()
    prefill = time.time() - t0
    x = prompt[:, -1:]
    t0 = time.time()
    for _ in range(32):
        x = model(input_ids=x, use_cache=True, **kv).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
fp16 = cfg.num_hidden_layers * 8 * 128 * 2 * 2 * (args.context + 64)
print(f"context {args.context}: KV {cache.nbytes / 2**30:.2f} GiB (FP16 would be {fp16 / 2**30:.2f} GiB, "
      f"{fp16 / cache.nbytes:.2f}x); prefill {prefill:.1f}s; decode {32 / (time.time() - t0):.1f} tok/s")
