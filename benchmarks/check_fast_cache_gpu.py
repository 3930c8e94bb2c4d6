"""GPU correctness check of the fast-layout SpectralCache path (run before timing it; not a CPU test).

1. `decode_attention_fast` (the op, the Triton and the CUDA kernel) with a padding kv_mask equals its torch reference on fresh random codes,
   output poisoned first (B=8, 32/8 heads, d=128, 4K tokens, ragged lengths).
2. A small Llama (bf16, CUDA) compiled with backend="spectralquant" (Inductor) and a fast-layout SpectralCache:
   a left-padded batch, prefill + 8 decode steps, equals the eager SpectralCache run (logits relative error and
   greedy tokens), every decode site uses decode_attention_fast_write; the packed bytes that differ are counted (bf16
   projections round differently under Inductor, so a few codes may flip).

    PYTHONPATH=$PWD python3 benchmarks/check_fast_cache_gpu.py
"""
from __future__ import annotations

import sys

import torch


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_kernel() -> float:
    from sqcompile.kernels import decode_attention_fast as fa
    from sqcompile.quant.fast_layout import layout_for_budget

    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, H, d, T = 8, 32, 8, 128, 4096
    kl, vl = layout_for_budget(3.25, d)
    xk = torch.randn(B, H, T, d, device="cuda", generator=g)
    xv = torch.randn(B, H, T, d, device="cuda", generator=g)
    kp, vp = kl.quantize(xk), vl.quantize(xv)
    q = torch.randn(B, Hq, d, device="cuda", generator=g, dtype=torch.float16)
    basis = torch.linalg.qr(torch.randn(H, d, d, device="cuda", generator=g))[0]
    kf, vf = kl.column_factor(None, H, "cuda"), vl.column_factor(None, H, "cuda")
    lengths = torch.randint(T // 2, T + 1, (B,), device="cuda", generator=g, dtype=torch.int32)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    for b in range(B):
        mask[b, : 37 * b] = False  # left padding, a different amount per row
    args = (q, kp, vp, lengths, basis, kf, vf, kl.flat_groups(), vl.flat_groups(), d ** -0.5)
    ref = fa.decode_attention_fast_reference(*args, kv_mask=mask)
    out = fa.decode_attention_fast_triton(*args, poison=True, kv_mask=mask)
    op = torch.ops.sqcompile.decode_attention_fast(*args, kv_mask=mask)
    from sqcompile.kernels import decode_attention_cuda as dc
    cu = dc.decode_attention_fast_cuda(*args, kv_mask=mask, poison=True)
    torch.cuda.synchronize()
    print(f"kernel vs reference: triton {rel(out, ref):.2e}, op {rel(op, ref):.2e}, cuda {rel(cu, ref):.2e}")
    return max(rel(out, ref), rel(op, ref), rel(cu, ref))


def check_model() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import sqcompile
    from sqcompile.cache import SpectralCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1, 512, (2, 40), device="cuda")
    attn = torch.ones_like(ids)
    attn[1, :9] = 0
    ids[1, :9] = 0
    step = torch.compile(model.forward, backend=sqcompile.spectralquant)  # PYTHONPATH checkout: no entry point
    caches = [SpectralCache(model, bits=3.25, max_cache_len=64, layout="fast") for _ in range(2)]
    from sqcompile.kernels import decode_attention_cuda as dc
    calls0 = dc.STATS["calls"]
    worst, same, x, mask = 0.0, True, ids, attn
    with torch.no_grad():
        for i in range(9):  # prefill + 8 decode steps
            a = model(input_ids=x, attention_mask=mask, past_key_values=caches[0], use_cache=True).logits.float()
            b = step(input_ids=x, attention_mask=mask, past_key_values=caches[1], use_cache=True).logits.float()
            worst = max(worst, rel(b[:, -1], a[:, -1]))
            same &= bool(torch.equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1)))
            x = a[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        report = sqcompile.explain(model.forward, input_ids=x, attention_mask=mask, past_key_values=caches[1])
    written = sum(int((le.keys != lc.keys).sum() + (le.values != lc.values).sum())
                  for le, lc in zip(caches[0].layers, caches[1].layers))
    return {"worst_rel": worst, "same_tokens": same, "kernels": [s.kernel for s in report.sites],
            "bytes_differing": written, "cuda_kernel_calls": dc.STATS["calls"] - calls0}


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    k = check_kernel()
    m = check_model()
    # bf16: the compiled projections round differently from eager, so a few codes may flip; report them
    # decode steps: the write and the attention in one op (decode_attention_fast_write) since the sixth session
    ok = k < 2e-3 and m["worst_rel"] < 5e-2 and m["kernels"] == ["decode_attention_fast_write"] * 2
    print(f"{torch.cuda.get_device_name()}: kernel vs reference (kv_mask) rel {k:.2e}; model compiled vs eager "
          f"rel {m['worst_rel']:.2e}, same greedy tokens {m['same_tokens']}, sites {m['kernels']}, "
          f"packed bytes differing {m['bytes_differing']}, CUDA decode kernel launches {m['cuda_kernel_calls']} "
          f"-> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
