"""The evaluation's simulated cache (`evaluate.simulated_cache`) equals `SpectralCache` on sliding-window models,
where a DynamicCache layer holds only the last window: the exact outlier slots must land on their tokens' rows
there, not on rows numbered by absolute position (issue #17)."""
from __future__ import annotations

import pytest
import torch
import transformers

from sqcompile.cache import SpectralCache
from sqcompile.evaluate import EvalState, simulated_cache
from sqcompile.profile import SpectralProfile, model_fingerprint

WINDOW = 8
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def sliding_model(arch: str):
    """A tiny random model whose layer 0 (gemma3: layer 0 of 2; mistral: every layer) attends to a window of 8."""
    torch.manual_seed(0)
    if arch == "gemma3":
        config = transformers.Gemma3TextConfig(**TINY, head_dim=32, sliding_window=WINDOW,
                                               layer_types=["sliding_attention", "full_attention"])
        model = transformers.Gemma3ForCausalLM(config)
    else:
        config = transformers.MistralConfig(**TINY, sliding_window=WINDOW)
        model = transformers.MistralForCausalLM(config)
    config._attn_implementation = "sdpa"
    return model.eval()


def _profile(model, seed=4):
    fp = model_fingerprint(model.config)
    return SpectralProfile.random(fp["num_layers"], fp["num_kv_heads"], fp["head_dim"], num_heads=fp["num_heads"],
                                  seed=seed, mean_scale=0.5)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
@pytest.mark.parametrize("layout", ["planes", "fast"])
def test_simulated_cache_equals_spectral_cache_past_the_window(arch, layout):
    model = sliding_model(arch)
    profile = _profile(model)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = SpectralCache(model, profile, bits=2.69, max_cache_len=48, layout=layout)
    assert cache.layers[0].outlier_tokens > 0
    sim = simulated_cache(EvalState(cache.codec, (), keep_sink=True, exact_fresh=True,
                                    outlier_tokens=cache.layers[0].outlier_tokens), model.config)
    with torch.no_grad():
        # a prompt, then chunks of 4 and single tokens far past the window (5x its length)
        for a, b in ((0, 12), *((i, i + 4) for i in range(12, 28, 4)), *((i, i + 1) for i in range(28, 40))):
            part = ids[:, a:b]
            real = model(input_ids=part, past_key_values=cache, use_cache=True).logits
            simulated = model(input_ids=part, past_key_values=sim, use_cache=True).logits
            assert _rel(simulated, real) < 1e-4, (a, _rel(simulated, real))
        exact = model(input_ids=ids).logits[:, -1:]
    assert _rel(real, exact) > 1e-3  # and the cache really quantizes
    # the sliding layer's outlier slots hold tokens that left the window: the case that broke
    sink_pos = cache.layers[0].sink_pos[0, 1:]
    assert (sink_pos < 40 - WINDOW).any() and (sink_pos >= 0).all(), sink_pos


def test_layout_quality_sizes_the_turboquant_codec_by_the_model_head_dim():
    """benchmarks/layout_quality.py's TurboQuant row runs on the model: head_dim 32 where hidden / heads = 16."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from layout_quality import turboquant_codec

    model = sliding_model("gemma3")
    codec = turboquant_codec(model.config, 3.25, layout="fast")
    assert codec.head_dim == 32 != model.config.hidden_size // model.config.num_attention_heads
    sim = simulated_cache(EvalState(codec, ()), model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 12)), past_key_values=sim, use_cache=True)


# --- the backend with a plain HF cache simulates SpectralCache exactly ---------------------------------------------
def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(TINY, num_key_value_heads=2), attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


SCHEDULE = ((0, 12), (12, 16), (16, 20), *((i, i + 1) for i in range(20, 36)))  # a prompt, chunks, decode steps


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("layout", ["planes", "fast"])
def test_backend_with_a_plain_cache_equals_spectral_cache(kind, layout):
    """torch.compile(backend="spectralquant") over a DynamicCache/StaticCache gives the logits of the same model
    over the default SpectralCache (its codec and layout, sink, 4 outlier slots, exact new tokens)."""
    torch._dynamo.reset()
    model = _llama()
    profile = _profile(model)
    ids = torch.randint(3, 128, (2, 36), generator=torch.Generator().manual_seed(5))
    opts = {"profile": profile, "bits": 2.69, "layout": layout, "lower": "eager"}
    step = torch.compile(model.forward, backend="spectralquant", options=opts)
    plain = transformers.DynamicCache(config=model.config) if kind == "dynamic" else \
        transformers.StaticCache(config=model.config, max_cache_len=48)
    real = SpectralCache(model, profile, bits=2.69, max_cache_len=48, layout=layout)
    worst = 0.0
    with torch.no_grad():
        for a, b in SCHEDULE:
            got = step(input_ids=ids[:, a:b], past_key_values=plain, use_cache=True).logits
            want = model(input_ids=ids[:, a:b], past_key_values=real, use_cache=True).logits
            worst = max(worst, _rel(got, want))
        exact = model(input_ids=ids).logits[:, -1:]
    assert worst < 1e-4, worst
    assert _rel(want, exact) > 1e-2  # the cache really quantizes
    held = real.layers[0].sink_pos[:, 1:]
    assert (held > 0).all() and (held < 20).any(), held  # outliers held across steps, some from the prompt


def test_backend_with_a_sliding_window_dynamic_cache_equals_spectral_cache_until_the_window_fills():
    """Gemma-3 layout (a sliding layer of window 8, a full layer) over a DynamicCache: the same logits as
    SpectralCache while the sliding layer's rows are still the whole sequence. After that the sliding layer keeps
    only the new tokens exact (SpectralCache: also its slots inside the window; 5 of a window of 8 here, so the
    two part far more than at a real model's window of 512): closer to the exact model than SpectralCache without
    any exact slots."""
    torch._dynamo.reset()
    model = sliding_model("gemma3")
    profile = _profile(model)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(6))
    step = torch.compile(model.forward, backend="spectralquant",
                         options={"profile": profile, "bits": 2.69, "lower": "eager"})
    plain, exact = transformers.DynamicCache(config=model.config), transformers.DynamicCache(config=model.config)
    real = SpectralCache(model, profile, bits=2.69, max_cache_len=32)
    no_slots = SpectralCache(model, profile, bits=2.69, max_cache_len=32, keep_sink=False, outlier_tokens=0)
    errors, later = [], []
    with torch.no_grad():
        for a, b in ((0, 4), (4, 6), *((i, i + 1) for i in range(6, 24))):
            x = ids[:, a:b]
            got = step(input_ids=x, past_key_values=plain, use_cache=True).logits
            want = model(input_ids=x, past_key_values=real, use_cache=True).logits
            bare = model(input_ids=x, past_key_values=no_slots, use_cache=True).logits
            ref = model(input_ids=x, past_key_values=exact, use_cache=True).logits
            errors.append((a, _rel(got, want)))
            if a >= WINDOW - 1:
                later.append((_rel(got, ref), _rel(bare, ref)))
    early = [e for a, e in errors if a < WINDOW - 1]  # the sliding layer held fewer than window - 1 tokens before
    assert max(early) < 1e-4, errors
    assert sum(s for s, _ in later) < sum(b for _, b in later), later


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 4])
def test_backend_with_a_plain_cache_under_inductor_equals_spectral_cache(window):
    """The same under Inductor (sqcompile::simulate_read is one fallback node in the generated code), without and
    with a recent window (the ring wraps in the decode steps)."""
    torch._dynamo.reset()
    model = _llama()
    profile = _profile(model)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(7))
    step = torch.compile(model.forward, backend="spectralquant",
                         options={"profile": profile, "bits": 2.69, "recent_window": window})
    plain = transformers.DynamicCache(config=model.config)
    real = SpectralCache(model, profile, bits=2.69, max_cache_len=32, recent_window=window)
    with torch.no_grad():
        for a, b in ((0, 12), *((i, i + 1) for i in range(12, 20))):
            got = step(input_ids=ids[:, a:b], past_key_values=plain, use_cache=True).logits
            want = model(input_ids=ids[:, a:b], past_key_values=real, use_cache=True).logits
            assert _rel(got, want) < 1e-4, (a, _rel(got, want))


# a prompt, a chunk shorter than the window (the ring still holds earlier tokens), one longer (the ring then holds
# only the chunk's own last tokens: the previous chunk reads from the codes), decode steps (the ring wraps)
WINDOW_SCHEDULE = ((0, 12), (12, 15), (15, 27), *((i, i + 1) for i in range(27, 40)))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_backend_with_a_plain_cache_and_a_recent_window_equals_spectral_cache(kind):
    """options["recent_window"] = W: the backend over a DynamicCache/StaticCache gives, step by step, the logits of
    the same model over `SpectralCache(recent_window=W)` (fast layout, 2.75 bits, the window's fp16 rounding
    included); without the option it stays `SpectralCache()`'s (recent_window=0), and the window is read: the two
    differ."""
    model = _llama()
    profile = _profile(model)
    W = 8
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(8))
    opts = {"profile": profile, "bits": 2.75, "layout": "fast", "lower": "eager"}

    def run(window):  # (the backend over a plain cache, the model over SpectralCache) logits of every step
        torch._dynamo.reset()  # one frame: each option set gets its own recompile budget
        step = torch.compile(model.forward, backend="spectralquant", options=dict(opts, recent_window=window))
        plain = transformers.DynamicCache(config=model.config) if kind == "dynamic" else \
            transformers.StaticCache(config=model.config, max_cache_len=48)
        real = SpectralCache(model, profile, bits=2.75, max_cache_len=48, layout="fast", recent_window=window)
        out = []
        with torch.no_grad():
            for a, b in WINDOW_SCHEDULE:
                x = ids[:, a:b]
                out.append((step(input_ids=x, past_key_values=plain, use_cache=True).logits,
                            model(input_ids=x, past_key_values=real, use_cache=True).logits))
        return out

    win, bare = run(W), run(0)
    worst_win = max(_rel(got, want) for got, want in win)
    worst_bare = max(_rel(got, want) for got, want in bare)
    apart = max(_rel(g, g0) for (g, _), (g0, _) in zip(win, bare))
    assert worst_win < 1e-5, worst_win  # 3.4e-6 measured; 3.9e-5 without the ring's fp16 rounding simulated
    assert worst_bare < 1e-4, worst_bare
    assert apart > 1e-2, apart  # the window changes what attention reads


def test_recent_window_option_and_a_spectral_cache_that_disagree():
    """A SpectralCache carries its own window: with the option at 0 the cache's window is read (the compiled step
    equals the eager cache); an option W > 0 the cache does not hold is a clear error at compile time."""
    import sqcompile
    from test_bad_inputs import _error_text

    torch._dynamo.reset()
    model = _llama()
    profile = _profile(model)
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(9))
    kw = dict(bits=2.75, max_cache_len=32, layout="fast")
    opts = {"profile": profile, "bits": 2.75, "layout": "fast", "lower": "eager"}
    step = torch.compile(model.forward, backend="spectralquant", options=opts)
    compiled, eager = (SpectralCache(model, profile, recent_window=4, **kw) for _ in range(2))
    with torch.no_grad():
        for a, b in ((0, 10), (10, 11), (11, 12)):
            got = step(input_ids=ids[:, a:b], past_key_values=compiled, use_cache=True).logits
            want = model(input_ids=ids[:, a:b], past_key_values=eager, use_cache=True).logits
            assert _rel(got, want) < 1e-4, (a, _rel(got, want))
    for held in (0, 4):
        torch._dynamo.reset()
        step = torch.compile(model.forward, backend="spectralquant", options=dict(opts, recent_window=8))
        cache = SpectralCache(model, profile, recent_window=held, **kw)
        with pytest.raises(Exception) as e, torch.no_grad():
            step(input_ids=ids[:, :10], past_key_values=cache, use_cache=True)
        text = _error_text(e)
        assert "options['recent_window'] = 8" in text and "SpectralCache(..., recent_window=8)" in text, text
    # optimize sets the option to its cache's window: the two agree
    opt = sqcompile.optimize(model, profile, recent_window=4, lower="eager", **kw)
    assert opt.options["recent_window"] == 4 and opt.cache().layers[0].recent_window == 4
    with torch.no_grad():
        out = opt.generate(ids[:, :10], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)

