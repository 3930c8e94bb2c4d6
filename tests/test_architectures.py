"""Decoder architectures the backend has never seen (issue #7): every attention site is either rewritten with
logits equal to eager, or left untouched with the reason in the report and logits still equal.

Each architecture is a tiny random config (2 layers, hidden 64, 4 heads, GQA with 2 kv heads where the
architecture has it, random nonzero biases) run through a 16-token prefill and 8 greedy decode steps with a
DynamicCache (and a StaticCache where marked) under

    torch.compile(model.forward, backend="spectralquant",
                  options={"quantize": False, "profile": SpectralProfile.random(...), "lower": "eager"})

The expected outcome is written down per architecture (EXPECT below), so a regression in either direction
fails: a site that used to be proven and is now refused, or a site that used to be refused and is now
rewritten (a new rewrite must come with its own exactness check here). The README's "Supported
architectures" table is this dict in prose.

The report is collected from the very graphs that ran the decode (prefill, first decode step, dynamic decode)
through the same sink `sqcompile.explain` uses, so every compiled graph's sites are checked, not just one.
"""
from __future__ import annotations

import time

import pytest
import torch
import transformers

from sqcompile import SpectralProfile, backend
from sqcompile.profile import model_fingerprint
from sqcompile.report import Report

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
REWRITTEN = "rewritten"
# rewritten with the value rotation undone on the attention output, where an elementwise gate between attention and
# o_proj keeps o_proj from absorbing it (tests/test_gated_attention.py)
GATED_OUTPUT = "rewritten, output rotation at the read"

# arch -> (config class, model class, config kwargs (None: BASE is not used), attn_implementation,
#          caches to run, expected outcome: REWRITTEN or a substring of the reason every site is left with,
#          expected RoPE flag of rewritten sites)
EXPECT = {
    # -- rewritten: proven and exact ---------------------------------------------------------------------------
    # soft-capped scores (tanh: the key mean is kept), sliding window on alternating layers; HF supports eager only
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
               "eager", ("dynamic", "static"), REWRITTEN, True),
    # q/k RMS norm per head, sliding + full layers
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
               "sdpa", ("dynamic", "static"), REWRITTEN, True),
    # partial rotary (half the head dim), q/k/v biases, parallel attention + MLP
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5), "sdpa", ("dynamic",), REWRITTEN, True),
    # fused qkv_proj sliced into q | k | v blocks (value rows are one contiguous block: folded exactly)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(), "sdpa", ("dynamic", "static"), REWRITTEN, True),
    # partial rotary (a quarter), qkv bias
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.25, use_qkv_bias=True),
                 "sdpa", ("dynamic",), REWRITTEN, True),
    # q/k RMS norm per head
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), "sdpa", ("dynamic",), REWRITTEN, True),
    # q/k RMS norm over the whole projection (before the head split)
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(), "sdpa", ("dynamic",), REWRITTEN, True),
    # MoE with a sigmoid-gated shared expert; attention has q/k/v biases
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64), "sdpa", ("dynamic",), REWRITTEN, True),
    # MoE: sigmoid router + learned correction bias, group-limited top-k, routed scaling, shared experts: the
    # router stays, the experts become `fused_experts`
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      first_k_dense_replace=0, n_group=1, topk_group=1, n_shared_experts=1,
                      routed_scaling_factor=2.0), "sdpa", ("dynamic",), REWRITTEN, True),
    # MoE: top-k of the raw router logits, softmax over the k chosen (= softmax, top-k, renormalise)
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(num_local_experts=4, num_experts_per_tok=2), "sdpa", ("dynamic",), REWRITTEN, True),
    # sliding window, biases everywhere
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=8), "sdpa", ("dynamic",),
                   REWRITTEN, True),
    # interleaved RoPE (stack + flatten), per-head q/k LayerNorm, parallel block
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(use_qk_norm=True), "sdpa", ("dynamic",), REWRITTEN, True),
    # interleaved partial RoPE (rotary_dim 8 of 16), MHA, eager attention
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                                   rotary_dim=8, **IDS),
             "eager", ("dynamic",), REWRITTEN, True),
    # no RoPE: ALiBi added to the scores (shift-invariant), fused Wqkv chunked in three
    "mpt": ("MptConfig", "MptForCausalLM", dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=256,
                                                **IDS),
            "eager", ("dynamic",), REWRITTEN, False),
    # fused QKV interleaved PER HEAD ([B,S,H,3d] then chunk after the head split): the value rows of each head are
    # gathered from the fused weight; MHA (GPT-NeoX has no kv-head count: BASE's is dropped)
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25, num_key_value_heads=None), "sdpa",
                 ("dynamic", "static"), REWRITTEN, True),
    # multi-query attention: [q | k | v] split on the last dim after an unsqueeze of a head dim (one kv head)
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                    dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, multi_query=True, **IDS),
                    "sdpa", ("dynamic",), REWRITTEN, False),
    # FalconLinear computes `x @ W.T` (no F.linear: rewritten as one with the folded copy), fused QKV grouped per kv
    # head [q.. | k | v], the value picked by an integer index
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    new_decoder_architecture=True, num_kv_heads=2, **IDS),
               "sdpa", ("dynamic", "static"), REWRITTEN, True),
    # learned positions, Conv1D projections (addmm with a [in, out] weight: the value rows are columns of it)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                                    **IDS),
             "sdpa", ("dynamic", "static"), REWRITTEN, False),
    # ALiBi inside baddbmm on [B*H, S, d] (q, k, v merged from their 4-D cache form), fused QKV viewed
    # [B, S, H, 3, d] and the value picked by an integer index; HF supports eager only
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, **IDS),
              "eager", ("dynamic", "static"), REWRITTEN, False),
    # attention sinks: softmax over [scores, sink] then the sink column is dropped (the weights on the values sum
    # to 1 - p_sink): the key mean is kept, the sink column gets the storage-basis value of a zero model-basis
    # value (-B_v mu_v), so the value-mean fold stays exact; sliding + full layers; its MoE is left alone. Its RoPE
    # (cat(x1 cos - x2 sin, x2 cos + x1 sin)) is not the form the report's RoPE flag recognises (the flag only
    # reports; the key rotation sits after the RoPE either way)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"]),
                "eager", ("dynamic",), REWRITTEN, False),
    # Llama-4 text: layer 0 RoPE (complex multiply) + L2 q/k norm with chunked attention (chunk 8 < the 16-token
    # prefill), layer 1 NoPE with temperature tuning (the query scaled per position) and full attention; MoE with a
    # shared expert on every layer
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(head_dim=16, intermediate_size=32, intermediate_size_mlp=128, num_local_experts=4,
                         num_experts_per_tok=1, no_rope_layers=[1, 0], attention_chunk_size=8, floor_scale=4),
                    "sdpa", ("dynamic", "static"), REWRITTEN, (True, False)),
    # gated attention output o_proj(attn * sigmoid(gate)), the gate split from q_proj per head; q/k RMS norm, partial
    # rotary; every layer full attention here (the hybrid layouts: tests/test_hybrid_models.py); MoE with a gated
    # shared expert (Qwen3-Next) or a dense MLP (Qwen3.5)
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(head_dim=16, layer_types=["full_attention"] * 2, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32),
                   "sdpa", ("dynamic", "static"), GATED_OUTPUT, True),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(head_dim=16, layer_types=["full_attention"] * 2),
                "sdpa", ("dynamic", "static"), GATED_OUTPUT, True),
    # -- left alone, with the reason --------------------------------------------------------------------------
    # multi-head latent attention: k_nope and v split per head out of kv_b_proj; the value rows are mapped, but
    # v_head_dim 8 != the qk head dim 16
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
                         n_shared_experts=1),
                    "sdpa", ("dynamic",), "value head_dim other than the key's", None),
}


# Architectures whose MoE layers are rewritten (the fused op, or `fused_experts` behind the model's router); the
# other MoE architectures here keep their MoE blocks, each row with its reason (tests/test_moe_architectures.py).
MOE_REWRITTEN = {"qwen2_moe", "glm4_moe", "granitemoe", "deepseek_v3"}

# HF refuses attn_implementation="sdpa" for these (eager only): no second implementation to try.
EAGER_ONLY = {"gemma2", "bloom", "gpt_oss", "mpt"}
# Outcomes that differ from EXPECT under another cache or attention implementation: (arch, cache, impl) -> outcome
NO_SITES = "no attention in any compiled graph"
EXPECT_OVERRIDE: dict = {
    # MPT + StaticCache: dynamo graph-breaks on the data-dependent ALiBi slice
    # (`position_bias[:, i:, j:]` with tensor bounds), so the scores, softmax and value product run eagerly between
    # graphs: no graph holds an attention to rewrite, and none holds a KV rotation either.
    ("mpt", "static", "eager"): NO_SITES,
}
# The default run: every architecture with a DynamicCache and its primary implementation (a few seconds each),
# plus StaticCache where it exercises a different write form cheaply. The rest (StaticCache for every
# architecture, the other attention implementation) is marked slow: `pytest -m slow tests/test_architectures.py`.
FAST_STATIC = {"phi3"}


def _cases():
    for arch, spec in EXPECT.items():
        impl = spec[3]
        yield pytest.param(arch, "dynamic", impl, id=f"{arch}-dynamic-{impl}")
        marks = () if arch in FAST_STATIC else (pytest.mark.slow,)
        yield pytest.param(arch, "static", impl, id=f"{arch}-static-{impl}", marks=marks)
        if arch not in EAGER_ONLY:
            other = "eager" if impl == "sdpa" else "sdpa"
            yield pytest.param(arch, "dynamic", other, id=f"{arch}-dynamic-{other}", marks=(pytest.mark.slow,))


def build(arch: str, impl: str = None):
    cfg_name, model_name, kw, default_impl, _, _, _ = EXPECT[arch]
    impl = impl or default_impl
    cfg_cls = getattr(transformers, cfg_name)
    full = dict(BASE) if "vocab_size" not in kw else {}
    full.update(kw)
    torch.manual_seed(0)
    config = cfg_cls(**full)
    config._attn_implementation = impl
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # non-trivial biases: the value-mean fold moves them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


# The prefill + greedy decode loop and the error measure are the HF model tests' own.
from test_hf_models import _decode as decode  # noqa: E402
from test_hf_models import _rel as rel  # noqa: E402


def random_profile(config, seed=3):
    fp = model_fingerprint(config)
    return SpectralProfile.random(fp["num_layers"], fp["num_kv_heads"], fp["head_dim"], num_heads=fp["num_heads"],
                                  seed=seed, mean_scale=0.5)


def compiled_decode(model, kind, ids, options, steps=8):
    """Decode under the backend; returns (logits, Report of every graph compiled on the way)."""
    fn = torch.compile(model.forward, backend="spectralquant", options=options)
    sink: list = []
    token = backend._REPORT_SINK.set(sink)
    try:
        logits = decode(fn, model, kind, ids, steps)
    finally:
        backend._REPORT_SINK.reset(token)
    return logits, Report(sites=sink)


@pytest.mark.parametrize("arch,kind,impl", list(_cases()))
def test_architecture(arch, kind, impl):
    t0 = time.time()
    _, _, _, _, _, expect, rope = EXPECT[arch]
    expect = EXPECT_OVERRIDE.get((arch, kind, impl), expect)
    model = build(arch, impl)
    cfg = model.config
    layers = model_fingerprint(cfg)["num_layers"]
    profile = random_profile(cfg)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch._dynamo.reset()
    eager = decode(model, model, kind, ids)
    logits, report = compiled_decode(model, kind, ids, {"quantize": False, "profile": profile, "lower": "eager"})
    err = rel(logits, eager)
    assert err < 1e-4, (arch, kind, err, str(report))
    if expect == NO_SITES:
        assert not report.by_kind("attention"), str(report)
        return
    assert report.graphs, f"{arch}: no attention site found in any graph"
    for g in report.graphs:
        att = report.by_kind("attention", g)
        # every attention call is found: one site per layer in every graph
        assert len(att) == layers, f"{arch}/{kind} graph {g}: {len(att)} attention sites\n{report}"
        if expect in (REWRITTEN, GATED_OUTPUT):
            assert sorted(s.layer for s in att) == list(range(layers)), str(report)
            bad = [s for s in att if not (s.rewritten and s.rotation and (
                s.o_proj_folded if expect == REWRITTEN else not s.o_proj_folded and s.output_rotation))]
            assert not bad, f"{arch}/{kind}: expected every site rewritten\n{report}"
            # one RoPE flag for every layer, or one per layer (Llama-4: RoPE and NoPE layers)
            assert all(s.rope == (rope[s.layer] if isinstance(rope, tuple) else rope) for s in att), str(report)
            # StaticCache: index_copy_, or on a sliding window the copy of the last window / roll when full
            writes = {"index_copy", "copy", "roll", "cat"} if kind == "static" else {"cat"}
            assert all(s.kv_write in writes for s in att), str(report)
        else:
            assert not any(s.rewritten for s in att), f"{arch}/{kind}: expected every site left alone\n{report}"
            assert all(s.reason and expect in s.reason for s in att), \
                f"{arch}/{kind}: expected reason containing {expect!r}\n{report}"
    # every MoE layer (a module with an `experts` child) has an MoE row: rewritten, or left alone with a reason
    moe_layers = {int(name.split("layers.")[1].split(".")[0]) for name, m in model.named_modules()
                  if "layers." in name and any(c == "experts" for c, _ in m.named_children())}
    moe = report.by_kind("moe")
    assert moe_layers <= {s.layer for s in moe}, f"{arch}/{kind}: MoE layers without a row\n{report}"
    assert all(s.rewritten or s.reason for s in moe), str(report)
    if arch in MOE_REWRITTEN:
        assert moe_layers <= {s.layer for s in moe if s.rewritten}, f"{arch}/{kind}: MoE not rewritten\n{report}"
    # the user's module is never mutated
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    print(f"{arch}/{kind}/{impl}: {time.time() - t0:.1f}s")


# Rewritten architectures whose value rows are gathered from a fused or transposed projection (issue #22 item 7):
# quantized through a SpectralCache, the compiled model (value basis folded into the gathered rows, decode kernels
# on the packed codes) equals the eager model over its own SpectralCache, step by step, as
# tests/test_spectral_cache.py checks for Llama and Qwen2.
GATHERED_ROWS = ("gpt_neox", "gpt_bigcode", "falcon", "gpt2")
# ... and the rewritten architectures with a mask or position form of their own: Llama-4's chunked attention (the
# chunk-8 mask cuts the 16-token prefill and the decode steps) and NoPE layers with temperature tuning.
QUANTIZED_ROWS = GATHERED_ROWS + ("llama4_text", "qwen3_next")


@pytest.mark.parametrize("arch", QUANTIZED_ROWS)
def test_quantized_equals_eager_spectral_cache(arch):
    from sqcompile.backend import spectralquant
    from sqcompile.cache import SpectralCache
    from test_spectral_cache import _lockstep

    torch._dynamo.reset()
    model = build(arch)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    sink: list = []
    token = backend._REPORT_SINK.set(sink)
    try:
        step = torch.compile(model.forward, backend=lambda gm, ex: spectralquant(gm, ex, options={"lower": "eager"}))
        eager_cache = SpectralCache(model, bits=3.25, max_cache_len=40)
        compiled_cache = SpectralCache(model, bits=3.25, max_cache_len=40)
        with torch.no_grad():
            _lockstep(model, step, eager_cache, compiled_cache, ids, 8, tag=(arch,))
    finally:
        backend._REPORT_SINK.reset(token)
    report = Report(sites=sink)
    layers = model_fingerprint(model.config)["num_layers"]
    for g in report.graphs:
        att = report.by_kind("attention", g)
        assert len(att) == layers and all(s.rewritten and (s.o_proj_folded or s.output_rotation)
                                          and s.kv_write == "spectral" for s in att), \
            f"{arch}\n{report}"
    print(report)


# Quantized inside the compiled graph over a plain StaticCache (the path eager-only architectures such as BLOOM take:
# the SpectralCache read is substituted for SDPA sites only): the compiled model equals the eager model over the
# Cache-API simulation with the same codec and slots, as tests/test_backend_quantization.py checks for Llama.
@pytest.mark.parametrize("arch", GATHERED_ROWS + ("bloom", "qwen3_next"))
def test_in_graph_quantization_equals_cache_simulation(arch):
    from transformers import StaticCache

    from sqcompile.evaluate import EvalState, simulated_cache
    from sqcompile.kernels.sink import OUTLIER_TOKENS
    from sqcompile.quant import build_codec

    torch._dynamo.reset()
    model = build(arch)
    cfg = model.config
    profile = random_profile(cfg, seed=5)
    bits = 4.25
    codec = build_codec(profile, bits=bits)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    step = torch.compile(model.forward, backend="spectralquant", options={"profile": profile, "bits": bits,
                                                                         "lower": "eager"})
    static = StaticCache(config=cfg, max_cache_len=64)
    sim = simulated_cache(EvalState(codec, (), keep_sink=True, exact_fresh=True, outlier_tokens=OUTLIER_TOKENS), cfg)
    sink: list = []
    token = backend._REPORT_SINK.set(sink)
    try:
        with torch.no_grad():
            for i in range(0, 48, 16):  # chunks attend to the quantized cache of earlier chunks
                x = ids[:, i:i + 16]
                a = step(input_ids=x, past_key_values=static, use_cache=True).logits
                b = model(input_ids=x, past_key_values=sim, use_cache=True).logits
                assert rel(a, b) < 2e-3, (arch, i, rel(a, b))
                if i == 16:  # and quantization did change something (BLOOM's tiny attention moves the logits least)
                    fp = model(input_ids=ids[:, :32], use_cache=False).logits[:, 16:]
                    assert rel(a, fp) > 5 * rel(a, b), (arch, rel(a, fp), rel(a, b))
    finally:
        backend._REPORT_SINK.reset(token)
    att = Report(sites=sink).by_kind("attention")
    assert att and all(s.rewritten and s.quantized for s in att), str(Report(sites=sink))
