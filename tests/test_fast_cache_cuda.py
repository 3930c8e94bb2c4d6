"""The fast-layout SpectralCache path on a CUDA GPU.

1. `decode_attention_fast` (the registered op, the Triton kernel and the CUDA kernel) with a padding kv_mask equals
   its torch reference on fresh random codes, outputs poisoned first (B=8, 32/8 heads, d=128, 4K tokens, ragged
   lengths).
2. A small bf16 Llama compiled with backend="spectralquant" (Inductor) and a fast-layout SpectralCache: a left-padded
   batch, prefill + 8 decode steps, gives the eager SpectralCache run's logits (bf16 projections round differently
   under Inductor, so a few codes may flip: relative error under 5e-2), and every decode site is the fused
   `decode_attention_fast_write`.
"""
from __future__ import annotations

import re

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_fast_decode_kernels_match_reference_with_padding_mask():
    from sqcompile.kernels import decode_attention_cuda as dc
    from sqcompile.kernels import decode_attention_fast as fa
    from sqcompile.quant.fast_layout import layout_for_budget

    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, H, d, T = 8, 32, 8, 128, 4096
    kl, vl = layout_for_budget(3.25, d)
    kp = kl.quantize(torch.randn(B, H, T, d, device="cuda", generator=g))
    vp = vl.quantize(torch.randn(B, H, T, d, device="cuda", generator=g))
    q = torch.randn(B, Hq, d, device="cuda", generator=g, dtype=torch.float16)
    basis = torch.linalg.qr(torch.randn(H, d, d, device="cuda", generator=g))[0]
    kf, vf = kl.column_factor(None, H, "cuda"), vl.column_factor(None, H, "cuda")
    lengths = torch.randint(T // 2, T + 1, (B,), device="cuda", generator=g, dtype=torch.int32)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    for b in range(B):
        mask[b, : 37 * b] = False  # left padding, a different amount per row
    args = (q, kp, vp, lengths, basis, kf, vf, kl.flat_groups(), vl.flat_groups(), d ** -0.5)
    ref = fa.decode_attention_fast_reference(*args, kv_mask=mask)
    triton_out = fa.decode_attention_fast_triton(*args, poison=True, kv_mask=mask)
    op_out = torch.ops.sqcompile.decode_attention_fast(*args, kv_mask=mask)
    cuda_out = dc.decode_attention_fast_cuda(*args, kv_mask=mask, poison=True)
    torch.cuda.synchronize()
    for name, out in (("triton", triton_out), ("op", op_out), ("cuda", cuda_out)):
        assert _rel(out, ref) < 2e-3, f"{name}: relative error {_rel(out, ref):.2e} against the torch reference"


def test_compiled_fast_cache_matches_eager_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    import sqcompile
    from sqcompile.cache import SpectralCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1, 512, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    step = torch.compile(model.forward, backend=sqcompile.spectralquant)
    eager_cache, compiled_cache = (SpectralCache(model, bits=3.25, max_cache_len=64, layout="fast") for _ in range(2))
    worst, x = 0.0, ids
    with torch.no_grad():
        for _ in range(9):  # prefill + 8 decode steps
            a = model(input_ids=x, attention_mask=mask, past_key_values=eager_cache, use_cache=True).logits.float()
            b = step(input_ids=x, attention_mask=mask, past_key_values=compiled_cache, use_cache=True).logits.float()
            worst = max(worst, _rel(b[:, -1], a[:, -1]))
            x = a[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        report = sqcompile.explain(model.forward, input_ids=x, attention_mask=mask, past_key_values=compiled_cache)
    assert worst < 5e-2, f"compiled vs eager logits: relative error {worst:.2e}"
    # the CUDA kernel, or (a layout it does not support) Triton with the reason
    assert len(report.sites) == 2 and all(re.fullmatch(r"decode_attention_fast_write \((cuda|triton; CUDA kernel: .+)\)",
                                                       s.kernel) for s in report.sites), str(report)
