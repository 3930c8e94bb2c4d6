"""Hybrid decoders (softmax attention in some layers; state-space, linear-attention or short-convolution blocks in
the others) under the backend, each a tiny random config with the model's own hybrid cache (transformers'
`DynamicCache(config=...)`: linear-attention layers beside KV layers).

- rotation only: the logits of a 12-token prefill and 4 greedy steps equal eager within 1e-4;
- `explain` has a row for every block: the attention layers rewritten (Qwen3-Next's and Qwen3.5's gated attention
  output with the value rotation undone at the read, tests/test_gated_attention.py), each state-space /
  linear-attention / convolution block a "mixer" row left alone as "not softmax attention";
- with quantization the attention layers are quantized through the plain hybrid cache (SpectralCache's format);
- `SpectralCache` (and `sqcompile.optimize`, which generates with one) refuses a hybrid model with an error that
  names the layers it has no layer for.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from sqcompile import SpectralProfile, backend
from sqcompile.cache import SpectralCache, non_attention_layers
from sqcompile.profile import model_fingerprint
from sqcompile.report import Report
from test_hf_models import _decode as hf_decode  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GATED = "gated"  # o_proj(attn * sigmoid(gate)): rewritten, the value rotation undone at the read (issue #22 item 5)
# arch -> (config class, model class, config kwargs, attention layers, mixer layers, attention outcome)
HYBRIDS = {
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),
             [1], [0], "rewritten"),
    "bamba": ("BambaConfig", "BambaForCausalLM",
              dict(num_hidden_layers=2, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
                   mamba_n_groups=1, mamba_chunk_size=16), [1], [0], "rewritten"),
    # attention and Mamba-2 side by side in every layer
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM",
                  dict(num_hidden_layers=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                       mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16), [0, 1], [0, 1], "rewritten"),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_expand=2,
                   mamba_dt_rank=8, use_mamba_kernels=False), [1], [0], "rewritten"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(num_hidden_layers=4, head_dim=16,
                        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
                        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                        linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32), [3], [0, 1, 2], GATED),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
                dict(num_hidden_layers=2, head_dim=16, layer_types=["linear_attention", "full_attention"],
                     linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                     linear_value_head_dim=16), [1], [0], GATED),
}
FAST = {"lfm2", "bamba"}


def build(arch):
    cfg_name, model_name, kw, *_ = HYBRIDS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**BASE, **kw)
    config._attn_implementation = "sdpa"
    return getattr(transformers, model_name)(config).eval()


def profile_of(config):
    fp = model_fingerprint(config)
    return SpectralProfile.random(fp["num_layers"], fp["num_kv_heads"], fp["head_dim"], num_heads=fp["num_heads"],
                                  seed=3, mean_scale=0.5)


def decode(fn, model, ids, steps=4):
    """Prefill and greedy steps over the model's own cache (`DynamicCache(config=...)`: hybrid layers included)."""
    return hf_decode(fn, model, "dynamic", ids, steps)


def compiled(model, options, ids):
    report = Report()
    fn = torch.compile(model.forward, backend=backend.recording_backend(report), options=options)
    return decode(fn, model, ids), report


@pytest.mark.parametrize("arch", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in HYBRIDS])
def test_hybrid_model(arch):
    torch._dynamo.reset()
    model = build(arch)
    _, _, _, attention_layers, mixer_layers, outcome = HYBRIDS[arch]
    assert sorted(non_attention_layers(model.config)) == mixer_layers
    profile = profile_of(model.config)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    eager = decode(model, model, ids)
    logits, report = compiled(model, {"quantize": False, "profile": profile, "lower": "eager"}, ids)
    assert ((logits - eager).norm() / eager.norm()).item() < 1e-4, str(report)
    assert len(report.graphs) >= 2, str(report)  # prefill and decode graphs
    for g in report.graphs:
        att, mix = report.by_kind("attention", g), report.by_kind("mixer", g)
        assert sorted(s.layer for s in att) == attention_layers, str(report)
        assert sorted(s.layer for s in mix) == mixer_layers, str(report)
        assert all(not s.rewritten and s.reason.startswith("not softmax attention") for s in mix), str(report)
        if outcome == "rewritten":
            assert all(s.rewritten and s.rotation and s.o_proj_folded for s in att), str(report)
        else:
            assert all(s.rewritten and s.rotation and not s.o_proj_folded and s.output_rotation
                       and "'mul' before any projection" in s.output_rotation for s in att), str(report)
    # quantized: the attention layers read SpectralCache's format through the plain hybrid cache
    torch._dynamo.reset()
    _, report = compiled(model, {"profile": profile, "bits": 2.69, "lower": "eager"}, ids)
    att = report.by_kind("attention")
    assert att and all(s.quantized and s.rewritten for s in att), str(report)
    with pytest.raises(ValueError, match="convolution / recurrent state"):
        SpectralCache(model, profile, bits=2.69, max_cache_len=32)


def test_optimize_refuses_a_hybrid_model_at_once():
    import sqcompile

    model = build("lfm2")
    forward = model.forward
    with pytest.raises(ValueError, match=r"layer\(s\) with a convolution / recurrent state \(.*0: "):
        sqcompile.optimize(model, profile_of(model.config), bits=2.69, max_cache_len=32)
    assert model.forward == forward  # nothing compiled or replaced


def test_non_attention_layers_is_empty_for_attention_only_models():
    config = transformers.LlamaConfig(**BASE, num_hidden_layers=2)
    assert non_attention_layers(config) == {}
    gpt_oss = transformers.GptOssConfig(**BASE, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                        layer_types=["sliding_attention", "full_attention"])
    assert non_attention_layers(gpt_oss) == {}
