"""HF decoder models under the backend in rotation-only mode: logits equal eager, every layer's attention is
rewritten, the user's module is untouched. StaticCache and DynamicCache; prefill of 16 tokens then 8 greedy
decode steps (issue #2)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import sqcompile
from sqcompile import SpectralProfile

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _model(arch: str):
    import transformers

    torch.manual_seed(0)
    kw = dict(SMALL)
    if arch == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    cls_cfg, cls_model = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    }[arch]
    config = getattr(transformers, cls_cfg)(**kw)
    model = getattr(transformers, cls_model)(config).eval()
    with torch.no_grad():  # non-trivial biases (Qwen2 has q/k/v biases)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _cache(kind: str, config):
    if kind == "static":
        return StaticCache(config=config, max_cache_len=64)
    return DynamicCache(config=config)


def _decode(fn, model, kind, ids, steps=8):
    cache = _cache(kind, model.config)
    logits, x = [], ids
    with torch.no_grad():
        for _ in range(steps + 1):
            out = fn(input_ids=x, past_key_values=cache, use_cache=True).logits
            logits.append(out[:, -1])
            x = out[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["static", "dynamic"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "mixtral"])
def test_rotation_only_equals_eager(arch, kind):
    torch._dynamo.reset()
    model = _model(arch)
    cfg = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    profile = SpectralProfile.random(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                                     num_heads=cfg.num_attention_heads, seed=3, mean_scale=0.5)
    assert profile.key_mean.abs().min() > 0 and profile.value_mean.abs().min() > 0
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    eager = _decode(model, model, kind, ids)
    compiled_fn = torch.compile(model.forward, backend="spectralquant",
                                options={"quantize": False, "profile": profile, "lower": "eager"})
    compiled = _decode(compiled_fn, model, kind, ids)
    assert _rel(compiled, eager) < 1e-4
    # The user's module is not mutated, and eager calls still give the original results.
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(_decode(model, model, kind, ids), eager)

    report = sqcompile.explain(model, input_ids=ids, past_key_values=_cache(kind, cfg),
                               options={"quantize": False, "profile": profile})
    for g in report.graphs:
        att = report.by_kind("attention", g)
        assert len(att) == cfg.num_hidden_layers, str(report)
        assert sorted(s.layer for s in att) == list(range(cfg.num_hidden_layers))
        assert all(s.rewritten and s.rotation and s.o_proj_folded and s.rope for s in att), str(report)
        assert all((s.q_heads, s.kv_heads, s.head_dim) == (4, 2, 16) for s in att)
        assert all(s.kv_write == ("index_copy" if kind == "static" else "cat") for s in att)
    if arch == "mixtral":
        moe = report.by_kind("moe")
        assert len(moe) == cfg.num_hidden_layers, str(report)
        assert sorted(s.layer for s in moe) == list(range(cfg.num_hidden_layers))


def test_random_rotation_without_profile_equals_eager():
    torch._dynamo.reset()
    model = _model("llama")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    eager = _decode(model, model, "dynamic", ids, steps=3)
    fn = torch.compile(model.forward, backend="spectralquant", options={"quantize": False, "lower": "eager"})
    assert _rel(_decode(fn, model, "dynamic", ids, steps=3), eager) < 1e-4


@pytest.mark.slow
def test_inductor_lowering_equals_eager():
    """The default lowering (Inductor, C++ on CPU) over the rewritten graph: one model, DynamicCache."""
    torch._dynamo.reset()
    model = _model("qwen2")
    cfg = model.config
    profile = SpectralProfile.random(2, 2, 16, num_heads=4, seed=4)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    eager = _decode(model, model, "static", ids, steps=2)
    fn = torch.compile(model.forward, backend="spectralquant", options={"quantize": False, "profile": profile})
    assert _rel(_decode(fn, model, "static", ids, steps=2), eager) < 1e-4


def test_quantized_write_error_shrinks_with_bits():
    """quantize=True (TurboQuant stand-in, no profile): the logits' error falls as the bit budget grows."""
    torch._dynamo.reset()
    model = _model("llama")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    eager = _decode(model, model, "static", ids, steps=1)
    errors = []
    for bits in (2.69, 4.25, 12.0):
        torch._dynamo.reset()
        fn = torch.compile(model.forward, backend="spectralquant", options={"bits": bits, "lower": "eager"})
        errors.append(_rel(_decode(fn, model, "static", ids, steps=1), eager))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2 and errors[0] < 0.5, errors
