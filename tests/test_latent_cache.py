"""Multi-head latent attention (DeepSeek-V3, tiny config, CPU): the cache holds the compressed latent and the shared
RoPE key, not per-head K/V (`sqcompile.latent_cache`). `calibrate` and profile-based compression refuse it with one
clear error; `SpectralCache` keeps its layers exact, so `sqcompile.optimize(model, None).generate` runs and its
greedy tokens equal the eager model's."""
from __future__ import annotations

import pytest
import torch
import transformers

import sqcompile
from sqcompile import SpectralProfile
from sqcompile.cache import ExactLayer, SpectralCache
from sqcompile.calibrate import MomentAccumulator
from sqcompile.profile import model_fingerprint

from test_architectures import EXPECT, build
from test_hf_models import _rel

KV_LORA_RANK = EXPECT["deepseek_v3"][2]["kv_lora_rank"]
ROPE_DIM = EXPECT["deepseek_v3"][2]["qk_rope_head_dim"]


@pytest.fixture(scope="module")
def model():
    return build("deepseek_v3")


def _ids(batch=1, n=12, seed=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_calibrate_refuses_latent_cache(model):
    with pytest.raises(ValueError, match=rf"calibrate: multi-head latent attention .*latent of width {KV_LORA_RANK} "
                                         rf"and a shared RoPE key of width {ROPE_DIM}.*optimize\(model, None"):
        sqcompile.calibrate(model, _ids(2, 64), progress=False)


def test_profile_refused_for_latent_cache(model):
    fp = model_fingerprint(model.config)
    profile = SpectralProfile.random(fp["num_layers"], fp["num_kv_heads"], fp["head_dim"], num_heads=fp["num_heads"])
    with pytest.raises(ValueError, match="optimize with a profile: multi-head latent attention"):
        sqcompile.optimize(model, profile, max_cache_len=32, lower="eager")
    with pytest.raises(ValueError, match="SpectralCache with a profile: multi-head latent attention"):
        SpectralCache(model, profile=profile, max_cache_len=32)


def test_spectral_cache_keeps_latent_layers_exact(model):
    """Eager prefill + 4 greedy steps: logits equal a DynamicCache's (the entries are stored as given), and the
    bytes count the full-precision latent and RoPE key of every token of the capacity."""
    layers, cap, batch = model.config.num_hidden_layers, 24, 2
    cache = SpectralCache(model, max_cache_len=cap)
    assert all(isinstance(l, ExactLayer) for l in cache.layers)
    assert sorted(cache.exact_layers) == list(range(layers))
    assert "multi-head latent attention" in cache.exact_layers[0]
    ref_cache = transformers.DynamicCache(config=model.config)
    x = y = _ids(batch)
    with torch.no_grad():
        for step in range(5):
            a = model(input_ids=x, past_key_values=ref_cache, use_cache=True).logits
            b = model(input_ids=y, past_key_values=cache, use_cache=True).logits
            assert _rel(b, a) < 1e-6, (step, _rel(b, a))
            x, y = a[:, -1:].argmax(-1), b[:, -1:].argmax(-1)
            assert torch.equal(x, y)
    per_token = layers * (KV_LORA_RANK + ROPE_DIM) * 4  # float32, one head (transformers 5.25's layout)
    widths = {(tuple(l.keys.shape), tuple(l.values.shape)) for l in cache.layers}
    if widths == {((batch, 1, cap, KV_LORA_RANK), (batch, 1, cap, ROPE_DIM))}:
        assert cache.packed_bytes_per_token() == per_token
    assert cache.sequence_nbytes == cache.nbytes == batch * cap * cache.packed_bytes_per_token() > 0
    assert cache.constant_nbytes == 0 and cache.sink_nbytes == 0


def test_exact_layer_capacity(model):
    cache = SpectralCache(model, max_cache_len=8)
    with torch.no_grad(), pytest.raises(IndexError, match="max_cache_len=8"):
        model(input_ids=_ids(1, 9), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("quantize", [False, True])
def test_optimize_generate_equals_eager(quantize):
    """The acceptance line of issue #22: `optimize(...).generate` on the tiny DeepSeek-V3 config, tokens equal to
    the eager model's. With quantize=True nothing is quantized either (the layers are exact); the MoE is substituted."""
    model = build("deepseek_v3")
    ids = _ids(1, 16)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    opt = sqcompile.optimize(model, None, max_cache_len=64, lower="eager", quantize=quantize)
    out = opt.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref), (out.tolist(), ref.tolist())
    text = str(opt.report)
    assert "SpectralCache keeps layers [0, 1] exact (uncompressed): multi-head latent attention" in text
    attention = opt.report.by_kind("attention")
    assert attention and not any(s.rewritten for s in attention)
    assert any(s.rewritten for s in opt.report.by_kind("moe"))


def test_value_width_other_than_key_is_a_clear_error():
    """The general checks behind the MLA case: a SpectralLayer and the calibration accumulator name the shapes."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    cache = SpectralCache(config, max_cache_len=8)
    k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"expects values shaped as its keys, \[B, 2, T, 16\], got \(1, 2, 3, 8\)"):
        cache.update(k, v, 0)
    with pytest.raises(ValueError, match=r"keys \(1, 2, 3, 16\) and values \(1, 2, 3, 8\)"):
        MomentAccumulator(1).add(0, k, v)
