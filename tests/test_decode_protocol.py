"""The decode quality protocol (issue #17): every allocated per-sequence byte counted, the incremental eager read
equal to the full one, the token-by-token scorer, and (slow) the real model on the protocol's proxy."""
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
@pytest.mark.parametrize("outliers", [0, 4])
def test_sequence_nbytes_counts_every_allocated_per_sequence_byte(layout, outliers):
    model = _model("llama")
    cfg = model.config
    batch, capacity = 3, 40
    cache = SpectralCache(model, bits=3.25, max_cache_len=capacity, layout=layout, outlier_tokens=outliers,
                          read_copy=True)
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
    assert cache.sequence_nbytes == expected
    assert cache.sequence_nbytes == cache.nbytes + cache.sink_nbytes


@pytest.mark.parametrize("layout", ["planes", "fast"])
@pytest.mark.parametrize("outliers", [0, 3])
def test_read_copy_returns_what_the_full_read_returns(layout, outliers):
    """read_copy dequantizes only the rows written since the last read; what attention reads is the full read's:
    prefill chunks, single decode steps, the exact slots moving, and a crop (the copy rebuilt)."""
    model = _model("llama")
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    full = SpectralCache(model, bits=3.25, max_cache_len=48, layout=layout, outlier_tokens=outliers)
    inc = SpectralCache(model, bits=3.25, max_cache_len=48, layout=layout, outlier_tokens=outliers, read_copy=True)
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
    from sqcompile.hf import load_text, smollm2_dir

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir()))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "m"), tok.save_pretrained(tmp_path / "m")
    profile = calibrate(model, load_text("britannica", prefer_shared=True)[:20000], tokenizer=tok, max_tokens=1024,
                        progress=False)
    profile.save(tmp_path / "p.safetensors")
    rc = main(["eval", "--model", str(tmp_path / "m"), "--context", "80", "--scored", "8", "--budgets", "4.25",
               "--profile", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "| FP16 |" in out and "| fast 4.25 bits |" in out and "| planes 4.25 bits |" in out, out
    assert "error" not in out and (tmp_path / "out" / "eval-decode.json").is_file()
    with pytest.raises(ValueError, match="never downloads"):
        main(["eval", "--model", str(tmp_path / "missing"), "--profile", str(tmp_path / "p.safetensors")])
