"""Shape changes between calls (issue #7): batch size and prompt length vary, `dynamic=True` and the default
(automatic-dynamic recompile) path both keep rotation-only logits equal to eager, and the number of graphs
compiled stays small and bounded (below dynamo's recompile limit, past which a frame falls back to eager and
would read a rotated cache with unrotated queries).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from sqcompile import SpectralProfile, backend
from sqcompile.report import Report

BATCHES = (1, 2, 3, 4, 5)
PROMPTS = (8, 12, 16)
DECODE_STEPS = 2


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attention_bias=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _generate(fn, model, ids, cache):
    """Prefill + DECODE_STEPS greedy steps; the last-position logits of every call."""
    out, x = [], ids
    with torch.no_grad():
        for _ in range(DECODE_STEPS + 1):
            logits = fn(input_ids=x, past_key_values=cache, use_cache=True).logits
            out.append(logits[:, -1])
            x = logits[:, -1:].argmax(-1)
    return torch.stack(out, 1)


def _run_shapes(model, dynamic, cache_kind="dynamic"):
    cfg = model.config
    profile = SpectralProfile.random(2, 2, 16, num_heads=4, seed=11, mean_scale=0.5)
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="spectralquant", dynamic=dynamic,
                       options={"quantize": False, "profile": profile, "lower": "eager"})
    sink: list = []
    token = backend._REPORT_SINK.set(sink)
    worst = 0.0
    try:
        for b, s in itertools.product(BATCHES, PROMPTS):
            ids = torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(b * 100 + s))
            make = (lambda: StaticCache(config=cfg, max_cache_len=32)) if cache_kind == "static" else \
                (lambda: DynamicCache(config=cfg))
            ref = _generate(model, model, ids, make())
            got = _generate(fn, model, ids, make())
            err = ((got - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
            assert err < 1e-4, (b, s, err)
    finally:
        backend._REPORT_SINK.reset(token)
    report = Report(sites=sink)
    att = report.by_kind("attention")
    assert att and all(s.rewritten for s in att), str(report)
    return len(report.graphs), worst


def test_batch_and_prompt_changes_default_recompile(llama):
    """Default torch.compile (automatic dynamic shapes): 15 (batch, prompt) pairs, each prefill + 2 decode steps.

    Bound: 6 graphs (measured 6 on torch 2.13). Dynamo compiles a static graph for the first shape, then
    recompiles once per dimension that turns out to vary (batch, prompt length, past length), with size 1
    (batch 1, the one-token decode) specialized apart: about three prefill graphs and three decode graphs.
    The backend itself must add no guard (it never calls int() on a SymInt): one guard on a size and every
    new (batch, prompt, past) would recompile, 15 x 3 calls here. 8 is dynamo's default recompile limit; at
    it a frame silently falls back to eager and would read a rotated cache with unrotated queries, so the
    bound must stay below 8.
    """
    graphs, worst = _run_shapes(llama, dynamic=None)
    assert graphs <= 6, f"{graphs} graphs compiled for 15 shapes (worst rel err {worst:.1e})"


def test_batch_and_prompt_changes_dynamic_true(llama):
    """dynamic=True: sizes are symbolic from the start; only the size-1 specializations (batch 1, one-token
    decode) split graphs. Bound: 4 (measured 4 on torch 2.13: prefill/decode x batch 1/batch > 1)."""
    graphs, worst = _run_shapes(llama, dynamic=True)
    assert graphs <= 4, f"{graphs} graphs compiled for 15 shapes (worst rel err {worst:.1e})"


def test_batch_and_prompt_changes_static_cache(llama):
    """StaticCache per call (buffers allocated lazily inside the prefill graph, graph inputs when decoding).
    Bound: 5 (measured 5 on torch 2.13; the decode shapes do not grow with the past length here)."""
    graphs, worst = _run_shapes(llama, dynamic=None, cache_kind="static")
    assert graphs <= 5, f"{graphs} graphs compiled for 15 shapes (worst rel err {worst:.1e})"


def test_sliding_window_static_cache_through_every_write_form():
    """Gemma-2 sliding-window StaticCache: a short prompt (index_copy), a chunk that fills the window (cat +
    copy of the last window), a chunk on a full window (cat), one-token decode on a full window (roll + write
    the last slot), a long chunk. Every graph writes the same layer's cache: if one of them left the site
    alone while another rotated it, the cache would be read in the wrong basis (this failed before the roll
    and copy forms were proven: rel error ~1 once the window filled)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_architectures import build, random_profile

    model = build("gemma2")  # sliding_window=8 on layer 0
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    chunks = [(0, 6), (6, 10), (10, 14), (14, 15), (15, 16), (16, 24)]

    def run(fn):
        cache, outs = StaticCache(config=model.config, max_cache_len=32), []
        with torch.no_grad():
            for a, b in chunks:
                outs.append(fn(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits)
        return outs

    ref = run(model)
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="spectralquant",
                       options={"quantize": False, "profile": random_profile(model.config), "lower": "eager"})
    sink: list = []
    token = backend._REPORT_SINK.set(sink)
    try:
        got = run(fn)
    finally:
        backend._REPORT_SINK.reset(token)
    for (a, b), r, g in zip(chunks, ref, got):
        assert ((g - r).norm() / r.norm()).item() < 1e-4, (a, b)
    report = Report(sites=sink)
    att = report.by_kind("attention")
    assert all(s.rewritten for s in att), str(report)
    assert {"index_copy", "cat", "roll"} <= {s.kv_write for s in att}, str(report)
