"""Two models compiled in one process, driven in turns, each give exactly what they give alone: no state leaks
between compiles through module globals or caches keyed on addresses.

Model A: a tiny Llama (head_dim 16) with its profile at 4.25 bits, read through a `SpectralCache`. Model B: a
tiny Qwen2 (head_dim 32, 3 layers) with another profile at 3.25 bits, quantized inside the compiled graph over
a plain HF `StaticCache`."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache

from sqcompile import SpectralCache, SpectralProfile
from sqcompile.calibrate import cache_kwarg

STEPS = 6


def _model_a():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    profile = SpectralProfile.random(2, 2, 16, num_heads=4, seed=11, mean_scale=0.3)
    options = {"profile": profile, "bits": 4.25, "lower": "eager"}
    return model, lambda: SpectralCache(model, profile=profile, bits=4.25, max_cache_len=32), options


def _model_b():
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=96, hidden_size=128, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).eval()
    profile = SpectralProfile.random(3, 2, 32, num_heads=4, seed=12, mean_scale=0.3)
    options = {"profile": profile, "bits": 3.25, "lower": "eager"}
    return model, lambda: StaticCache(config=cfg, max_cache_len=32), options


class Driver:
    """One compiled model fed its own greedy picks, one step per `step()`; keeps every step's logits."""

    def __init__(self, make, seed: int):
        model, new_cache, options = make()
        self.step_fn = torch.compile(model.forward, backend="spectralquant", options=options)
        self.kv = {cache_kwarg(model): new_cache()}
        self.x = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed))
        self.logits: list[torch.Tensor] = []

    def step(self) -> None:
        with torch.no_grad():
            logits = self.step_fn(input_ids=self.x, use_cache=True, **self.kv).logits[:, -1]
        self.logits.append(logits.clone())
        self.x = logits.argmax(-1, keepdim=True)


def _alone(make, seed):
    torch._dynamo.reset()
    d = Driver(make, seed)
    for _ in range(STEPS):
        d.step()
    return d.logits


def test_two_compiled_models_in_turns_equal_each_alone():
    alone_a, alone_b = _alone(_model_a, 3), _alone(_model_b, 4)
    torch._dynamo.reset()
    a, b = Driver(_model_a, 3), Driver(_model_b, 4)
    for _ in range(STEPS):
        a.step()
        b.step()
    for got, want in ((a.logits, alone_a), (b.logits, alone_b)):
        assert len(got) == len(want) == STEPS
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"step {i}: max diff {(g - w).abs().max().item()}"
