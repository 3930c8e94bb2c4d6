"""SpectralCache (issue #4): packed storage, eager correctness, the compiled fused path, capacity errors."""
from __future__ import annotations

import pytest
import torch

import sqcompile
from sqcompile.backend import spectralquant
from sqcompile.cache import SpectralCache
from sqcompile.evaluate import EvalState, simulated_cache

from test_hf_models import _model, _rel


KERNEL = {"planes": "decode_attention", "fast": "decode_attention_fast_write"}  # fast: the write fused in
DEQUANT = {"planes": "dequantize_packed", "fast": "dequantize_fast"}


def _lockstep(model, step, eager_cache, compiled_cache, ids, steps, tag=()):
    """Prefill + `steps` greedy decode steps of eager `model` and compiled `step`, each on its own cache;
    the logits agree to 1e-4 relative at every step. Returns the last input (the next token)."""
    x = ids
    for i in range(steps + 1):
        a = model(input_ids=x, past_key_values=eager_cache, use_cache=True).logits
        b = step(input_ids=x, past_key_values=compiled_cache, use_cache=True).logits
        assert _rel(b, a) < 1e-4, (*tag, i, _rel(b, a))
        x = a[:, -1:].argmax(-1)
    return x


def recording_backend(graphs: list):
    """The spectralquant backend (lower="eager") that appends each graph it rewrote to `graphs`."""

    def backend(gm, example_inputs):
        fn = spectralquant(gm, example_inputs, options={"lower": "eager"})
        graphs.append(gm)
        return fn

    return backend


@pytest.mark.parametrize("arch,layout", [("llama", "planes"), ("qwen2", "planes"), ("llama", "fast"), ("qwen2", "fast")])
def test_compiled_fused_decode_equals_eager_spectral_cache(arch, layout):
    torch._dynamo.reset()
    model = _model(arch)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    decode_graphs = []
    step = torch.compile(model.forward, backend=recording_backend(decode_graphs))
    eager_cache = SpectralCache(model, bits=3.25, max_cache_len=40, layout=layout)
    compiled_cache = SpectralCache(model, bits=3.25, max_cache_len=40, layout=layout)
    with torch.no_grad():
        x = _lockstep(model, step, eager_cache, compiled_cache, ids, 16)
    # The decode graph reads the codes: decode_attention, and no dequantized cache anywhere.
    decode = decode_graphs[-1]
    targets = [str(n.target) for n in decode.graph.nodes if n.op == "call_function"]
    assert sum(t.endswith(KERNEL[layout] + ".default") for t in targets) == model.config.num_hidden_layers, targets
    assert not any(DEQUANT[layout] in t for t in targets)
    assert not any("scaled_dot_product_attention" in t for t in targets)
    # one uint8 token mask per step, made where the attention mask is and shared by every layer's ops (the ops
    # converting it themselves cost two copies per layer in the CUDA graph)
    ops = [n for n in decode.graph.nodes if n.op == "call_function" and str(n.target).endswith(
        (KERNEL[layout] + ".default", "exact_split.default"))]
    masks = {n.kwargs["kv_mask"] if "kv_mask" in n.kwargs else n.args[2] for n in ops}
    assert len(ops) == 2 * model.config.num_hidden_layers and len(masks) == 1, masks
    (mask,) = masks
    assert mask is not None and [(n.target, n.args[1:]) for n in (mask.args[0],)] == [("to", (torch.uint8,))]
    report = sqcompile.explain(model, input_ids=x, past_key_values=compiled_cache)
    assert [s.kernel for s in report.sites] == [f"{KERNEL[layout]} (torch)"] * model.config.num_hidden_layers, str(report)


@pytest.mark.parametrize("layout", ["planes", "fast"])
def test_eager_spectral_cache_equals_simulation(layout):
    model = _model("llama")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    cache = SpectralCache(model, bits=2.69, max_cache_len=32, layout=layout)
    assert cache.layers[0].fast == (layout == "fast")
    sim = simulated_cache(EvalState(cache.codec, (), keep_sink=True, exact_fresh=True,
                                    outlier_tokens=cache.layers[0].outlier_tokens), model.config)
    with torch.no_grad():  # a prompt (exact among itself), then 8 tokens that read it compressed
        for part in (ids[:, :12], ids[:, 12:]):
            a = model(input_ids=part, past_key_values=cache, use_cache=True).logits
            b = model(input_ids=part, past_key_values=sim, use_cache=True).logits
        fp = model(input_ids=ids).logits[:, 12:]
    assert _rel(a, b) < 1e-5
    assert _rel(a, fp) > 1e-3  # and it really is quantized


def test_writing_past_capacity_raises_and_names_it():
    model = _model("llama")
    cache = SpectralCache(model, bits=4.25, max_cache_len=8)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 6, dtype=torch.long), past_key_values=cache, use_cache=True)
        with pytest.raises(IndexError, match="max_cache_len=8"):
            model(input_ids=torch.zeros(1, 3, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_allocate_before_the_first_update_gives_the_same_logits():
    """`allocate` (what `optimize(...).generate` calls so buffers get static addresses) changes no result."""
    model = _model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    outs = []
    for early in (False, True):
        cache = SpectralCache(model, bits=3.25, max_cache_len=16, layout="fast")
        if early:
            assert cache.allocate(2, ids.device, torch.float32) is cache
            assert all(layer.is_initialized and layer.keys.shape[0] == 2 for layer in cache.layers)
        with torch.no_grad():
            first = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
        outs.append(torch.cat([first, step], 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        SpectralCache(model, bits=3.25, max_cache_len=16).allocate(0, "cpu", torch.float32)


@pytest.mark.parametrize("layout", ["planes", "fast"])
def test_allocates_packed_size_not_fp16(layout):
    model = _model("llama")
    cfg = model.config
    batch, max_len = 3, 64
    cache = SpectralCache(model, bits=3.25, max_cache_len=max_len, layout=layout)
    with torch.no_grad():
        model(input_ids=torch.zeros(batch, 4, dtype=torch.long), past_key_values=cache, use_cache=True)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = batch * max_len * cache.packed_bytes_per_token()
    assert abs(cache.nbytes - expected) <= 0.01 * expected
    fp16 = batch * max_len * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * 2
    assert cache.nbytes <= fp16 / 4  # 3.25 bits/element is 4.9x smaller than fp16
    per_token_bits = 8 * cache.packed_bytes_per_token() / (cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * head_dim)
    assert per_token_bits <= 3.25 + 1e-9
    # only uint8 storage: no float K/V buffers kept by the cache
    for layer in cache.layers:
        assert layer.keys.dtype == torch.uint8 and layer.values.dtype == torch.uint8


@pytest.mark.parametrize("layout", ["planes", "fast"])
def test_generate_with_padding_uses_fused_kernel_and_equals_eager(layout):
    """model.generate with a left-padded batch: the attention_mask reaches decode_attention as a token mask."""
    torch._dynamo.reset()
    model = _model("llama")
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    attn = torch.ones_like(ids)
    attn[1, :4] = 0  # left padding of the second prompt
    ids[1, :4] = 0
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=attn, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, past_key_values=SpectralCache(model, max_cache_len=24, layout=layout), **kw)
        opt = sqcompile.optimize(model, max_cache_len=24, lower="eager", layout=layout)
        try:
            fused = opt.generate(ids, **kw)
            report = sqcompile.explain(model.forward, input_ids=ids[:, -1:], attention_mask=torch.ones(2, 11, dtype=torch.long),
                                       past_key_values=_prefilled(model, ids, attn, layout))
        finally:
            del model.forward  # back to the class's forward
    assert torch.equal(fused, eager)
    assert all(s.kernel == f"{KERNEL[layout]} (torch)" for s in report.sites), str(report)  # kernels="auto" on CPU


def test_optimize_generate_allocates_for_the_expanded_batch():
    """`optimize(...).generate` allocates its cache before the prefill, for the rows generate expands the prompt to
    (num_return_sequences, num_beams): the result equals generate over a lazily allocated SpectralCache."""
    model = _model("llama")
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    cases = (dict(num_return_sequences=2, do_sample=True), dict(num_beams=2, do_sample=False))
    want = []
    with torch.no_grad():
        for kw in cases:
            torch.manual_seed(0)
            want.append(model.generate(ids, past_key_values=SpectralCache(model, max_cache_len=16, layout="fast"),
                                       max_new_tokens=3, pad_token_id=0, **kw))
    opt = sqcompile.optimize(model, max_cache_len=16, lower="eager", layout="fast")
    try:
        for kw, w in zip(cases, want):
            torch.manual_seed(0)
            got = opt.generate(ids, max_new_tokens=3, pad_token_id=0, **kw)
            assert torch.equal(got, w), kw
    finally:
        del model.forward


def _prefilled(model, ids, attn, layout="planes"):
    cache = SpectralCache(model, max_cache_len=24, layout=layout)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.slow
def test_fast_layout_under_inductor_equals_eager_and_writes_the_same_codes():
    """The default lowering (Inductor, C++ on CPU) of a fast-layout SpectralCache model: quantize_write_fast and
    dequantize_fast decompose into ops Inductor fuses; logits equal eager and the packed bytes are identical."""
    torch._dynamo.reset()
    model = _model("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    step = torch.compile(model.forward, backend="spectralquant")
    eager_cache = SpectralCache(model, bits=3.25, max_cache_len=24, layout="fast")
    compiled_cache = SpectralCache(model, bits=3.25, max_cache_len=24, layout="fast")
    with torch.no_grad():
        _lockstep(model, step, eager_cache, compiled_cache, ids, 2)
    for le, lc in zip(eager_cache.layers, compiled_cache.layers):
        assert torch.equal(le.keys, lc.keys) and torch.equal(le.values, lc.values)


def test_one_compiled_forward_serves_caches_of_different_layouts():
    """Caches of other layouts and budgets through one compiled forward: dynamo recompiles (the cache's
    attributes differ) and may make changed int attributes symbolic; the fast layout's metadata travels
    as a string constant, so its kernel still gets concrete groups."""
    torch._dynamo.reset()
    model = _model("llama")
    step = torch.compile(model.forward, backend="spectralquant", options={"lower": "eager"})
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(6))
    for layout, bits in (("planes", 3.25), ("fast", 3.25), ("fast", 4.25)):
        eager_cache = SpectralCache(model, bits=bits, max_cache_len=16, layout=layout)
        compiled_cache = SpectralCache(model, bits=bits, max_cache_len=16, layout=layout)
        with torch.no_grad():
            _lockstep(model, step, eager_cache, compiled_cache, ids, 3, tag=(layout, bits))


@pytest.mark.parametrize("n", [1, 5])
def test_rotate_values_is_the_broadcast_matmul(n):
    """`cache.rotate_values` (one bmm over kv-heads) computes (v - mu_v) @ B_v^T per kv-head, as the broadcast matmul
    it replaced, for a decode step and a prompt."""
    from sqcompile.cache import rotate_values

    gen = torch.Generator().manual_seed(9)
    v = torch.randn(3, 4, n, 16, generator=gen).to(torch.bfloat16)
    mean, basis = torch.randn(4, 16, generator=gen), torch.linalg.qr(torch.randn(4, 16, 16, generator=gen))[0]
    ref = torch.matmul(v.double() - mean.double()[None, :, None, :], basis.double().transpose(-1, -2))
    got = rotate_values(v, mean, basis)
    assert got.shape == (3, 4, n, 16) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, atol=1e-5)


@pytest.mark.cuda
def test_optimize_generate_on_cuda_with_cuda_graphs_equals_the_eager_cache():
    """`sqcompile.optimize(...).generate` on a GPU with CUDA graphs (head_dim 128, bf16, the fast layout: the CUDA
    decode kernel). Its cache must exist before the compiled prefill (`SpectralCache.allocate`): buffers made inside
    the graph had no static address and the first decode step failed to launch. Logits equal the eager cache's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqcompile.kernels import decode_attention_cuda as dc

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval().to("cuda", torch.bfloat16)
    ids = torch.randint(1, 256, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = model.generate(ids, past_key_values=SpectralCache(model, bits=2.69, max_cache_len=64, layout="fast"), **kw)
    torch._dynamo.reset()
    calls = dc.STATS["calls"]
    opt = sqcompile.optimize(model, bits=2.69, max_cache_len=64, layout="fast", cudagraphs=True)
    try:
        for _ in range(2):  # the second call replays the recorded graphs
            got = opt.generate(ids, **kw)
    finally:
        del model.forward
        torch._dynamo.reset()
    assert dc.STATS["calls"] > calls  # the CUDA decode kernel ran
    steps = 0
    for i, (a, b) in enumerate(zip(got.logits, want.logits)):
        rel = float((a.float() - b.float()).norm() / b.float().norm())
        assert rel < 3e-2, (i, rel)
        steps += 1
        if not torch.equal(got.sequences[:, 40 + i], want.sequences[:, 40 + i]):
            break  # a near-tie picked another token: later steps read different prompts
    assert steps >= 2
