"""Bad input never corrupts silently (issue #7): every case is an error with a clear message, or, for bad
numbers in the activations, the same result eager gives and no spreading through the cache.

Also the logging contract: every decision to leave a site alone is logged once under the `sqcompile` logger
and is visible through `explain`.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

import sqcompile
from sqcompile import SpectralProfile


def _profile(layers=2, kv_heads=2, head_dim=16, heads=4, seed=0):
    return SpectralProfile.random(layers, kv_heads, head_dim, num_heads=heads, seed=seed, mean_scale=0.5)


def _compile(model, **options):
    torch._dynamo.reset()
    options.setdefault("lower", "eager")
    return torch.compile(model.forward, backend="spectralquant", options=options)


def _error_text(excinfo) -> str:
    """The message chain (dynamo wraps backend errors in BackendCompilerFailed)."""
    e, parts = excinfo.value, []
    while e is not None:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


# ---- profile files --------------------------------------------------------------------------------------------

def test_truncated_profile_file(tmp_path):
    path = _profile().save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SpectralProfile.load(path)


def test_garbage_profile_file(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match="not a readable SpectralProfile"):
        SpectralProfile.load(path)


def test_flipped_header_byte(tmp_path):
    """One corrupted byte in the JSON header: still a clear error, not a crash deep in safetensors."""
    path = _profile().save(tmp_path / "p.safetensors")
    data = bytearray(path.read_bytes())
    data[10] = ord("{") if data[10] != ord("{") else ord("[")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SpectralProfile"):
        SpectralProfile.load(path)


def test_safetensors_that_is_not_a_profile(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="not a SpectralProfile"):
        SpectralProfile.load(path)


def test_profile_with_nonfinite_values(tmp_path):
    p = _profile()
    p.key_mean[0, 0, 0] = float("nan")
    path = p.save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="non-finite"):
        SpectralProfile.load(path)


def test_missing_profile_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SpectralProfile"):
        SpectralProfile.load(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="no file at"):
        sqcompile.Options.from_dict({"profile": str(tmp_path / "nope.safetensors")})


def test_corrupted_profile_through_the_backend(tmp_path, tiny_llama):
    """A profile path handed to torch.compile is loaded at compile time: the error names the file."""
    path = _profile().save(tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    fn = _compile(tiny_llama, profile=str(path), quantize=False)
    with pytest.raises(Exception) as e:
        fn(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert "corrupted or truncated" in _error_text(e) and str(path) in _error_text(e)


# ---- a profile for another model ------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,kv_heads,head_dim,needle", [
    (2, 4, 16, "num_kv_heads: profile has 4, model has 2"),  # another model's kv heads
    (2, 2, 32, "head_dim: profile has 32, model has 16"),     # another model's head_dim
    (1, 2, 16, "num_layers: profile has 1, model has 2"),     # a shallower model
    (3, 2, 16, "num_layers: profile has 3, model has 2"),     # a deeper model (same head shape)
])
def test_profile_for_another_model(tiny_llama, layers, kv_heads, head_dim, needle):
    fn = _compile(tiny_llama, profile=_profile(layers, kv_heads, head_dim), quantize=False)
    with pytest.raises(Exception) as e:
        fn(input_ids=torch.zeros(1, 4, dtype=torch.long))
    text = _error_text(e)
    assert needle in text and "layer" in text, text


def test_profile_fingerprint_mismatch_lists_every_field(tiny_llama):
    from sqcompile.profile import model_fingerprint

    other = SpectralProfile.random(3, 4, 32, num_heads=8)
    with pytest.raises(ValueError) as e:
        other.check_matches(model_fingerprint(tiny_llama.config))
    for needle in ("num_layers: profile has 3, model has 2", "num_kv_heads: profile has 4, model has 2",
                   "head_dim: profile has 32, model has 16"):
        assert needle in str(e.value)


# ---- NaN / Inf in the activations -----------------------------------------------------------------------------

def _embeds(model, ids, bad_token=None, value=float("nan")):
    x = model.get_input_embeddings()(ids).detach().clone()
    if bad_token is not None:
        x[0, bad_token, 3] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_hidden_state_rotation_only_matches_eager_pattern(tiny_llama, value):
    """Rotation only: the compiled model gives eager's NaN/Inf pattern exactly, and equal finite values."""
    model = tiny_llama
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    x = _embeds(model, ids, bad_token=5, value=value)
    with torch.no_grad():
        ref = model(inputs_embeds=x, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
        out = _compile(model, profile=_profile(), quantize=False)(
            inputs_embeds=x, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert not fin.all() and fin[1].all()  # the bad token poisons its own sequence only
    assert torch.allclose(out[fin], ref[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_nonfinite_token_does_not_spread_through_the_quantized_cache(tiny_llama, value, cache):
    """quantize=True: one token's NaN/Inf K/V must not change any other token's stored (quantized) K/V.

    Layer 0's K/V depend on each token's own embedding only, so the stored layer-0 cache of every other token
    must be bit-identical to a run without the bad value."""
    model, bad = tiny_llama, 5
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    make = (lambda: StaticCache(config=model.config, max_cache_len=16)) if cache == "static" else \
        (lambda: DynamicCache(config=model.config))
    fn = _compile(model, bits=4.25, quantize=True)
    stored = []
    for x in (_embeds(model, ids), _embeds(model, ids, bad_token=bad, value=value)):
        c = make()
        with torch.no_grad():
            fn(inputs_embeds=x, past_key_values=c, use_cache=True)
        stored.append((c.layers[0].keys[:, :, :12].clone(), c.layers[0].values[:, :, :12].clone()))
    (k0, v0), (k1, v1) = stored
    others = torch.ones(2, 12, dtype=torch.bool)
    others[0, bad] = False
    for clean, dirty in ((k0, k1), (v0, v1)):
        assert torch.isfinite(clean).all()
        assert torch.equal(dirty.transpose(1, 2)[others], clean.transpose(1, 2)[others])
        assert not torch.isfinite(dirty[0, :, bad]).all()  # the bad token itself is not silently "repaired"


# ---- options ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,exc,needle", [
    ("fast", TypeError, "must be a dict"),
    ({"bits": "4"}, TypeError, "'bits'"),
    ({"bits": True}, TypeError, "'bits'"),
    ({"bits": -1.0}, ValueError, "'bits'"),
    ({"bits": math.nan}, ValueError, "'bits'"),
    ({"quantize": "yes"}, TypeError, "'quantize'"),
    ({"moe": 1}, TypeError, "'moe'"),
    ({"cudagraphs": "on"}, TypeError, "'cudagraphs'"),
    ({"profile": 3}, TypeError, "'profile'"),
    ({"profile": {"layers": 2}}, TypeError, "'profile'"),
    ({"kernels": "cuda"}, ValueError, "'kernels'"),
    ({"lower": "tvm"}, ValueError, "'lower'"),
    ({"method": "gptq"}, ValueError, "'method'"),
    ({"seed": 1.5}, TypeError, "'seed'"),
    ({"outlier_tokens": 8}, ValueError, "'outlier_tokens'"),
    ({"outlier_tokens": True}, ValueError, "'outlier_tokens'"),
    ({"recent_window": -1}, ValueError, "'recent_window'"),
    ({"recent_window": 2.0}, ValueError, "'recent_window'"),
    ({"recent_window": True}, ValueError, "'recent_window'"),
    ({"Quantize": False}, ValueError, "unknown spectralquant option"),
])
def test_options_of_the_wrong_type(options, exc, needle):
    with pytest.raises(exc, match=needle):
        sqcompile.Options.from_dict(options)
    # and through torch.compile: the same message reaches the user
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2, backend="spectralquant", options=options)
    with pytest.raises(Exception) as e:
        fn(torch.randn(3))
    assert needle in _error_text(e)


def test_outlier_tokens_option_defaults_to_the_caches():
    from sqcompile.kernels.sink import OUTLIER_TOKENS

    assert sqcompile.Options().outlier_tokens == OUTLIER_TOKENS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU can run Triton")
def test_triton_kernels_without_a_gpu(monkeypatch, tiny_llama):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fn = _compile(tiny_llama, kernels="triton", quantize=False)
    with pytest.raises(Exception) as e:
        fn(input_ids=torch.zeros(1, 4, dtype=torch.long))
    text = _error_text(e)
    assert "kernels='triton' cannot run here" in text
    assert "TRITON_INTERPRET=1" in text or "not importable" in text


def test_tensorrt_kernels_without_sm100(tiny_llama):
    fn = _compile(tiny_llama, kernels="tensorrt", quantize=False)
    with pytest.raises(Exception) as e:
        fn(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert "kernels='tensorrt' cannot run here" in _error_text(e)


# ---- logging: every decision to leave a site alone, once, under `sqcompile`, and in explain -----------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def sq_log():
    """Records of the `sqcompile` logger at INFO (a handler of our own: works with `-p no:logging` too)."""
    logger, handler = logging.getLogger("sqcompile"), _Records()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


class _TwoRefusedSites(nn.Module):
    """Two attention blocks whose v_proj output also feeds a side sum: neither value rotation can be folded into
    v_proj (a second reader would see rotated values), so both sites are left alone. (A second reader of the attention
    output no longer refuses a site: the output rotation undoes the value basis there.)"""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({n: nn.Linear(32, 32) for n in ("q_proj", "k_proj", "v_proj",
                                                                              "o_proj")}) for _ in range(2))

    def forward(self, x):
        b, s, _ = x.shape
        side = 0
        for blk in self.layers:
            q, k = (blk[n](x).view(b, s, 4, 8).transpose(1, 2) for n in ("q_proj", "k_proj"))
            vp = blk["v_proj"](x)
            side = side + vp.mean()
            v = vp.view(b, s, 4, 8).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["o_proj"](o.transpose(1, 2).reshape(b, s, 32))
        return x + side


def test_left_alone_sites_are_logged_once_and_explained(sq_log):
    torch.manual_seed(0)
    m = _TwoRefusedSites().eval()
    x = torch.randn(2, 5, 32)
    fn = _compile(m, quantize=False)
    with torch.no_grad():
        ref = m(x)
        for _ in range(3):  # three calls, one graph: each decision is logged once
            out = fn(x)
    assert torch.allclose(out, ref, atol=1e-6)
    records = [r for r in sq_log.records if r.name == "sqcompile" and "alone" in r.getMessage()]
    assert len(records) == 2, [r.getMessage() for r in records]
    assert {r.levelno for r in records} == {logging.INFO}
    assert all("also read by" in r.getMessage() for r in records)
    assert sorted("layer 0" in r.getMessage() for r in records) == [False, True]

    # explain after a compile of the same forward: dynamo would reuse the cached frame and report nothing
    torch._dynamo.reset()
    report = sqcompile.explain(m, x, options={"quantize": False})
    att = report.by_kind("attention")
    assert len(att) == 2 and not any(s.rewritten for s in att), str(report)
    for s in att:  # the logged reason is the report's reason
        assert any(s.reason in r.getMessage() for r in records), (s.reason, [r.getMessage() for r in records])
    assert "also read by" in str(report)


def test_rewritten_sites_are_not_logged_as_left_alone(sq_log, tiny_llama):
    fn = _compile(tiny_llama, quantize=False)
    with torch.no_grad():
        fn(input_ids=torch.zeros(1, 4, dtype=torch.long), past_key_values=DynamicCache(config=tiny_llama.config))
    assert not [r for r in sq_log.records if r.name == "sqcompile" and "alone" in r.getMessage()
                and "attention" in r.getMessage()]
