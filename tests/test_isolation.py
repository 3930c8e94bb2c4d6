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


# name -> (config class, model class, vocab, hidden size, layers, bits, cache); 4 heads, 2 kv-heads each
MODELS = {
    "a": (LlamaConfig, LlamaForCausalLM, 128, 64, 2, 4.25, "spectral"),
    "b": (Qwen2Config, Qwen2ForCausalLM, 96, 128, 3, 3.25, "static"),
}


def _make(name: str, seed: int):
    config_cls, model_cls, vocab, hidden, layers, bits, cache = MODELS[name]
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     attn_implementation="sdpa")
    model = model_cls(cfg).eval()
    profile = SpectralProfile.random(layers, 2, hidden // 4, num_heads=4, seed=seed + 10, mean_scale=0.3)
    options = {"profile": profile, "bits": bits, "lower": "eager"}
    if cache == "spectral":
        return model, lambda: SpectralCache(model, profile=profile, bits=bits, max_cache_len=32), options
    return model, lambda: StaticCache(config=cfg, max_cache_len=32), options


class Driver:
    """One compiled model fed its own greedy picks, one step per `step()`; keeps every step's logits."""

    def __init__(self, name: str, seed: int):
        model, new_cache, options = _make(name, seed)
        self.step_fn = torch.compile(model.forward, backend="spectralquant", options=options)
        self.kv = {cache_kwarg(model): new_cache()}
        self.x = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed))
        self.logits: list[torch.Tensor] = []

    def step(self) -> None:
        with torch.no_grad():
            logits = self.step_fn(input_ids=self.x, use_cache=True, **self.kv).logits[:, -1]
        self.logits.append(logits.clone())
        self.x = logits.argmax(-1, keepdim=True)


def _alone(name, seed):
    torch._dynamo.reset()
    d = Driver(name, seed)
    for _ in range(STEPS):
        d.step()
    return d.logits


def test_two_compiled_models_in_turns_equal_each_alone():
    alone_a, alone_b = _alone("a", 1), _alone("b", 2)
    torch._dynamo.reset()
    a, b = Driver("a", 1), Driver("b", 2)
    for _ in range(STEPS):
        a.step()
        b.step()
    for got, want in ((a.logits, alone_a), (b.logits, alone_b)):
        assert len(got) == len(want) == STEPS
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"step {i}: max diff {(g - w).abs().max().item()}"
