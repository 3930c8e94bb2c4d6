"""Layer identity from dynamo's `nn_module_stack` (the module path a node was traced in), not from parameter names:
GPT-J's `transformer.h.N` layers get their index, so the cross-graph consistency check (`backend._check_consistent`)
runs on them instead of being skipped for sites numbered by their order in the graph."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx

import sqcompile
from sqcompile import backend
from sqcompile.passes.fx_utils import layer_from_module_stack


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=256, rotary_dim=8,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return GPTJForCausalLM(cfg).eval()


def test_module_stack_paths_give_the_layer():
    g = fx.Graph()
    n = g.placeholder("x")
    for path, want in (("model.layers.3.self_attn.k_proj", 3), ("L['self'].transformer.h[2].attn.v_proj", 2),
                       ("encoder.block.4.layer.0.SelfAttention", 4), ("L['args'][0].model.layers.1.self_attn", 1),
                       ("L['self']._modules['lm_head']", None), ("lm_head", None)):
        n.meta["nn_module_stack"] = {"outer": ("model", object), "inner": (path, object)}
        assert layer_from_module_stack(n) == want, path
    n.meta.pop("nn_module_stack")
    assert layer_from_module_stack(n) is None


def test_gptj_sites_have_their_layers_and_the_consistency_check_runs():
    model = _gptj()
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    report = sqcompile.explain(model, input_ids=ids, options={"quantize": False})
    attention = report.by_kind("attention")
    assert sorted(s.layer for s in attention) == [0, 1, 2], str(report)
    assert all(s.rewritten and not s.nodes.get("layer_from_order") for s in attention), str(report)
    scope: dict = {}
    backend._check_consistent(scope, attention)  # records each layer's decision
    assert set(backend._decisions[id(scope)][1]) == {0, 1, 2}
    flipped = [dataclasses.replace(attention[0], rewritten=False, reason="left alone in another graph")]
    with pytest.raises(RuntimeError, match="attention at layer 0 was rewritten in an earlier graph"):
        backend._check_consistent(scope, flipped)
