"""Gated attention output (Qwen3-Next, Qwen3.5: `o_proj(attn * sigmoid(gate))`, issue #22 item 5).

The elementwise gate sees each feature of the model-basis attention output, so o_proj cannot absorb the inverse value
rotation. The backend folds the value rotation into v_proj as usual (values stored rotated, centered and quantized)
and undoes it on the attention output right after attention (`insert_output_rotation`), before the gate. Checked on
tiny configs with every layer full attention (not hybrids, so `SpectralCache` and `sqcompile.optimize` take them;
tests/test_hybrid_models.py runs the hybrid layouts through the plain cache):

- rotation only: the logits of a prefill and greedy steps equal eager within 1e-4 (with attention biases here; the
  rows of tests/test_architectures.py run them without), and `explain` shows every attention site rewritten with the
  output rotation at the read;
- quantized through a `SpectralCache` (fast layout here; the bit-plane layout and the in-graph quantization over a
  plain StaticCache, equal to the Cache-API simulation, are the qwen3_next rows of tests/test_architectures.py): the
  compiled model (decode kernels on the packed codes, output rotation after them) equals the eager model over its own
  `SpectralCache` step by step, and `sqcompile.optimize(...).generate` gives the eager model's greedy tokens;
- mutants: without the output rotation, or without its value mean, the logits are far from eager.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import sqcompile
from sqcompile import backend
from sqcompile.backend import spectralquant
from sqcompile.cache import SpectralCache, non_attention_layers
from sqcompile.report import Report
from test_architectures import compiled_decode, random_profile  # noqa: E402
from test_hf_models import _decode as decode  # noqa: E402
from test_hf_models import _rel as rel  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=16)
GATED = {
    # MoE with a gated shared expert; q_proj holds [query | gate] per head
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(num_hidden_layers=2, layer_types=["full_attention"] * 2, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
                dict(num_hidden_layers=2, layer_types=["full_attention"] * 2)),
}


def build(arch: str, impl: str = "sdpa", bias: bool = False):
    cfg_name, model_name, kw = GATED[arch]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**BASE, **kw, attention_bias=bias)
    config._attn_implementation = impl
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # non-trivial biases: the value mean moves them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    assert non_attention_layers(config) == {}  # every layer attention: not a hybrid
    return model


def assert_gated_sites(report, layers, spectral=False):
    assert report.graphs, str(report)
    for g in report.graphs:
        att = report.by_kind("attention", g)
        assert sorted(s.layer for s in att) == list(range(layers)), str(report)
        for s in att:
            assert s.rewritten and s.rotation and not s.o_proj_folded, str(report)
            assert s.output_rotation.startswith("at the read (attention output reaches 'mul'"), str(report)
            assert (s.kv_write == "spectral") == spectral, str(report)
    assert "output rotation" in str(report) and "at the read" in str(report)


# without biases, every cache and implementation: tests/test_architectures.py (rows qwen3_next, qwen3_5)
@pytest.mark.parametrize("arch,kind,impl,bias", [pytest.param("qwen3_next", "static", "sdpa", True,
                                                              marks=pytest.mark.slow),
                                                 ("qwen3_5", "dynamic", "sdpa", True),
                                                 pytest.param("qwen3_5", "dynamic", "eager", True,
                                                              marks=pytest.mark.slow)])
def test_rotation_only_equals_eager(arch, kind, impl, bias):
    torch._dynamo.reset()
    model = build(arch, impl, bias)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    eager = decode(model, model, kind, ids, 6)
    logits, report = compiled_decode(model, kind, ids, {"quantize": False, "profile": random_profile(model.config),
                                                        "lower": "eager"}, steps=6)
    assert rel(logits, eager) < 1e-4, (arch, kind, rel(logits, eager), str(report))
    print(f"rotation only {arch}/{kind}/{impl} bias={bias}: rel err {rel(logits, eager):.2e}")
    assert_gated_sites(report, model.config.num_hidden_layers)
    for k, v in model.state_dict().items():  # the user's module is not touched
        assert torch.equal(v, state[k]), k


def test_explain_shows_gated_sites_rewritten():
    model = build("qwen3_next")
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    report = sqcompile.explain(model, input_ids=ids, options={"quantize": False,
                                                              "profile": random_profile(model.config)})
    assert_gated_sites(report, 2)
    assert "4 sites, 4 rewritten" in str(report), str(report)  # 2 attention + 2 MoE


def _without(monkeypatch, what):
    """A mutant: the output rotation skipped ("rotation"), or applied without the value mean ("mean")."""
    from sqcompile.passes import insert_output_rotation as mod

    real = mod.insert_output_rotation

    def mutant(gm, site, out, basis, mean, like=None):
        return out if what == "rotation" else real(gm, site, out, basis, None, like=like)

    monkeypatch.setattr(backend, "insert_output_rotation", mutant)
    import sqcompile.passes.substitute_decode_attention as sub

    monkeypatch.setattr(sub, "insert_output_rotation", mutant)


@pytest.mark.parametrize("what", ["rotation", pytest.param("mean", marks=pytest.mark.slow)])
def test_mutants_fail(monkeypatch, what):
    torch._dynamo.reset()
    model = build("qwen3_5")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    eager = decode(model, model, "dynamic", ids, 2)
    _without(monkeypatch, what)
    logits, _ = compiled_decode(model, "dynamic", ids, {"quantize": False, "profile": random_profile(model.config),
                                                        "lower": "eager"}, steps=2)
    assert rel(logits, eager) > 1e-2, (what, rel(logits, eager))
    print(f"mutant without the output {what}: rel err {rel(logits, eager):.2e}")


# the bit-plane layout: tests/test_architectures.py (test_quantized_equals_eager_spectral_cache, row qwen3_next)
@pytest.mark.parametrize("layout", [pytest.param("fast", marks=pytest.mark.slow)])
def test_quantized_equals_eager_spectral_cache(layout):
    from test_spectral_cache import _lockstep

    torch._dynamo.reset()
    model = build("qwen3_next", bias=True)
    profile = random_profile(model.config)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    report = Report()
    step = torch.compile(model.forward, backend=backend.recording_backend(report), options={"lower": "eager"})
    eager_cache = SpectralCache(model, profile, bits=3.25, max_cache_len=40, layout=layout)
    compiled_cache = SpectralCache(model, profile, bits=3.25, max_cache_len=40, layout=layout)
    with torch.no_grad():
        _lockstep(model, step, eager_cache, compiled_cache, ids, 6, tag=(layout,))
    assert_gated_sites(report, 2, spectral=True)
    kernels = {s.kernel for s in report.by_kind("attention")}
    assert any(k and k.startswith("decode_attention") for k in kernels), str(report)  # decode reads the codes


def test_quantized_mutant_fails(monkeypatch):
    torch._dynamo.reset()
    model = build("qwen3_5")
    profile = random_profile(model.config)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    _without(monkeypatch, "rotation")
    step = torch.compile(model.forward, backend=lambda gm, ex: spectralquant(gm, ex, options={"lower": "eager"}))
    with torch.no_grad():
        a = model(input_ids=ids, past_key_values=SpectralCache(model, profile, bits=3.25, max_cache_len=40),
                  use_cache=True).logits
        b = step(input_ids=ids, past_key_values=SpectralCache(model, profile, bits=3.25, max_cache_len=40),
                 use_cache=True).logits
    assert rel(b, a) > 1e-2, rel(b, a)
    print(f"SpectralCache mutant without the output rotation: rel err {rel(b, a):.2e}")


def test_optimize_generates_with_a_gated_model():
    """`sqcompile.optimize(model).generate`: the greedy tokens of the eager model over the same SpectralCache, decode
    steps through the decode op with the output rotation after it."""
    torch._dynamo.reset()
    model = build("qwen3_5")
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    eager_forward = model.forward
    opt = sqcompile.optimize(model, random_profile(model.config), bits=2.69, max_cache_len=32, lower="eager")
    got = opt.generate(ids, max_new_tokens=8, do_sample=False)
    model.forward = eager_forward  # the same generate and cache settings, eager
    assert torch.equal(got, opt.generate(ids, max_new_tokens=8, do_sample=False)), got
    att = opt.report.by_kind("attention")
    assert att and all(s.rewritten and s.output_rotation for s in att), str(opt.report)
    assert any(s.kernel and s.kernel.startswith("decode_attention") for s in att), str(opt.report)
