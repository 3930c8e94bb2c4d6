"""Issue #6 on the real SmolLM2-135M (CPU): the compiled model with a SpectralCache at 3.76x picks the same
next token as FP16 at >= 90% of positions when both are fed the FP16 continuation (teacher forcing), and the
compiled run equals the eager SpectralCache run token for token (up to 5 picks in 256: see the comment)."""
from __future__ import annotations

import pytest
import torch

import sqcompile
from sqcompile.cache import SpectralCache
from sqcompile.evaluate import agreement, generated_positions, left_padded, teacher_forced_picks

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea:",
    "To be, or not to be, that is",
    "A good way to learn programming is",
    "The three primary colours are",
    "In the morning, the farmer",
    "Water boils at a temperature of",
    "The best thing about winter is",
]
NEW_TOKENS = 32
BITS = 4.25  # 3.76x, every byte of metadata included


@pytest.fixture(scope="module")
def runs(smollm2, smollm2_profile):
    """FP32 greedy continuations, and the teacher-forced picks of the eager and the compiled SpectralCache runs."""
    model, tok = smollm2
    torch._dynamo.reset()
    profile = smollm2_profile()  # the first 8192 Britannica tokens (tests/conftest.py)
    ids, mask = left_padded(tok, PROMPTS)
    capacity = ids.shape[1] + NEW_TOKENS + 1
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.eos_token_id or 0)
    continuation = ref[:, ids.shape[1]:]
    assert continuation.shape[1] == NEW_TOKENS
    eager = teacher_forced_picks(model, ids, mask, continuation,
                            SpectralCache(model, profile=profile, bits=BITS, max_cache_len=capacity))
    step = torch.compile(model.forward, backend="spectralquant", options={"profile": profile, "bits": BITS,
                                                                          "lower": "eager"})
    compiled = teacher_forced_picks(step, ids, mask, continuation,
                               SpectralCache(model, profile=profile, bits=BITS, max_cache_len=capacity))
    return continuation, eager, compiled, tok.eos_token_id


@pytest.mark.slow
def test_compiled_spectral_cache_equals_eager(runs):
    _, eager, compiled, _ = runs
    # Compiled and eager compute the same function in a different float order (o_proj absorbs the value basis,
    # decode_attention rotates q instead of un-rotating K/V); a last-bit difference can move a value across a
    # quantization boundary in a later layer. Allow at most 5 of the 256 picks (2%) to differ (3 measured on CPU).
    mismatches = int((compiled != eager).sum())
    print(f"compiled vs eager SpectralCache: {mismatches} of {eager.numel()} picks differ")
    assert mismatches <= 5, f"{mismatches} picks differ between the compiled and the eager SpectralCache run"


@pytest.mark.slow
def test_teacher_forced_agreement_at_3_76x(runs):
    # 92.5% measured on CPU (the exact sink, new tokens and 4 outlier tokens: the defaults); 89.1% with the sink and
    # new tokens only, 84.9% from the codes alone; the model with bf16 weights and an exact cache scores 92.5%
    continuation, _, compiled, eos = runs
    # over the positions generate() asked the model for (up to and including the first EOS; after it,
    # generate() writes the pad token without asking): 239 of the 256 here
    agree = agreement(compiled, continuation, eos)
    print(f"teacher-forced top-1 agreement with FP32 at {16 / BITS:.2f}x: {agree:.1%}")
    assert agree >= 0.90, f"top-1 agreement {agree:.1%} < 90%"


def test_generated_positions_stop_after_first_eos():
    cont = torch.tensor([[5, 7, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 3, 4, 2]])
    valid = generated_positions(cont, eos_token_id=2)
    assert valid.tolist() == [[True, True, True, False, False], [True] * 5, [True, False, False, False, False]]
    picks = torch.tensor([[5, 0, 2, 9, 9], [5, 6, 7, 8, 0], [2, 0, 0, 0, 0]])
    assert agreement(picks, cont, eos_token_id=2) == 7 / 9
    assert generated_positions(cont, None).all()
