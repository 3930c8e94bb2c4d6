"""detect_moe finds one site per MoE layer in dynamo graphs; substitute_moe rewrites only proven sites.

Graphs are captured with a tiny backend that runs the two passes and returns `gm.forward` (the lead's
backend does the same, then lowers). transformers 5.24's default experts implementation is
"grouped_mm" (traced as `transformers::grouped_mm_fallback` on CPU); "batched_mm" traces too;
"eager" breaks the graph at `nonzero`.
"""
from __future__ import annotations

import os

import pytest
import torch

from sqcompile.passes.detect_moe import detect_moe
from sqcompile.passes.substitute_moe import substitute_moe

LAYERS, HIDDEN, FFN = 2, 32, 24


def tiny_model(family: str, impl: str | None = None, experts: int = 4, top_k: int = 2):
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=top_k)
    if impl is not None:
        common["experts_implementation"] = impl
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=FFN, num_local_experts=experts, **common))
    elif family == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=FFN,
                                                   shared_expert_intermediate_size=40, num_experts=experts,
                                                   **common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=FFN,
                                                   num_experts=experts, norm_topk_prob=True, **common))
    with torch.no_grad():  # HF inits the fused expert weights small; make routing and experts matter
        for name, p in model.named_parameters():
            if "experts" in name or "mlp.gate" in name:
                p.normal_(0, 0.3)
    return model.eval()


class Capture:
    """A torch.compile backend that runs detect_moe + substitute_moe and keeps what it saw."""

    def __init__(self, kernels: str = "torch", copy_weights: bool = True):
        self.kernels = kernels
        self.copy_weights = copy_weights
        self.sites = []
        self.graphs = []

    def __call__(self, gm, example_inputs):
        sites = detect_moe(gm, graph_index=len(self.graphs))
        substitute_moe(gm, sites, example_inputs, self.kernels, copy_weights=self.copy_weights)
        self.sites.extend(sites)
        self.graphs.append(gm)
        return gm.forward


def run_compiled(model, backend, tokens: int = 7):
    torch._dynamo.reset()
    ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend=backend)(ids).logits
    return expected, got


def graph_ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"} | \
           {str(n.target) for n in gm.graph.nodes if n.op == "call_method"}


@pytest.mark.parametrize("family,impl,form", [
    ("mixtral", None, "grouped_mm"),
    ("mixtral", "batched_mm", "batched_mm"),
    ("qwen2_moe", None, "grouped_mm"),
    ("qwen3_moe", None, "grouped_mm"),
    ("qwen3_moe", "batched_mm", "batched_mm"),
])
def test_detect_and_substitute_hf_models(family, impl, form):
    model = tiny_model(family, impl, experts=8 if family == "qwen3_moe" else 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backend = Capture("torch")
    expected, got = run_compiled(model, backend)

    assert len(backend.graphs) == 1
    sites = backend.sites
    assert [s.layer for s in sites] == list(range(LAYERS))
    for s in sites:
        assert s.kind == "moe" and s.moe_form == form and s.routing == "softmax"
        assert (s.experts, s.top_k, s.hidden, s.ffn) == (model.config.num_experts if family != "mixtral"
                                                         else model.config.num_local_experts, 2, HIDDEN, FFN)
        assert s.rewritten and s.reason is None and s.kernel == "torch", s.reason
        assert s.nodes["renormalize"] == (family != "qwen2_moe")
    ops = graph_ops(backend.graphs[0])
    assert "sqcompile.fused_moe.default" in ops
    assert not any("grouped_mm" in o or o == "bmm" or "topk" in o for o in ops), ops
    if family == "qwen2_moe":  # the shared expert and its sigmoid gate stay in the graph
        assert any("sigmoid" in o for o in ops)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the user's module is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bfloat16_model():
    """bf16 Mixtral: fp32 routing weights, bf16 experts; the block ends at the cast back to bf16."""
    model = tiny_model("mixtral").to(torch.bfloat16)
    backend = Capture("torch")
    expected, got = run_compiled(model, backend, tokens=9)
    assert all(s.rewritten for s in backend.sites), [s.reason for s in backend.sites]
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_shared_weights_are_not_copied():
    model = tiny_model("mixtral")
    backend = Capture("torch", copy_weights=False)
    expected, got = run_compiled(model, backend, tokens=4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    gm = backend.graphs[0]
    experts = model.model.layers[0].mlp.experts
    site = backend.sites[0]
    fused = site.nodes["fused"]
    w_gate_up = getattr(gm, fused.args[2].target)
    assert site.rewritten and w_gate_up.data_ptr() == experts.gate_up_proj.data_ptr()


def test_top1_and_top8():
    for top_k in (1, 8):
        model = tiny_model("qwen3_moe", experts=8, top_k=top_k)
        backend = Capture("torch")
        expected, got = run_compiled(model, backend, tokens=5)
        assert [s.top_k for s in backend.sites] == [top_k] * LAYERS
        assert all(s.rewritten for s in backend.sites), [s.reason for s in backend.sites]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_token_count():
    """Prefill then decode: dynamo recompiles with a symbolic token count; both graphs are rewritten."""
    model = tiny_model("qwen2_moe")
    backend = Capture("torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for tokens in (6, 1, 3):
            ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(tokens))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(backend.graphs) == 3  # T=6, then T=1 (dynamo specialises size 1), then symbolic T
    symbolic = [s for s in backend.sites if isinstance(s.nodes["tokens"], torch.SymInt)]
    assert len(symbolic) == LAYERS
    assert all(s.rewritten for s in backend.sites), [s.reason for s in backend.sites]


@pytest.mark.slow
def test_inductor_lowers_the_rewritten_graph():
    """The rewritten graph (new expert-weight constants, the custom op) goes through compile_fx."""
    from torch._inductor.compile_fx import compile_fx

    class InductorCapture(Capture):
        def __call__(self, gm, example_inputs):
            super().__call__(gm, example_inputs)
            return compile_fx(gm, example_inputs)

    model = tiny_model("mixtral")
    backend = InductorCapture("torch")
    expected, got = run_compiled(model, backend, tokens=5)
    assert backend.sites and all(s.rewritten for s in backend.sites)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_kernel_choice_on_cpu():
    from sqcompile.passes.substitute_moe import _kernel_for

    cpu = torch.device("cpu")
    assert _kernel_for("torch", cpu)[0] == "torch"
    assert _kernel_for("auto", cpu)[0] == "torch"
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert _kernel_for("triton", cpu)[0] == "torch"  # no GPU, no interpreter: the reference op


def test_eager_experts_are_detected_and_left():
    """HF's "eager" experts loop breaks the graph at nonzero: the router's site is recorded, not rewritten.

    Every layer's block runs the same frame, so dynamo reuses one router graph for all layers.
    """
    model = tiny_model("mixtral", "eager")
    backend = Capture("torch")
    expected, got = run_compiled(model, backend, tokens=3)
    moe = [s for s in backend.sites if s.kind == "moe"]
    assert len(moe) >= 1
    assert all(s.moe_form == "loop" and not s.rewritten and "graph breaks" in s.reason for s in moe)
    torch.testing.assert_close(got, expected)


class TopkClassifier(torch.nn.Module):
    """Not an MoE: softmax over classes, then top-k scores and labels."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        probs = torch.softmax(self.head(x), dim=-1)
        values, labels = torch.topk(probs, 3, dim=-1)
        return values * 2, labels


class AlmostMoE(torch.nn.Module):
    """An MoE-shaped block that is NOT the fused op: GELU experts, or a routed scaling factor."""

    def __init__(self, variant: str, experts: int = 4, hidden: int = 16, ffn: int = 8):
        super().__init__()
        self.variant = variant
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * ffn, hidden) * 0.3)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, ffn) * 0.3)

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.variant == "scaled":
            weights = weights * 2.5
        gate_up = torch.bmm(self.gate_up_proj[ids.reshape(-1)], x.repeat_interleave(2, 0).unsqueeze(-1)).squeeze(-1)
        gate, up = gate_up.chunk(2, dim=-1)
        act = torch.nn.functional.gelu(gate) if self.variant == "gelu" else torch.nn.functional.silu(gate)
        out = torch.bmm(self.down_proj[ids.reshape(-1)], (act * up).unsqueeze(-1)).squeeze(-1)
        return (out * weights.reshape(-1, 1)).view(x.shape[0], 2, -1).sum(1)


def test_negative_graphs_are_not_rewritten():
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    backend = Capture("torch")
    torch._dynamo.reset()
    clf = TopkClassifier().eval()
    with torch.no_grad():
        got = torch.compile(clf, backend=backend)(x)
        torch.testing.assert_close(got, clf(x))
    assert backend.sites == []

    for variant in ("gelu", "scaled"):
        module = AlmostMoE(variant).eval()
        backend = Capture("torch")
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(module, backend=backend)(x)
            torch.testing.assert_close(got, module(x))
        assert len(backend.sites) == 1
        site = backend.sites[0]
        # GELU is refused by the op check; the scaling factor by the numerical proof
        why = "unexpected op gelu" if variant == "gelu" else "does not compute the fused MoE"
        assert not site.rewritten and why in site.reason, site.reason

    module = AlmostMoE("silu").eval()  # the same block with SiLU and no scaling IS the fused op
    backend = Capture("torch")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(module, backend=backend)(x)
        torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)
    assert [s.rewritten for s in backend.sites] == [True]


def test_unexpected_consumer_is_left_alone():
    """A routed intermediate used outside the block (here the top-k ids are returned) blocks the rewrite."""

    class Leaky(AlmostMoE):
        def forward(self, x):
            weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), 2, dim=-1)
            gate_up = torch.bmm(self.gate_up_proj[ids.reshape(-1)], x.repeat_interleave(2, 0).unsqueeze(-1)).squeeze(-1)
            gate, up = gate_up.chunk(2, dim=-1)
            out = torch.bmm(self.down_proj[ids.reshape(-1)], (torch.nn.functional.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
            return (out * weights.reshape(-1, 1)).view(x.shape[0], 2, -1).sum(1), ids + 1

    torch.manual_seed(0)
    module, x = Leaky("silu").eval(), torch.randn(6, 16)
    backend = Capture("torch")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(module, backend=backend)(x)
        torch.testing.assert_close(got, module(x))
    assert len(backend.sites) == 1 and not backend.sites[0].rewritten
    assert "outside the MoE block" in backend.sites[0].reason


@pytest.mark.interpreter
def test_triton_substitution_interpreted():
    """kernels="triton": the rewritten graph runs the Triton op (interpreted) and matches eager."""
    for family in ("mixtral", "qwen2_moe"):
        model = tiny_model(family)
        backend = Capture("triton")
        expected, got = run_compiled(model, backend, tokens=5)
        assert all(s.rewritten and s.kernel == "triton" for s in backend.sites)
        assert "sqcompile.fused_moe_triton.default" in graph_ops(backend.graphs[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # dynamic token count through the Triton op (its fake impl traces the symbolic graph)
    model = tiny_model("qwen3_moe", experts=8)
    backend = Capture("triton")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for tokens in (4, 1):
            ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(tokens))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert backend.sites and all(s.rewritten and s.kernel == "triton" for s in backend.sites)
