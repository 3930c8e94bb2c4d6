"""The decode quality protocol (issue #17): every allocated per-sequence byte counted, the incremental eager read
equal to the full one, the token-by-token scorer, and (slow) the real model on the full protocol."""
from __future__ import annotations

import pytest
import torch

from sqcompile.cache import SpectralCache, SpectralLayer

from test_hf_models import _model


def _kv(cfg, batch, n, gen):
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_key_value_heads, n, head_dim)
    return torch.randn(shape, generator=gen) * 2 + 0.5, torch.randn(shape, generator=gen)


def _tensor_attributes(layer) -> dict:
    return {name: t for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("layout", ["planes", "fast"])
@pytest.mark.parametrize("outliers,window", [(0, 0), (4, 0), (4, 16)])
def test_sequence_nbytes_counts_every_allocated_per_sequence_byte(layout, outliers, window):
    model = _model("llama")
    cfg = model.config
    batch, capacity = 3, 40
    cache = SpectralCache(model, bits=3.25, max_cache_len=capacity, layout=layout, outlier_tokens=outliers,
                          read_copy=True, recent_window=window)
    with torch.no_grad():
        model(input_ids=torch.zeros(batch, 5, dtype=torch.long), past_key_values=cache, use_cache=True)
    capacity = cache.max_cache_len  # fast: rounded up to a multiple of 8
    total = 0
    for layer in cache.layers:
        tensors = _tensor_attributes(layer)
        # every tensor a layer holds is per-sequence storage, a per-model constant, the reader's buffer of
        # read_copy, or the length counter; nothing else (a new buffer must be classified, and counted)
        known = set(SpectralLayer.SEQUENCE_TENSORS) | set(SpectralLayer.CONSTANTS) | set(SpectralLayer.READ_BUFFERS)
        assert set(tensors) <= known | {"cumulative_length"}, set(tensors) - known
        per_sequence = [t for n, t in tensors.items() if n in SpectralLayer.SEQUENCE_TENSORS]
        assert all(t.shape[0] == batch for t in per_sequence)  # one per batch row
        assert layer.sequence_nbytes == sum(t.nbytes for t in per_sequence)
        assert layer.constant_nbytes == sum(t.nbytes for n, t in tensors.items() if n in SpectralLayer.CONSTANTS)
        # the reader's buffers and the constants do not grow with the batch; the codes are 1/8 ... of FP16
        total += layer.sequence_nbytes
    assert cache.sequence_nbytes == total
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    slots = 1 + outliers
    expected = batch * cfg.num_hidden_layers * cfg.num_key_value_heads * (
        capacity * 0 + slots * head_dim * 4 * 2) + batch * cfg.num_hidden_layers * slots * (8 + 4)
    expected += batch * capacity * cache.packed_bytes_per_token()
    # the recent window: fp16 K and V per kv-head, and an int64 position per slot
    expected += batch * cfg.num_hidden_layers * window * (cfg.num_key_value_heads * head_dim * 2 * 2 + 8)
    assert cache.sequence_nbytes == expected
    if not window:
        assert cache.sequence_nbytes == cache.nbytes + cache.sink_nbytes


@pytest.mark.parametrize("layout", ["planes", "fast"])
@pytest.mark.parametrize("outliers,window", [(0, 0), (3, 0), (3, 6)])
def test_read_copy_returns_what_the_full_read_returns(layout, outliers, window):
    """read_copy dequantizes only the rows written since the last read; what attention reads is the full read's:
    prefill chunks, single decode steps, the exact slots moving, and a crop (the copy rebuilt)."""
    model = _model("llama")
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    kw = dict(bits=3.25, max_cache_len=48, layout=layout, outlier_tokens=outliers, recent_window=window)
    full, inc = SpectralCache(model, **kw), SpectralCache(model, read_copy=True, **kw)
    for step, n in enumerate([7, 9, 1, 1, 1, 5, 1]):
        if step == 5:
            full.crop(-5), inc.crop(-5)  # the last 5 tokens removed
        k, v = _kv(cfg, 2, n, gen)
        for layer in range(cfg.num_hidden_layers):
            a = full.update(k, v, layer)
            b = inc.update(k, v, layer)
            for x, y in zip(a, b):
                assert x.shape == y.shape
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert inc.layers[0]._read_k is not None and full.layers[0]._read_k is None


def test_decode_perplexity_scores_exactly_the_last_tokens():
    """With an exact cache, prefill in chunks + one token at a time (or chunks of 5) gives the perplexity of the
    last `scored` tokens of one full forward: the scorer feeds and scores the right tokens."""
    import math

    import torch.nn.functional as F
    from transformers import DynamicCache

    from sqcompile.evaluate import decode_perplexity

    model = _model("llama")
    ids = torch.randint(0, model.config.vocab_size, (41,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    scored = 13
    want = math.exp(F.cross_entropy(logits[-scored - 1:-1], ids[-scored:]).item())
    for score_chunk in (1, 5):
        got = decode_perplexity(model, ids, lambda: DynamicCache(config=model.config), scored=scored,
                                prefill_chunk=8, score_chunk=score_chunk)
        assert abs(got / want - 1) < 1e-5, (score_chunk, got, want)
    with pytest.raises(ValueError, match="scored must be"):
        decode_perplexity(model, ids, lambda: DynamicCache(config=model.config), scored=41)


def test_decode_context_starts_with_bos_at_any_offset():
    """bos: the window is BOS then C - 1 text tokens from `offset` (the model never sees a window without its BOS);
    without: C text tokens from `offset`. Too short a text says how many tokens it needed."""
    from sqcompile.evaluate import decode_context
    from sqcompile.hf import bos_prefix

    from test_calibrate import BosByteTokenizer

    tok = BosByteTokenizer()
    text = "abcdefghijklmnopqrstuvwxyz"
    body = tok(text, add_special_tokens=False)["input_ids"]
    assert bos_prefix(tok) == [1]
    for offset in (0, 5):
        assert decode_context(tok, text, 10, offset, bos=True).tolist() == [1] + body[offset:offset + 9]
        assert decode_context(tok, text, 10, offset).tolist() == body[offset:offset + 10]
    with pytest.raises(ValueError, match="needs 27"):
        decode_context(tok, text, 11, 17, bos=True)
    tok.bos_token_id = None
    assert bos_prefix(tok) == []


def test_evaluate_decode_rows_ratio_and_baseline():
    """FP16 row first (dPPL 0, ratio 1), then a SpectralCache row whose ratio is FP16 bytes / its allocated
    per-sequence bytes; the chunked column is the same tokens in chunks."""
    from sqcompile.evaluate import DecodeRowSpec, decode_markdown, evaluate_decode, fp16_kv_bytes

    model = _model("llama")
    ids = torch.randint(0, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(4))
    rows = [DecodeRowSpec("FP16"), DecodeRowSpec("fast 4.25", "fast", 4.25), DecodeRowSpec("bad", "fast", 99.0)]
    res = evaluate_decode(model, None, ids, rows, scored=9, prefill_chunk=16, chunked=4, progress=False)
    fp16, fast, bad = res
    assert fp16.dppl_pct == 0 and fp16.compression == 1 and fp16.error is None
    assert fast.error is None and bad.error is not None and "bits" in bad.error
    cache = SpectralCache(model, bits=4.25, max_cache_len=48, layout="fast")
    with torch.no_grad():
        model(input_ids=ids[None, :2], past_key_values=cache, use_cache=True)
    assert fast.sequence_bytes == cache.sequence_nbytes and fast.fp16_bytes == fp16_kv_bytes(model.config, 48)
    assert fast.compression == fast.fp16_bytes / fast.sequence_bytes < 16 / 4.25
    assert fast.ppl > 0 and fast.ppl_chunked > 0 and "fast 4.25" in decode_markdown(res)


def test_cli_eval_decode_runs_on_a_users_model_directory(tmp_path, capsys):
    """`sqcompile eval --model DIR --context C` on a local transformers directory (a tiny Llama with SmolLM2's
    tokenizer), with a profile calibrated beforehand: the table has the FP16 row and each layout's rows."""
    import transformers

    from sqcompile.calibrate import calibrate
    from sqcompile.cli import main
    from models import smollm2_dir, text

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir()))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "m"), tok.save_pretrained(tmp_path / "m")
    profile = calibrate(model, text("britannica")[:20000], tokenizer=tok, max_tokens=1024,
                        progress=False)
    profile.save(tmp_path / "p.safetensors")
    rc = main(["eval", "--model", str(tmp_path / "m"), "--context", "80", "--scored", "8", "--budgets", "4.25",
               "--window", "8", "--window-bits", "2.75,3.25", "--profile", str(tmp_path / "p.safetensors"),
               "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "| FP16 |" in out and "| fast 4.25 bits |" in out and "| planes 4.25 bits |" in out, out
    assert "| fast 2.75 bits + recent window 8 |" in out and "| fast 3.25 bits + recent window 8 |" in out
    assert "error" not in out and (tmp_path / "out" / "eval-decode.json").is_file()
    with pytest.raises(ValueError, match="never downloads"):
        main(["eval", "--model", str(tmp_path / "missing"), "--profile", str(tmp_path / "p.safetensors")])


@pytest.mark.parametrize("layout", ["planes", "fast"])
def test_recent_window_reads_the_last_tokens_exact(layout):
    """recent_window=W: the rows of the last W positions read the exact K/V (fp16), a window that wraps
    (W < tokens written) and a crop; every other row reads what the cache without a window reads."""
    model = _model("llama")
    cfg = model.config
    gen = torch.Generator().manual_seed(5)
    W = 5
    plain = SpectralCache(model, bits=3.25, max_cache_len=48, layout=layout, exact_new=False)
    win = SpectralCache(model, bits=3.25, max_cache_len=48, layout=layout, exact_new=False, recent_window=W)
    written_k, written_v = [], []
    for step, n in enumerate([9, 1, 3, 1, 1]):
        if step == 3:
            plain.crop(-2), win.crop(-2)  # the last 2 tokens removed
            written_k, written_v = [written_k[0][:, :, :-2]], [written_v[0][:, :, :-2]]
        k, v = _kv(cfg, 2, n, gen)
        written_k, written_v = [torch.cat(written_k + [k], 2)], [torch.cat(written_v + [v], 2)]
        a, b = plain.update(k, v, 0), win.update(k, v, 0)
        end = written_k[0].shape[2]
        # after the crop (13 -> 11 tokens, then 1 more) the ring holds 8, 9, 10 from before and the new 11
        recent = torch.arange(max(0, end - W if step != 3 else 8), end)
        other = torch.tensor([t for t in range(48) if t not in set(recent.tolist())])
        torch.testing.assert_close(b[0][:, :, recent], written_k[0][:, :, recent], rtol=2e-3, atol=2e-3)  # fp16
        torch.testing.assert_close(b[1][:, :, recent], written_v[0][:, :, recent], rtol=2e-3, atol=2e-3)
        assert (a[0][:, :, recent] - written_k[0][:, :, recent]).abs().max() > 1e-2  # the codes are not exact
        torch.testing.assert_close(b[0][:, :, other], a[0][:, :, other]), torch.testing.assert_close(b[1][:, :, other], a[1][:, :, other])
    with pytest.raises(ValueError, match="recent_window"):
        SpectralCache(model, bits=3.25, recent_window=-1)


# --- the real model on the full protocol (slow) -----------------------------------------------------------
# Calibration on the first 1024 Britannica tokens, what calibrate()'s defaults use on 2 busy cores (its 15 s
# budget stops after one 1024-token window), fixed here so the test does not depend on the machine's load.
# The row that meets Q1 (CPU, 2026-12-07): 5.18x at +2.52% dPPL. (Scoring only the last 128 tokens reads the same
# row at +4.53%: 128 tokens cannot rank rows this close, so no shorter proxy is tested.)
Q1_ROW = dict(name="fast 2.75 bits + recent window 48", layout="fast", bits=2.75, cache_kwargs={"recent_window": 48})


@pytest.mark.slow
def test_real_model_decode_q1(smollm2, shared_texts):
    """Issue #17's Q1 on the full decode protocol (C = 2048, the last 512 tokens token by token): the fast format at
    2.75 bits with the last 48 tokens exact keeps >= 5.0x at dPPL <= +3% (measured 5.18x at +2.52%, CPU, 2026-12-07;
    about 2 minutes on an idle CPU core). The FP16 baseline is scored in one chunk: the FP16 cache rounds every K/V
    as it is written, before anything reads it, so that is its token-by-token perplexity
    (test_fp16_cache_scores_the_same_token_by_token_and_in_one_chunk), without 511 more single-token forwards."""
    from sqcompile.calibrate import calibrate
    from sqcompile.evaluate import (DECODE_PREFILL_CHUNK, DECODE_SCORED, DecodeRowSpec, decode_context,
                                    decode_perplexity, evaluate_decode, fp16_cache)

    torch.set_num_threads(1)
    model, tok = smollm2
    profile = calibrate(model, shared_texts["britannica"], tokenizer=tok, seconds=1e9, max_tokens=1024,
                        progress=False)
    ids = decode_context(tok, shared_texts["hamlet"], 2048)
    fp16_ppl = decode_perplexity(model, ids, lambda: fp16_cache(model.config), DECODE_SCORED, DECODE_PREFILL_CHUNK,
                                 score_chunk=DECODE_SCORED)
    best, = evaluate_decode(model, profile, ids, [DecodeRowSpec(**Q1_ROW)], chunked=None, progress=False)
    assert best.error is None, best.error
    dppl_pct = 100.0 * (best.ppl / fp16_ppl - 1.0)
    assert best.compression >= 5.0 and dppl_pct <= 3.0, (best.compression, dppl_pct)


def _tiny_gemma3(**overrides):
    """A tiny random Gemma-3 with what Gemma-3-270M has and SmolLM2 has not: head_dim 256, one kv-head, a
    sliding-window layer (window 8) beside a full one, a query pre-attention scalar other than head_dim."""
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=64, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw)).eval()
    model.config._attn_implementation = "eager"
    return model


def test_fp16_model_cache_bytes_counts_a_sliding_layer_s_window_only():
    """The model's own FP16 cache (transformers' StaticCache) holds the window on a sliding layer and the context on a
    full one; on a model without sliding layers it is every layer's context (`fp16_kv_bytes`)."""
    from sqcompile.evaluate import fp16_kv_bytes, fp16_model_cache_bytes

    gemma = _tiny_gemma3()
    per_token = 2 * 1 * 256 * 2  # K and V, one kv-head, head_dim 256, fp16
    assert fp16_model_cache_bytes(gemma.config, 48) == per_token * (8 + 48)
    assert fp16_model_cache_bytes(gemma.config, 5) == per_token * (5 + 5)
    assert fp16_kv_bytes(gemma.config, 48) == per_token * 2 * 48
    llama = _model("llama")
    assert fp16_model_cache_bytes(llama.config, 48) == fp16_kv_bytes(llama.config, 48)

    from sqcompile.evaluate import DecodeRowSpec, decode_markdown, evaluate_decode

    ids = torch.randint(3, 128, (32,), generator=torch.Generator().manual_seed(7))
    rows = [DecodeRowSpec("FP16"), DecodeRowSpec("fast 2.75 + window 4", "fast", 2.75, {"recent_window": 4})]
    fp16, fast = evaluate_decode(gemma, None, ids, rows, scored=8, prefill_chunk=8, chunked=None, progress=False)
    assert fp16.error is None and fast.error is None, (fp16.error, fast.error)
    assert fp16.compression == fp16.compression_model == 1.0
    assert fast.fp16_model_bytes == per_token * (8 + 32) and fast.fp16_bytes == per_token * 2 * 32
    assert fast.compression_model == fast.fp16_model_bytes / fast.sequence_bytes < fast.compression
    assert f"| {fast.compression_model:.2f}x |" in decode_markdown([fp16, fast])


def test_spectral_cache_on_a_sliding_window_model_with_the_window_past_it():
    """Gemma-3 layout (head_dim 256, one kv-head, a sliding layer of window 8, query scalar 64, attention
    softcapping): a SpectralCache whose recent window holds every token (so every read is the exact fp16 ring) gives,
    prefilled in chunks and then decoded token by token well past the sliding window, the logits of the FP16 cache
    (whose sliding layer holds its window only); a window shorter than the context changes them (the codes are
    read)."""
    from sqcompile.evaluate import fp16_cache
    from sqcompile.hf import cache_kwarg
    from sqcompile.profile import SpectralProfile, model_fingerprint

    model = _tiny_gemma3(attn_logit_softcapping=30.0)
    fp = model_fingerprint(model.config)
    assert fp["head_dim"] == 256 and fp["num_kv_heads"] == 1
    profile = SpectralProfile.random(fp["num_layers"], 1, 256, num_heads=fp["num_heads"], seed=5, mean_scale=0.5)
    ids = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(6))
    kwarg = cache_kwarg(model)

    def logits(cache):
        out = []
        with torch.no_grad():
            for start, stop in [(0, 8), (8, 16)] + [(t, t + 1) for t in range(16, 40)]:
                out.append(model(input_ids=ids[None, start:stop], use_cache=True, **{kwarg: cache}).logits[0])
        return torch.cat(out)

    want = logits(fp16_cache(model.config))
    for layout in ("fast", "planes"):
        got = logits(SpectralCache(model, profile, bits=2.75, max_cache_len=40, layout=layout, recent_window=40,
                                   read_copy=True))
        assert ((got - want).norm() / want.norm()).item() < 2e-3, layout
    short = logits(SpectralCache(model, profile, bits=2.75, max_cache_len=40, layout="fast", recent_window=4,
                                 read_copy=True))
    assert ((short - want).norm() / want.norm()).item() > 1e-2


def test_fp16_cache_scores_the_same_token_by_token_and_in_one_chunk():
    """The FP16 cache rounds K/V on write, so every query reads the same keys and values whether the scored tokens
    come one at a time or in one chunk: the same perplexity up to float summation order (5e-7 here), while an exact
    cache's differs by 6e-5 (the weights are large enough for fp16 rounding to show)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from sqcompile.evaluate import decode_perplexity, fp16_cache

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)).eval()
    ids = torch.randint(0, 128, (41,), generator=torch.Generator().manual_seed(6))
    by_token = decode_perplexity(model, ids, lambda: fp16_cache(model.config), scored=17, prefill_chunk=8)
    one_chunk = decode_perplexity(model, ids, lambda: fp16_cache(model.config), scored=17, prefill_chunk=8,
                                  score_chunk=17)
    exact = decode_perplexity(model, ids, lambda: DynamicCache(config=model.config), scored=17, prefill_chunk=8,
                              score_chunk=17)
    assert abs(one_chunk / by_token - 1) < 1e-5 < abs(exact / by_token - 1), (one_chunk, exact, by_token)
