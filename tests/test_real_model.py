"""KV compression quality on a real model (SmolLM2-135M), and the evaluation machinery on a tiny one.

The slow tests calibrate on one shared text (Britannica 1911 "Shakespeare") and evaluate on the other
(Hamlet), feeding 1024 tokens through the simulated compressed cache in chunks of 64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from sqcompile.evaluate import RowSpec, evaluate, run_row, to_markdown

BUDGETS = (4.25, 3.25, 2.69)
EVAL_TOKENS = 1024


class IdentityCodec:
    """Stand-in codec that stores exactly (PCA basis, mean): the simulated cache must change nothing."""

    def __init__(self, profile):
        from types import SimpleNamespace

        self.head_dim = profile.head_dim
        self.bits_per_element = 16.0
        self.layers = [SimpleNamespace(key_basis=profile.key_eigvecs[l], key_mean=profile.key_mean[l],
                                       value_basis=profile.value_eigvecs[l], value_mean=profile.value_mean[l])
                       for l in range(profile.num_layers)]

    def fake_quant(self, kind, layer, x_store):
        return x_store


def _full_sequence_ppl(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float()
    return math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())


def test_chunked_eval_through_an_exact_cache_equals_one_prefill(tiny_llama):
    from sqcompile.profile import SpectralProfile

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (150,))
    profile = SpectralProfile.random(2, 2, 16, num_heads=4, mean_scale=3.0)
    ppl, state = run_row(tiny_llama, ids, codec=IdentityCodec(profile), measure_layers=[0, 1], chunk=64)
    assert ppl == pytest.approx(_full_sequence_ppl(tiny_llama, ids), rel=1e-4)
    assert state.cos_sum / state.cos_count == pytest.approx(1.0, abs=1e-5)
    assert state.attn_rel_error() < 1e-5
    # the model's attention implementation is restored afterwards
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_eval_rows_with_the_real_codec_on_a_tiny_model(tiny_llama):
    from sqcompile.calibrate import calibrate

    torch.manual_seed(1)
    profile = calibrate(tiny_llama, torch.randint(0, 128, (4, 128)), progress=False)
    ids = torch.randint(0, 128, (130,))
    rows = [RowSpec("FP16"), RowSpec("SQ", "spectralquant", 16 / 4.25),
            RowSpec("TQ+QJL", "turboquant", 16 / 4.25, qjl="all"), RowSpec("SQ+QJL", "spectralquant", 16 / 6, qjl="signal")]
    results = evaluate(tiny_llama, profile, ids, rows=rows, measure_layers=[0, 1], progress=False)
    assert [r.error for r in results] == [None] * 4, to_markdown(results)
    fp16 = results[0]
    assert fp16.ppl == pytest.approx(_full_sequence_ppl(tiny_llama, ids), rel=1e-3)
    for r in results[1:]:
        assert r.bits <= r.target_bits + 1e-6
        assert math.isfinite(r.ppl) and 0 < r.key_cosine <= 1 and r.attn_rel_error > 0
    assert "| SQ+QJL |" in to_markdown(results)


# --- SmolLM2-135M ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_results(smollm2, shared_texts, smollm2_profile):
    from sqcompile.calibrate import measure_kv_sensitivity
    from sqcompile.hf import tokenize

    model, tokenizer = smollm2
    ids = tokenize(tokenizer, shared_texts["hamlet"], max_tokens=EVAL_TOKENS)
    rows = [RowSpec("FP16")]
    for b in BUDGETS:
        rows += [RowSpec("TQ", "turboquant", 16 / b, group=str(b)),
                 RowSpec("TQ+QJL", "turboquant", 16 / b, qjl="all", group=str(b)),
                 RowSpec("SQ", "spectralquant", 16 / b, group=str(b))]
    # one thread: on 2 shared cores, 2 OpenMP threads per process run several times slower under load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # what calibrate(..., max_tokens=8192, chunk=1024, sensitivity_tokens=512) returns (tests/test_calibrate.py
        # checks that it is these two steps): the shared profile, then the sensitivity pass on the first 512 tokens
        profile = smollm2_profile()
        measure_kv_sensitivity(model, tokenize(tokenizer, shared_texts["britannica"], max_tokens=512), profile,
                               progress=False)
        results = evaluate(model, profile, ids, rows=rows, progress=False)
    finally:
        torch.set_num_threads(threads)
    print("\n" + to_markdown(results))
    return {(r.group, r.name): r for r in results}


@pytest.mark.slow
def test_fp16_cache_matches_the_model(smollm2_results):
    fp16 = smollm2_results[("", "FP16")]
    assert fp16.error is None and 5 < fp16.ppl < 60
    assert abs(fp16.dppl_pct) < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS)
def test_spectralquant_beats_turboquant(smollm2_results, budget):
    g = str(budget)
    sq = smollm2_results[(g, "SQ")]
    tq = [smollm2_results[(g, "TQ")], smollm2_results[(g, "TQ+QJL")]]
    assert sq.error is None and all(t.error is None for t in tq), [sq.error] + [t.error for t in tq]
    assert sq.bits <= budget + 1e-6 and all(t.bits <= budget + 1e-6 for t in tq)
    best_ppl = min(t.ppl for t in tq)
    best_err = min(t.attn_rel_error for t in tq)
    summary = (f"{budget} bits: SQ ppl {sq.ppl:.3f} attn err {sq.attn_rel_error:.4f}; "
               f"TQ best ppl {best_ppl:.3f} attn err {best_err:.4f}")
    assert sq.ppl < best_ppl, summary
    assert sq.attn_rel_error < best_err, summary


@pytest.mark.slow
def test_spectralquant_dppl_at_4_92x(smollm2_results):
    sq = smollm2_results[("3.25", "SQ")]
    assert sq.compression >= 4.92 - 0.01
    assert sq.dppl_pct <= 10.0, f"SpectralQuant at {sq.compression:.2f}x: dPPL {sq.dppl_pct:+.2f}%"
