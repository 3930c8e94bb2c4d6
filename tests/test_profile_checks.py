"""A profile that does not fit the model is one clear error at the first call, with `SpectralCache`'s wording.

A profile with a different number of layers but the same head shape used to compile and run quantized without a
word (the backend only checked each site's layer index against the profile); `SpectralCache` rejected it. Now the
backend rejects it too, with the same message, when the graph holds the whole decoder stack.
"""
from __future__ import annotations

import pytest
import torch

from sqcompile import SpectralCache, SpectralProfile
from sqcompile.profile import model_fingerprint


@pytest.fixture
def model(tiny_llama):  # conftest's 2-layer Llama: 4 heads, 2 kv-heads, head_dim 16
    return tiny_llama


def _profile(layers, kv_heads=2, head_dim=16):
    return SpectralProfile.random(layers, kv_heads, head_dim, num_heads=4, seed=1)


def _first_call_error(model, profile, quantize=True) -> str:
    torch._dynamo.reset()
    fn = torch.compile(model, backend="spectralquant",
                       options={"profile": profile, "quantize": quantize, "lower": "eager"})
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception) as info, torch.no_grad():
        fn(ids)
    return str(info.value)


def _cache_error(model, profile) -> str:
    with pytest.raises(ValueError) as info:
        SpectralCache(model, profile=profile, max_cache_len=64)
    return str(info.value)


@pytest.mark.parametrize("layers", [3, 1])
@pytest.mark.parametrize("quantize", [True, False])
def test_layer_count_mismatch_is_rejected_like_spectral_cache(model, layers, quantize):
    profile = _profile(layers)
    expected = _cache_error(model, profile)
    assert "num_layers" in expected
    got = _first_call_error(model, profile, quantize)
    assert expected in got, got
    assert got.count("SpectralProfile does not match the model") == 1, got  # one error, said once


def test_head_shape_mismatch_is_one_clear_error(model):
    got = _first_call_error(model, _profile(2, kv_heads=2, head_dim=8))
    assert "SpectralProfile does not match the model" in got and "head_dim" in got, got
    assert "head_dim: profile has 8, model has 16 (attention at layer 0)" in got, got


def test_matching_profile_compiles_and_runs(model):
    fp = model_fingerprint(model.config)
    profile = _profile(fp["num_layers"])
    torch._dynamo.reset()
    fn = torch.compile(model, backend="spectralquant", options={"profile": profile, "quantize": False, "lower": "eager"})
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (fn(ids).logits - model(ids).logits).abs().max().item()
    assert err < 1e-4


def test_one_layer_graph_is_not_taken_for_the_whole_model(model):
    """A graph of one decoder layer compiled alone proves nothing about the model's depth: no error for a profile
    with more layers (the layer's index is within the profile)."""
    layer = model.model.layers[0]
    torch._dynamo.reset()
    fn = torch.compile(layer, backend="spectralquant",
                       options={"profile": _profile(3), "quantize": False, "lower": "eager"})
    x = torch.randn(1, 8, 64)
    pos = torch.arange(8)[None]
    emb = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        fn(x, position_embeddings=emb, position_ids=pos)
