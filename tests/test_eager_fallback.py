"""No silent wrong answer across frames: when dynamo would run a frame eagerly after the backend rotated its KV
cache (the recompile limit), sqcompile raises a clear error naming the cause and the fix."""
from __future__ import annotations

import pytest
import torch
import transformers


@pytest.fixture
def model(tiny_llama):  # conftest's 2-layer Llama: 4 heads, 2 kv-heads, head_dim 16
    return tiny_llama


def _decode(fn, model, steps):
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = fn(input_ids=nxt, past_key_values=cache, use_cache=True)
    return out.logits


def test_recompile_limit_on_a_rotated_cache_is_an_error(model):
    torch._dynamo.reset()
    fn = torch.compile(model, backend="spectralquant", options={"quantize": False, "lower": "eager"})
    # prefill, first decode step, dynamic decode: three compiles; a limit of 2 means the third would run eagerly
    with torch._dynamo.config.patch(recompile_limit=2), pytest.raises(Exception) as info:
        _decode(fn, model, steps=4)
    text = str(info.value)
    assert "recompile_limit (2)" in text and "rotated" in text and "Fix:" in text, text


def test_within_the_limit_runs_and_equals_eager(model):
    torch._dynamo.reset()
    expected = _decode(model, model, steps=4)
    fn = torch.compile(model, backend="spectralquant", options={"quantize": False, "lower": "eager"})
    got = _decode(fn, model, steps=4)
    assert (got - expected).abs().max().item() < 1e-4
