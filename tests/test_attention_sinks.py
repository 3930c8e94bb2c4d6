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


def gpt_oss(layer_types=("full_attention", "full_attention"), sliding_window=8, head_dim=TINY["head_dim"]):
    """A tiny random GPT-OSS with sink logits and biases far from zero (the sink takes a real share)."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**{**TINY, "head_dim": head_dim}, sliding_window=sliding_window,
                                       layer_types=list(layer_types))
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


_LOW = torch.finfo(torch.float32).min
# the additive terms a model's eager attention may add to its scores before the sink cat, and what the substitution
# reads from each: "bool" (the boolean mask of a where(mask, 0, -big)), "float" (the float mask input, read at run
# time by `token_mask_from_bias`) or None (left as eager attention, with a reason)
MASK_FORMS = {
    # transformers 5.17's eager mask: the 0 is a constant tensor the graph makes
    "where_tensor_zero": (lambda m, f: torch.where(m, torch.tensor(0.0, device=m.device, dtype=f.dtype), _LOW), "bool"),
    # transformers 5.25's
    "where_zeros": (lambda m, f: torch.where(m, torch.zeros((), device=m.device, dtype=f.dtype), _LOW), "bool"),
    "where_tensor_low": (lambda m, f: torch.where(m, 0.0, torch.tensor(float("-inf"))), "bool"),
    "where_full": (lambda m, f: torch.where(m, torch.full_like(f, 0.0), torch.full((), _LOW)), "bool"),
    "float_input": (lambda m, f: f, "float"),
    "float_input_sliced": (lambda m, f: f[:, :, :, :f.shape[-1]], "float"),  # mask[..., :key_len], the whole row
    "soft_penalty": (lambda m, f: torch.where(m, torch.tensor(0.0), -1.0), None),
    "nonzero_keep": (lambda m, f: torch.where(m, torch.tensor(0.5), _LOW), None),
    "scaled_float_input": (lambda m, f: f * 0.5, None),
    "float_input_shifted": (lambda m, f: torch.cat([f, f], -1)[:, :, :, 1:f.shape[-1] + 1], None),
}


@pytest.mark.parametrize("form", sorted(MASK_FORMS))
def test_sink_scores_read_each_mask_form(form):
    """The decode substitution reads the mask added to the sink form's scores (`_sink_score_terms`) as a token mask
    only where it provably is one: where(mask, 0, -big) with 0 / -big as numbers or constant tensors (transformers
    5.17 makes the 0 with torch.tensor, 5.25 with torch.zeros), a float mask input or a slice of it that keeps its
    shape; any other bias leaves the site as eager attention and says why. Captured by dynamo as the backend sees
    it, without a transformers version that makes the form."""
    from sqcompile.passes.fx_utils import is_op, meta_tensor
    from sqcompile.passes.substitute_decode_attention import _sink_score_terms

    make_bias, want = MASK_FORMS[form]

    def scores(q, k, sinks, bool_mask, float_mask):
        weights = torch.matmul(q, k.transpose(2, 3)) * 0.25 + make_bias(bool_mask, float_mask)
        return torch.cat([weights, sinks], dim=-1).softmax(-1)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    B, H, T, d = 2, 4, 8, 16
    g = torch.Generator().manual_seed(0)
    bool_mask = torch.rand(B, 1, 1, T, generator=g) > 0.3
    inputs = (torch.randn(B, H, 1, d, generator=g), torch.randn(B, H, T, d, generator=g),
              torch.randn(B, H, 1, 1, generator=g), bool_mask, torch.where(bool_mask, 0.0, _LOW))
    torch._dynamo.reset()
    torch.compile(scores, backend=capture, fullgraph=True)(*inputs)
    nodes = list(graphs[0].graph.nodes)
    attn = next(n for n in nodes if is_op(n, "matmul"))
    cat = [n for n in nodes if is_op(n, "cat")][-1]  # the sink cat (a form may cat too)
    scale, mask, why = _sink_score_terms(attn, cat)
    if want is None:
        assert mask is None and scale is None and "not a token mask" in why, (mask, why)
        return
    assert why is None and scale == 0.25, why
    assert mask.op == "placeholder", mask  # the mask handed in itself: one token mask shared by the layers
    assert meta_tensor(mask).dtype == (torch.bool if want == "bool" else torch.float32)


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
@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_gpu_decode_with_sinks_equals_eager_spectral_cache(kernels):
    """On a GPU: the compiled GPT-OSS over a fast-layout SpectralCache (decode steps on the CUDA decode kernel where
    kernels="auto", the Triton one where "triton", the sink logit in the extra split they merge) equals the eager
    model over its own SpectralCache; each decode site's `kernel` column names the implementation that ran."""
    from sqcompile.kernels import decode_attention_cuda
    from sqcompile.quant.fast_layout import FastLayout

    torch._dynamo.reset()
    head_dim = 64  # a layout the CUDA kernel takes at 3.25 bits (head_dim 16 has 2-bit groups of 16 columns)
    model = gpt_oss(("sliding_attention", "full_attention"), head_dim=head_dim).cuda()
    profile = profile_of(model, centered_values=True)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(6)).cuda()
    mine = SpectralCache(model, profile, bits=3.25, max_cache_len=32, layout="fast")
    real = SpectralCache(model, profile, bits=3.25, max_cache_len=32, layout="fast")
    group = TINY["num_attention_heads"] // TINY["num_key_value_heads"]
    for layer in mine.layers:
        why = decode_attention_cuda.supports(FastLayout.from_spec(head_dim, layer.k_layout),
                                             FastLayout.from_spec(head_dim, layer.v_layout), head_dim, group,
                                             layer.max_cache_len)
        assert why is None, f"the test's layout no longer runs on the CUDA decode kernel: {why}"
    worst, _, attention = run_schedule(model, {"profile": profile, "bits": 3.25, "layout": "fast", "kernels": kernels,
                                               "lower": "eager"}, ids, mine, real)
    decode = [s.kernel for s in attention if s.kernel and s.kernel.startswith("decode_attention")]
    impl = "cuda" if kernels == "auto" else "triton"
    assert decode and all(k.endswith(f" ({impl})") for k in decode), decode
    assert worst < 5e-3, worst
