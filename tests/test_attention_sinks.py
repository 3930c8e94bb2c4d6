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


def profile_of(model, seed=4, centered_values=False):
    """A random profile; centered_values: the codec centers the values too (`kv_center`), so the sink column's
    storage-basis value -B_v mu_v is not zero (by default the codec stores values uncentered: mu_v = 0)."""
    fp = model_fingerprint(model.config)
    profile = SpectralProfile.random(fp["num_layers"], fp["num_kv_heads"], fp["head_dim"], num_heads=fp["num_heads"],
                                     seed=seed, mean_scale=0.5)
    if centered_values:
        profile.meta["kv_center"] = [[True, True]] * fp["num_layers"]
    return profile


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_schedule(model, options, ids, mine, real):
    """Each (a, b) of SCHEDULE through the compiled model over `mine` and the eager model over `real`: (the worst
    relative logit difference, the last eager logits, the attention sites of every graph compiled)."""
    from sqcompile import backend

    sink = []
    step = torch.compile(model.forward, backend="spectralquant", options=options)
    worst, want = 0.0, None
    token = backend._REPORT_SINK.set(sink)
    try:
        with torch.no_grad():
            for a, b in SCHEDULE:
                got = step(input_ids=ids[:, a:b], past_key_values=mine, use_cache=True).logits
                want = model(input_ids=ids[:, a:b], past_key_values=real, use_cache=True).logits
                worst = max(worst, rel(got.float(), want.float()))
    finally:
        backend._REPORT_SINK.reset(token)
    return worst, want, [s for s in sink if s.kind == "attention"]


@pytest.mark.parametrize("kind,centered", [("dynamic", False), ("static", False), ("dynamic", True)])
def test_backend_with_a_plain_cache_equals_spectral_cache(kind, centered):
    """Quantized, over a plain cache: the compiled GPT-OSS gives the eager GPT-OSS's logits over SpectralCache."""
    torch._dynamo.reset()
    model = gpt_oss()
    profile = profile_of(model, centered_values=centered)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(5))
    plain = transformers.DynamicCache(config=model.config) if kind == "dynamic" else \
        transformers.StaticCache(config=model.config, max_cache_len=32)
    real = SpectralCache(model, profile, bits=2.69, max_cache_len=32)
    worst, want, attention = run_schedule(model, {"profile": profile, "bits": 2.69, "lower": "eager"}, ids, plain,
                                          real)
    with torch.no_grad():
        exact = model(input_ids=ids).logits[:, -1:]
    assert attention and all(s.rewritten and s.quantized and s.form == "eager+sinks" for s in attention), attention
    assert worst < 1e-4, worst
    assert rel(want, exact) > 1e-2  # the cache really quantizes


def test_sink_logit_split_is_one_more_softmax_term():
    """The decode ops' extra split with the sink merged in (`sink_logits`) gives softmax([q.k * scale, s_h]) with
    the sink's column valued c_h, from scores without q . k_mean, with and without exact tokens in the split."""
    from sqcompile.kernels.sink import LOG2E, merge_sink_reference
    from sqcompile.kernels.sink_logits import merge_splits, sink_logit_split

    g = torch.Generator().manual_seed(0)
    B, Hkv, G, T, D = 2, 2, 3, 11, 32
    Hq, scale = Hkv * G, D ** -0.5
    q = torch.randn(B, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) + 2.0
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    k_mean = torch.randn(Hkv, D, generator=g, dtype=torch.float64) + 2.0
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64) * 2
    c = torch.randn(Hq, D, generator=g, dtype=torch.float64)
    qg = q.reshape(B, Hkv, G, D)
    raw = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale
    p = torch.softmax(torch.cat([raw, sinks.reshape(1, Hkv, G, 1).expand(B, Hkv, G, 1)], -1), -1)
    want = torch.einsum("bhgt,bhtd->bhgd", p[..., :-1], v) + p[..., -1:] * c.reshape(1, Hkv, G, D)
    centered = torch.einsum("bhgd,bhtd->bhgt", qg, k - k_mean[None, :, None]) * scale  # the kernels' scores
    # the sink alone as the split ([B, Hq, 1, 1] as the model's cat reads it)
    s, val = sink_logit_split(q, sinks.reshape(1, Hq, 1, 1).expand(B, Hq, 1, 1), k_mean, scale, c)
    got = merge_sink_reference(centered.float(), v.float(), s, val)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    # the last token as an exact split (as `exact_split` gives it), merged with the sink
    exact_s = (centered[..., -1] * LOG2E).reshape(B, Hq).float()
    exact_v = v[:, :, -1].float()  # [B, Hkv, d]
    ms, mv = merge_splits(exact_s, exact_v, s, val)
    got = merge_sink_reference(centered[..., :-1].float(), v[:, :, :-1].float(), ms, mv)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    # an empty exact split (score -inf) leaves the sink alone
    ms, mv = merge_splits(torch.full_like(exact_s, float("-inf")), exact_v, s, val)
    assert torch.equal(ms, s) and torch.allclose(mv, val)


def test_additive_mask_becomes_a_token_mask_or_an_error():
    from sqcompile.kernels.sink_logits import token_mask_from_bias

    low = torch.finfo(torch.float32).min
    bias = torch.tensor([[0.0, low, 0.0], [low, 0.0, 0.0]]).reshape(2, 1, 1, 3)
    assert torch.equal(torch.ops.sqcompile.token_mask_from_bias(bias),
                       torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="other than 0"):
        token_mask_from_bias(bias - 0.5)


@pytest.mark.parametrize("layout,centered", [("planes", False), ("fast", False), ("planes", True), ("fast", True)])
def test_compiled_spectral_cache_equals_eager_spectral_cache(layout, centered):
    """A SpectralCache under the backend: prefill keeps the eager softmax over the dequantized cache (sink column
    valued -B_v mu_v), decode steps run the decode op with the sink logit in its extra split; logits equal the eager
    model over its own SpectralCache, sliding and full layers."""
    torch._dynamo.reset()
    model = gpt_oss(("sliding_attention", "full_attention"))
    profile = profile_of(model, centered_values=centered)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(6))
    mine = SpectralCache(model, profile, bits=2.69, max_cache_len=32, layout=layout)
    real = SpectralCache(model, profile, bits=2.69, max_cache_len=32, layout=layout)
    worst, _, attention = run_schedule(model, {"profile": profile, "bits": 2.69, "layout": layout, "lower": "eager"},
                                       ids, mine, real)
    assert attention and all(s.rewritten and s.form == "eager+sinks" for s in attention), attention
    assert any(s.kernel and s.kernel.startswith("decode_attention") for s in attention), [s.kernel for s in attention]
    assert worst < 1e-4, worst


def test_optimize_generate_runs_gpt_oss():
    """`sqcompile.optimize(model).generate` on CPU: the eager SpectralCache model's greedy tokens, decode steps
    through the decode op (the mask `generate` hands in is read as a token mask)."""
    import sqcompile

    torch._dynamo.reset()
    model = gpt_oss(("sliding_attention", "full_attention"))
    profile = profile_of(model, centered_values=True)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = SpectralCache(model, profile, bits=2.69, max_cache_len=32).allocate(2, ids.device, torch.float32)
        want = model.generate(ids, past_key_values=cache, max_new_tokens=10, do_sample=False)
    opt = sqcompile.optimize(model, profile, bits=2.69, max_cache_len=32, lower="eager")
    got = opt.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want), (got, want)
    kernels = [s.kernel for s in opt.report.sites if s.kind == "attention"]
    assert kernels and any(k and k.startswith("decode_attention") for k in kernels), kernels


def _sink_split(B, Hq, Hkv, d, gen, scale):
    """A GPT-OSS sink split as the substitution pass builds it: (score, value per query head, sink_pos -1)."""
    from sqcompile.kernels.sink_logits import no_exact_positions, sink_logit_split

    q = torch.randn(B, Hq, d, generator=gen)
    sinks = torch.randn(Hq, generator=gen) * 2 + 1
    k_mean = torch.randn(Hkv, d, generator=gen)
    value = torch.randn(Hq, d, generator=gen)
    score, v = sink_logit_split(q, sinks, k_mean, scale, value)
    return q, dict(sink_score=score, sink_value=v, sink_pos=no_exact_positions(q))


@pytest.mark.interpreter
def test_triton_decode_kernels_take_the_sink_logit():
    """Both Triton decode kernels (bit-plane and fast layouts) with the sink split equal their torch references
    (fresh random codes, output poisoned first); the sink changes the result."""
    import math

    from sqcompile.kernels import decode_attention as da
    from sqcompile.kernels import decode_attention_fast as fa
    from sqcompile.quant.fast_layout import layout_for_budget
    from test_decode_attention import attention_args, make_format, random_cache
    from test_decode_attention_fast import make_args
    from test_decode_attention_fast import random_cache as fast_cache

    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, d, T = 2, 8, 2, 64, 40
    scale = 0.5 / math.sqrt(d)
    lens = torch.tensor([40, 23], dtype=torch.int32)
    q, sink = _sink_split(B, Hq, Hkv, d, gen, scale)

    kfmt, vfmt = make_format("turbo4", d, Hkv, gen), make_format("turbo4", d, Hkv, gen)
    args = attention_args(kfmt, vfmt, Hkv, d, gen)
    kp, vp = random_cache(kfmt, B, Hkv, T, gen), random_cache(vfmt, B, Hkv, T, gen)
    ref = da.decode_attention_reference(q, kp, vp, lens, scale=scale, **args, **sink)
    assert rel(da.decode_attention_reference(q, kp, vp, lens, scale=scale, **args), ref) > 1e-2
    out = da.decode_attention_triton(q, kp, vp, lens, scale=scale, num_splits=3, block_n=16, poison=True, **args,
                                     **sink)
    assert rel(out, ref) < 2e-3, rel(out, ref)

    kl, vl = layout_for_budget(3.25, d)
    fargs = make_args(kl, vl, Hkv, gen)
    kp, vp = fast_cache(kl, B, Hkv, T, gen), fast_cache(vl, B, Hkv, T, gen)
    ref = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, **fargs, **sink)
    assert rel(fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, **fargs), ref) > 1e-2
    out = fa.decode_attention_fast_triton(q, kp, vp, lens, scale=scale, num_splits=3, block_n=16, poison=True,
                                          **fargs, **sink)
    assert rel(out, ref) < 2e-3, rel(out, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["cuda", "triton"])
def test_gpu_decode_with_sinks_equals_eager_spectral_cache(kernels):
    """On a GPU: the compiled GPT-OSS over a fast-layout SpectralCache (decode steps on the CUDA or Triton decode
    kernel, the sink logit in the extra split they merge) equals the eager model over its own SpectralCache."""
    torch._dynamo.reset()
    model = gpt_oss(("sliding_attention", "full_attention")).cuda()
    profile = profile_of(model, centered_values=True)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(6)).cuda()
    mine = SpectralCache(model, profile, bits=3.25, max_cache_len=32, layout="fast")
    real = SpectralCache(model, profile, bits=3.25, max_cache_len=32, layout="fast")
    worst, _, attention = run_schedule(model, {"profile": profile, "bits": 3.25, "layout": "fast", "kernels": kernels,
                                               "lower": "eager"}, ids, mine, real)
    kernels_used = [s.kernel for s in attention]
    assert any(k and k.startswith("decode_attention") for k in kernels_used), kernels_used
    assert worst < 5e-3, worst
