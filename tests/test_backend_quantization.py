"""The backend's simulated compression with a plain cache (rotation, then `SpectralCache`'s view at the read: codes,
sink, outlier slots, exact new tokens) computes the same model as the Cache-API simulation used by the evaluation
with the same slots (quantize in storage coordinates, store dequantized K/V, put the exact tokens back)."""
from __future__ import annotations

import torch
from transformers import StaticCache

from sqcompile import SpectralProfile
from sqcompile.evaluate import EvalState, simulated_cache
from sqcompile.kernels.sink import OUTLIER_TOKENS
from sqcompile.quant import build_codec


def test_compiled_quantization_matches_cache_simulation(tiny_llama):
    model = tiny_llama
    cfg = model.config
    torch._dynamo.reset()
    profile = SpectralProfile.random(cfg.num_hidden_layers, cfg.num_key_value_heads, 16, num_heads=4, seed=5,
                                     mean_scale=0.3)
    bits = 4.25
    codec = build_codec(profile, bits=bits)
    ids = torch.randint(0, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    step = torch.compile(model.forward, backend="spectralquant",
                         options={"profile": profile, "bits": bits, "lower": "eager"})
    static = StaticCache(config=cfg, max_cache_len=64)
    sim = simulated_cache(EvalState(codec, (), keep_sink=True, exact_fresh=True, outlier_tokens=OUTLIER_TOKENS), cfg)
    with torch.no_grad():
        for i in range(0, 48, 16):  # chunks attend to the quantized cache of earlier chunks
            x = ids[:, i:i + 16]
            a = step(input_ids=x, past_key_values=static, use_cache=True).logits
            b = model(input_ids=x, past_key_values=sim, use_cache=True).logits
            fp = model(input_ids=ids[:, :i + 16], use_cache=False).logits[:, i:] if i == 16 else None
            rel = ((a - b).norm() / b.norm()).item()
            assert rel < 2e-3, (i, rel)
            if fp is not None:  # and quantization did change something
                assert ((a - fp).norm() / fp.norm()).item() > 10 * rel
