"""Attention sinks (GPT-OSS): softmax over [scores, one learned logit per head], the sink's column dropped.

The detector proves the form (`detect_attention._sink_attention`), keeps the key mean in the keys (the sink logit
does not move with q . mu_k) and gives the dropped column the storage-basis value of a zero model-basis value
(`insert_sink_value`), so the value-mean fold stays exact. These tests check, on a tiny random GPT-OSS:

- over a plain DynamicCache / StaticCache with quantization, the compiled model reads what `SpectralCache` would
  give it (the logits of the eager model over a `SpectralCache`);
- `sqcompile.optimize(...).generate` (a `SpectralCache` under the backend, whose decode steps run the decode op with
  the sink logit as one more softmax term) gives the eager `SpectralCache` model's tokens.

The rotation-only exactness (logits equal eager within 1e-4) is the GPT-OSS row of tests/test_architectures.py.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from sqcompile.cache import SpectralCache
from sqcompile.profile import SpectralProfile, model_fingerprint

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, num_local_experts=4, num_experts_per_tok=2)
SCHEDULE = ((0, 12), (12, 16), (16, 20), *((i, i + 1) for i in range(20, 30)))  # a prompt, chunks, decode steps


def gpt_oss(layer_types=("full_attention", "full_attention"), sliding_window=8):
    """A tiny random GPT-OSS with sink logits and biases far from zero (the sink takes a real share)."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**TINY, sliding_window=sliding_window, layer_types=list(layer_types))
    config._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            if name.endswith("sinks"):
                p.normal_(1.0, 1.0)
    return model


def profile_of(model, seed=4):
    fp = model_fingerprint(model.config)
    return SpectralProfile.random(fp["num_layers"], fp["num_kv_heads"], fp["head_dim"], num_heads=fp["num_heads"],
                                  seed=seed, mean_scale=0.5)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_backend_with_a_plain_cache_equals_spectral_cache(kind):
    """Quantized, over a plain cache: the compiled GPT-OSS gives the eager GPT-OSS's logits over SpectralCache."""
    torch._dynamo.reset()
    model = gpt_oss()
    profile = profile_of(model)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(5))
    sink = []
    from sqcompile import backend

    step = torch.compile(model.forward, backend="spectralquant",
                         options={"profile": profile, "bits": 2.69, "lower": "eager"})
    plain = transformers.DynamicCache(config=model.config) if kind == "dynamic" else \
        transformers.StaticCache(config=model.config, max_cache_len=32)
    real = SpectralCache(model, profile, bits=2.69, max_cache_len=32)
    worst = 0.0
    token = backend._REPORT_SINK.set(sink)
    try:
        with torch.no_grad():
            for a, b in SCHEDULE:
                got = step(input_ids=ids[:, a:b], past_key_values=plain, use_cache=True).logits
                want = model(input_ids=ids[:, a:b], past_key_values=real, use_cache=True).logits
                worst = max(worst, rel(got, want))
            exact = model(input_ids=ids).logits[:, -1:]
    finally:
        backend._REPORT_SINK.reset(token)
    attention = [s for s in sink if s.kind == "attention"]
    assert attention and all(s.rewritten and s.quantized and s.form == "eager+sinks" for s in attention), attention
    assert worst < 1e-4, worst
    assert rel(want, exact) > 1e-2  # the cache really quantizes
