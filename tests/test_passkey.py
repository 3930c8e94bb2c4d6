"""Passkey retrieval through the compressed cache equals the FP16 cache's (issue #17, Q3), short form.

The full table (10 depths of ~1800 and ~3500 tokens, both layouts) is `benchmarks/passkey.py`; this runs 3 depths
of ~1000 tokens of SmolLM2-135M through the FP16 cache and `sqcompile.optimize`'s SpectralCache at 5x (fast
layout, eager lowering), greedy: the compressed cache must pass exactly the trials the FP16 cache passes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_passkey_at_5x_equals_fp16(smollm2, smollm2_profile):
    import passkey
    import sqcompile
    from sqcompile import evaluate as ev

    model, tok = smollm2
    profile = smollm2_profile()  # the first 8192 Britannica tokens (tests/conftest.py)

    def fp16(ids):
        cache = ev.simulated_cache(ev.EvalState(None, (), fp16=True), model.config)
        with torch.no_grad():
            return model.generate(ids, past_key_values=cache, max_new_tokens=passkey.NEW_TOKENS, do_sample=False,
                                  pad_token_id=tok.eos_token_id)

    forward = model.forward
    torch._dynamo.reset()
    opt = sqcompile.optimize(model, profile, bits=16 / 5, max_cache_len=1280, layout="fast", lower="eager")
    try:
        def compressed(ids):
            return opt.generate(ids, max_new_tokens=passkey.NEW_TOKENS, do_sample=False,
                                pad_token_id=tok.eos_token_id)

        trials = [(0.1, 48213), (0.5, 90517), (0.9, 27364)]
        want = [passkey.trial(tok, fp16, 1000, d, k, False)["pass"] for d, k in trials]
        got = [passkey.trial(tok, compressed, 1000, d, k, False)["pass"] for d, k in trials]
    finally:
        model.forward = forward
    assert any(want), want  # the FP16 cache finds it at least once at this length
    assert got == want, (got, want)
