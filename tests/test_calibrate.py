import pytest
import torch

from sqcompile.calibrate import calibrate


def _hooked_kv(model, ids):
    """Post-RoPE K/V per layer, captured independently by wrapping DynamicLayer.update."""
    from transformers import DynamicCache

    seen = {}

    class Recording(DynamicCache):
        def update(self, k, v, layer_idx, *args, **kwargs):
            seen.setdefault(layer_idx, []).append((k.detach().clone(), v.detach().clone()))
            return super().update(k, v, layer_idx, *args, **kwargs)

    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=True, cache=Recording(config=model.config))
    return {
        l: (torch.cat([k for k, _ in kv], 2), torch.cat([v for _, v in kv], 2)) for l, kv in seen.items()
    }


def test_calibrate_counts_tokens_and_matches_direct_moments(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 40))
    profile = calibrate(tiny_llama, ids, seconds=60, chunk=64, progress=False)
    assert profile.tokens == 120
    assert profile.key_mean.shape == (2, 2, 16) and profile.value_eigvecs.shape == (2, 2, 16, 16)
    kv = _hooked_kv(tiny_llama, ids)
    for layer in range(2):
        for kind, x in (("key", kv[layer][0]), ("value", kv[layer][1])):
            for h in range(2):
                xs = x[:, h].reshape(-1, 16).double()
                assert xs.shape[0] == 120
                mu = xs.mean(0)
                cov = (xs - mu).T @ (xs - mu) / xs.shape[0]
                assert torch.allclose(profile.mean(kind)[layer, h].double(), mu, atol=1e-5)
                R = profile.eigvecs(kind)[layer, h].double()
                lam = profile.eigvals(kind)[layer, h].double()
                # rows are eigenvectors, eigenvalues descending: R cov R^T = diag(lam)
                assert torch.allclose(R @ cov @ R.T, torch.diag(lam), atol=1e-4 * lam[0])
                assert (lam[:-1] >= lam[1:]).all()
                assert torch.allclose(lam.sum(), torch.trace(cov), rtol=1e-5)


def test_calibrate_splits_long_text_into_chunks_and_respects_max_tokens(tiny_llama):
    ids = torch.randint(0, 128, (200,))
    profile = calibrate(tiny_llama, ids, chunk=64, max_tokens=150, progress=False)
    assert profile.tokens == 150
    assert profile.meta["stopped_by"] == "max_tokens"


def test_calibrate_tokenizes_strings():
    class ByteTokenizer:
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([[b % 128 for b in text.encode()]])}

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()
    profile = calibrate(model, ["to be or not to be, " * 4], tokenizer=ByteTokenizer(), progress=False)
    assert profile.tokens == 80
    with pytest.raises(ValueError, match="no tokenizer"):
        calibrate(model, "text without a tokenizer", progress=False)


class BosByteTokenizer:
    """Bytes as token ids, with BOS 1 first unless add_special_tokens=False (as Gemma-3's tokenizer does)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([self.bos_token_id] if add_special_tokens else []) + [2 + b % 126 for b in text.encode()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_calibrate_starts_every_text_window_with_bos_where_the_tokenizer_adds_it(tiny_llama):
    """A tokenizer that starts its encodings with BOS: every calibration window of a text is BOS + chunk - 1 text
    tokens (what the model sees in use), and the moments are those of exactly these windows; a tokenizer without
    BOS (or token ids given directly) cuts the text as it is."""
    tok = BosByteTokenizer()
    text = "to be or not to be, " * 4  # 80 bytes
    profile = calibrate(tiny_llama, text, tokenizer=tok, chunk=32, progress=False)
    body = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    windows = [torch.cat([torch.tensor([1]), body[i:i + 31]]) for i in range(0, 80, 31)]
    assert profile.tokens == 80 + len(windows) == 83
    direct = calibrate(tiny_llama, windows, chunk=32, progress=False)
    assert direct.tokens == 83
    for kind in ("key", "value"):
        assert torch.allclose(profile.mean(kind), direct.mean(kind), atol=1e-6)
        assert torch.allclose(profile.eigvals(kind), direct.eigvals(kind), rtol=1e-5, atol=1e-6)
    tok.bos_token_id = None  # no BOS: 80 text tokens in windows of 32
    assert calibrate(tiny_llama, text, tokenizer=tok, chunk=32, progress=False).tokens == 80


def test_too_short_text_says_how_many_tokens_are_needed(tiny_llama):
    with pytest.raises(ValueError, match=r"10 tokens, need at least head_dim \+ 1 = 17"):
        calibrate(tiny_llama, torch.randint(0, 128, (10,)), progress=False)
    with pytest.raises(ValueError, match="0 tokens"):
        calibrate(tiny_llama, torch.zeros(0, dtype=torch.long), progress=False)


def test_measure_kv_sensitivity_with_the_fast_layout(tiny_llama):
    """The sensitivity pass measures the format it is asked for: KL per unit predicted error of the fast codec (not
    the planes one) per (layer, kind), mean 1, recorded with its layout; build_codec then allocates by it."""
    from sqcompile.calibrate import measure_kv_sensitivity
    from sqcompile.quant import build_codec

    torch.manual_seed(0)
    profile = calibrate(tiny_llama, torch.randint(0, 128, (2, 64)), seconds=60, progress=False)
    ids = torch.randint(0, 128, (96,))
    fast = measure_kv_sensitivity(tiny_llama, ids, profile, bits=3.25, progress=False, layout="fast")
    assert "layout fast" in profile.meta["kv_sensitivity_info"]
    planes = measure_kv_sensitivity(tiny_llama, ids, profile, bits=3.25, progress=False)
    assert "layout planes" in profile.meta["kv_sensitivity_info"]
    for sens in (fast, planes):
        assert len(sens) == 2 and all(len(row) == 2 and min(row) >= 0 for row in sens)
        assert abs(sum(map(sum, sens)) / 4 - 1) < 1e-9
    assert fast != planes
    profile.meta["kv_sensitivity"] = fast
    assert build_codec(profile, bits=3.25, layout="fast").config["layer_adaptive"]


def test_sensitivity_runs_that_start_at_their_layer_equal_full_runs():
    """measure_kv_sensitivity's default replays layers 0..l-1 from one recorded run for the run that quantizes
    layer l: the same numbers as running every layer each time, and layer j's attention runs 2 + 2 (j + 1) times
    per chunk (FP16, the recording, the runs of layers 0..j) instead of 1 + 2L."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqcompile.calibrate import measure_kv_sensitivity

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, attn_implementation="sdpa")  # peaked attention: every KL > 0
    model = LlamaForCausalLM(config).eval()
    profile = calibrate(model, torch.randint(0, 128, (2, 64)), seconds=60, progress=False)
    ids = torch.randint(0, 128, (150,))  # 3 chunks of 64, the last one short
    counts = [0] * 4
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, j=j: counts.__setitem__(j, counts[j] + 1))
    full = measure_kv_sensitivity(model, ids, profile, progress=False, start_at_layer=False)
    assert counts == [3 * (1 + 2 * 4)] * 4
    counts[:] = [0] * 4
    fast = measure_kv_sensitivity(model, ids, profile, progress=False)
    assert counts == [3 * (2 + 2 * (j + 1)) for j in range(4)]
    assert fast == full and min(map(min, full)) > 0, (fast, full)


def test_calibrate_with_sensitivity_tokens_is_calibrate_then_the_sensitivity_pass(tiny_llama):
    """calibrate(..., sensitivity_tokens=n) equals calibrate(...) followed by measure_kv_sensitivity on the first n
    calibration tokens (what tests/test_real_model.py runs on the profile it shares with other tests)."""
    from sqcompile.calibrate import measure_kv_sensitivity

    torch.manual_seed(2)
    ids = torch.randint(0, 128, (200,))
    both = calibrate(tiny_llama, ids, chunk=64, max_tokens=150, progress=False, sensitivity_tokens=80)
    steps = calibrate(tiny_llama, ids, chunk=64, max_tokens=150, progress=False)
    measure_kv_sensitivity(tiny_llama, ids[:80], steps, progress=False)
    assert both.meta["kv_sensitivity"] == steps.meta["kv_sensitivity"]
    assert both.meta["kv_sensitivity_info"] == steps.meta["kv_sensitivity_info"]
    for name in ("key_mean", "key_eigvecs", "value_eigvals"):
        assert torch.equal(getattr(both, name), getattr(steps, name))
