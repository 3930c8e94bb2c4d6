"""Property tests for attention detection (issue #7): generated attention-like and non-attention modules.

Properties, for every generated module, under the backend in rotation-only mode with a random profile whose
key/value means are nonzero (so a wrong rewrite shows up in the output):

1. the output equals eager (1e-4 relative) -- always, whether a site was rewritten or not;
2. a site is rewritten only when the module is attention that the rewrite is exact for: no extra consumer of
   the key or the value, a value projection whose rows the graph maps (one block, or a per-head gather from a
   fused QKV), kv heads shared as h // (q_heads / kv_heads); o_proj absorbs the inverse value rotation when it
   alone reads the output with the heads in order, else (an extra reader of the output, heads out of order) the
   rotation is undone on the attention output;
3. the clean attention forms are rewritten (the detector is not vacuous).

Extra consumers are summed into the module's output, so a consumer that saw rotated values would change it.
Bounded: a fixed number of examples, no deadline; the whole file runs in well under a minute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqcompile import SpectralProfile, backend
from sqcompile.report import Report

D_MODEL, B, S = 16, 2, 5
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FORMS = ("sdpa_gqa", "sdpa_repeat", "sdpa_tile", "eager", "eager_softcap", "eager_perkey_scale",
         "eager_softmax_dim2")
QKV = ("separate", "fused_slice", "fused_split", "fused_per_head", "v_relu", "v_scaled")
EXTRA = ("none", "q", "k", "v_lin", "v_heads", "v_t", "out", "probs")


@dataclass(frozen=True)
class Spec:
    hq: int
    rep: int
    d: int
    form: str
    qkv: str
    mask: str  # none | causal | float | bool
    out_layout: str  # transpose | permute | bad_permute
    extra: str
    cache: str  # none | static
    bias: bool
    scale: str  # default | custom

    @property
    def hkv(self):
        return self.hq // self.rep

    def expect_rewrite(self) -> bool:
        # a tiled repeat (h % kv_heads) is not the h // rep sharing the rotation assumes (with rep 1 there is none)
        attention = self.form != "eager_softmax_dim2" and not (self.form == "sdpa_tile" and self.rep > 1)
        # a fused QKV split per head (GPT-NeoX, grouped per kv head): the value rows are gathered from the weight
        provable_v = self.qkv in ("separate", "fused_slice", "fused_split", "fused_per_head")
        extra_ok = self.extra in ("none", "q", "out") or (self.extra == "probs" and self.form.startswith("sdpa"))
        return attention and provable_v and extra_ok

    def o_proj_folds(self) -> bool:
        """o_proj alone reads the output, heads in order: it absorbs the inverse value rotation; otherwise (a second
        reader, a [B, S, d, H] flatten) the rotation is undone on the attention output (`insert_output_rotation`)."""
        return self.out_layout != "bad_permute" and self.extra != "out"


class FuzzAttention(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        hq, hkv, d = spec.hq, spec.hkv, spec.d
        if spec.qkv.startswith("fused"):
            self.qkv_proj = nn.Linear(D_MODEL, (hq + 2 * hkv) * d, bias=spec.bias)
        else:
            self.q_proj = nn.Linear(D_MODEL, hq * d, bias=spec.bias)
            self.k_proj = nn.Linear(D_MODEL, hkv * d, bias=spec.bias)
            self.v_proj = nn.Linear(D_MODEL, hkv * d, bias=spec.bias)
        self.o_proj = nn.Linear(hq * d, D_MODEL, bias=spec.bias)
        self.gamma = nn.Parameter(torch.rand(hkv * d) + 0.5)

    def forward(self, x, k_cache=None, v_cache=None):
        sp, (b, s, _) = self.spec, x.shape
        hq, hkv, d, rep = sp.hq, sp.hkv, sp.d, sp.rep
        side = x.new_zeros(())
        if sp.qkv == "fused_per_head":  # GPT-NeoX layout: [B, S, H, (q|k|v)], MHA only
            qkv = self.qkv_proj(x)
            if hq == hkv:
                q, k, v = qkv.view(b, s, hq, 3 * d).transpose(1, 2).chunk(3, dim=-1)
                v_lin = None
            else:  # grouped: per kv head [rep q heads | k | v]
                g = qkv.view(b, s, hkv, (rep + 2) * d)
                q = g[..., :rep * d].reshape(b, s, hq, d).transpose(1, 2)
                k = g[..., rep * d:(rep + 1) * d].transpose(1, 2)
                v = g[..., (rep + 1) * d:].transpose(1, 2)
                v_lin = None
        else:
            if sp.qkv.startswith("fused"):
                qkv = self.qkv_proj(x)
                sizes = [hq * d, hkv * d, hkv * d]
                if sp.qkv == "fused_slice":
                    q, k, v_lin = qkv[..., :sizes[0]], qkv[..., sizes[0]:sizes[0] + sizes[1]], qkv[..., -sizes[2]:]
                else:
                    q, k, v_lin = qkv.split(sizes, dim=-1)
            else:
                q, k, v_lin = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if sp.qkv == "v_relu":
                v_lin = torch.relu(v_lin)
            elif sp.qkv == "v_scaled":
                v_lin = v_lin * self.gamma
            if sp.extra == "v_lin":
                side = side + v_lin.square().mean()
            q = q.view(b, s, hq, d).transpose(1, 2)
            k = k.view(b, s, hkv, d).transpose(1, 2)
            v_heads = v_lin.view(b, s, hkv, d)
            if sp.extra == "v_heads":
                side = side + v_heads[..., 0].mean()
            v = v_heads.transpose(1, 2)
        if sp.extra == "q":
            side = side + q.square().mean()
        if sp.extra == "k":
            side = side + k.square().mean() + k.mean()
        if sp.extra == "v_t":
            side = side + v.mean()
        if sp.cache == "static":
            pos = torch.arange(s)
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            k, v = k_cache[:, :, :s], v_cache[:, :, :s]
        scale = None if sp.scale == "default" else 0.37
        mask = None
        if sp.mask == "float":
            mask = torch.full((s, s), -1e4).triu(1) + 0.1 * torch.arange(s, dtype=torch.float32)
        elif sp.mask == "bool":
            mask = torch.ones(s, s, dtype=torch.bool).tril()
        if sp.form.startswith("sdpa"):
            if sp.form == "sdpa_repeat" and rep > 1:  # HF repeat_kv: head h reads kv head h // rep
                k = k[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hq, s, d)
                v = v[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hq, s, d)
            elif sp.form == "sdpa_tile" and rep > 1:  # tiled: head h reads kv head h % hkv
                k = k[:, None].expand(b, rep, hkv, s, d).reshape(b, hq, s, d)
                v = v[:, None].expand(b, rep, hkv, s, d).reshape(b, hq, s, d)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=sp.mask == "causal",
                                               scale=scale, enable_gqa=sp.form == "sdpa_gqa" and rep > 1)
        else:
            if rep > 1:
                k = k[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hq, s, d)
                v = v[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hq, s, d)
            scores = torch.matmul(q, k.transpose(2, 3)) * (scale or 1 / math.sqrt(d))
            if sp.form == "eager_softcap":
                scores = torch.tanh(scores / 3.0) * 3.0
            if sp.form == "eager_perkey_scale":  # a per-key factor: not shift-invariant
                scores = scores * (1.0 + 0.1 * torch.arange(s, dtype=torch.float32))
            if sp.mask in ("causal", "float"):
                scores = scores + (torch.full((s, s), -1e4).triu(1) if mask is None else mask)
            elif sp.mask == "bool":
                scores = scores.masked_fill(~mask, -1e4)
            p = torch.softmax(scores, dim=-2 if sp.form == "eager_softmax_dim2" else -1)
            if sp.extra == "probs":
                side = side + p.amax()
            o = torch.matmul(p, v)
        if sp.extra == "out":
            side = side + o.square().mean()
        if sp.out_layout == "transpose":
            o = o.transpose(1, 2).reshape(b, s, hq * d)
        elif sp.out_layout == "permute":
            o = o.permute(0, 2, 1, 3).reshape(b, s, hq * d)
        else:  # [B, S, d, H] flattened: o_proj columns in the wrong order for a per-head fold
            o = o.permute(0, 2, 3, 1).reshape(b, s, hq * d)
        return self.o_proj(o) + side


def _specs():
    return st.builds(
        Spec,
        hq=st.sampled_from([2, 4, 8]),
        rep=st.sampled_from([1, 2]),
        d=st.sampled_from([4, 8]),
        form=st.sampled_from(FORMS),
        qkv=st.sampled_from(QKV),
        mask=st.sampled_from(["none", "causal", "float", "bool"]),
        out_layout=st.sampled_from(["transpose", "permute", "bad_permute"]),
        extra=st.sampled_from(EXTRA),
        cache=st.sampled_from(["none", "static"]),
        bias=st.booleans(),
        scale=st.sampled_from(["default", "custom"]),
    )


def _run(module, args, profile):
    """(eager output, compiled output, Report) with fresh copies of mutable inputs for each run."""
    clone = lambda a: a.clone() if isinstance(a, torch.Tensor) else a
    with torch.no_grad():
        ref = module(*[clone(a) for a in args])
        torch._dynamo.reset()
        fn = torch.compile(module.forward, backend="spectralquant",
                           options={"quantize": False, "profile": profile, "lower": "eager"})
        sink: list = []
        token = backend._REPORT_SINK.set(sink)
        try:
            out = fn(*[clone(a) for a in args])
        finally:
            backend._REPORT_SINK.reset(token)
    return ref, out, Report(sites=sink)


def _check(spec: Spec, seed: int = 0):
    torch.manual_seed(seed)
    m = FuzzAttention(spec).eval()
    x = torch.randn(B, S, D_MODEL)
    args = [x]
    if spec.cache == "static":
        args += [torch.zeros(B, spec.hkv, 8, spec.d), torch.zeros(B, spec.hkv, 8, spec.d)]
    profile = SpectralProfile.random(1, spec.hkv, spec.d, num_heads=spec.hq, seed=seed + 1, mean_scale=1.0)
    ref, out, report = _run(m, args, profile)
    err = ((out - ref).norm() / ref.norm()).item()
    att = report.by_kind("attention")
    rewritten = any(s.rewritten for s in att)
    assert err < 1e-4, (spec, err, str(report))
    if not spec.expect_rewrite():
        assert not rewritten, f"rewrote a site it cannot prove: {spec}\n{report}"
    else:
        assert len(att) == 1 and att[0].rewritten, f"did not rewrite clean attention: {spec}\n{report}"
        assert (att[0].q_heads, att[0].kv_heads, att[0].head_dim) == (spec.hq, spec.hkv, spec.d)
        assert att[0].o_proj_folded == spec.o_proj_folds() == (att[0].output_rotation is None), (spec, str(report))


@SETTINGS
@given(spec=_specs())
def test_fuzz_attention_like_modules(spec):
    _check(spec)


# The generator above is uniform; these pin the cases that matter most so every run covers them.
PINNED = [
    Spec(4, 2, 8, "sdpa_gqa", "separate", "causal", "transpose", "none", "none", True, "default"),
    Spec(4, 2, 8, "sdpa_repeat", "fused_split", "bool", "permute", "q", "static", True, "custom"),
    Spec(4, 2, 8, "eager_softcap", "fused_slice", "float", "transpose", "none", "static", True, "default"),
    Spec(4, 2, 8, "eager_perkey_scale", "separate", "causal", "transpose", "none", "none", True, "default"),
    Spec(4, 2, 8, "sdpa_tile", "separate", "causal", "transpose", "none", "none", True, "default"),
    Spec(4, 1, 8, "sdpa_gqa", "fused_per_head", "causal", "transpose", "none", "none", True, "default"),
    Spec(4, 2, 8, "eager_softmax_dim2", "separate", "none", "transpose", "none", "none", True, "default"),
    Spec(4, 2, 8, "sdpa_gqa", "separate", "causal", "bad_permute", "none", "none", True, "default"),
    Spec(4, 2, 8, "sdpa_gqa", "v_relu", "causal", "transpose", "none", "none", True, "default"),
    Spec(4, 2, 8, "sdpa_gqa", "v_scaled", "causal", "transpose", "none", "none", True, "default"),
] + [Spec(4, 2, 8, "eager", "separate", "causal", "transpose", extra, "static", True, "default")
     for extra in EXTRA if extra not in ("none",)]


@pytest.mark.parametrize("spec", PINNED, ids=lambda s: f"{s.form}-{s.qkv}-{s.out_layout}-{s.extra}")
def test_pinned_cases(spec):
    _check(spec)


# ---- non-attention modules: nothing is rewritten, outputs unchanged ------------------------------------------

class NotAttention(nn.Module):
    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind, self.width = kind, width
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)
        self.w = nn.Parameter(torch.randn(1, 1, width, width))

    def forward(self, x):  # x: [B, H, S, W]
        if self.kind == "classifier":  # softmax at the end
            return torch.softmax(self.b(torch.relu(self.a(x))), -1)
        if self.kind == "param_matmul":  # matmul -> softmax -> matmul with a parameter as "keys"
            p = torch.softmax(torch.matmul(x, self.w.transpose(2, 3)), -1)
            return self.o_proj(torch.matmul(p, self.w))
        if self.kind == "raw_inputs":  # attention over the raw input: no projection to fold
            o = F.scaled_dot_product_attention(x, x, x)
            return self.o_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)[..., :self.width])
        if self.kind == "router":  # MoE-router-like: linear -> softmax -> topk -> weighted sum
            w, i = torch.softmax(self.a(x), -1).topk(2, dim=-1)
            return (w[..., :1] * self.b(x)) + i.float().mean()
        if self.kind == "gated":  # matmul -> sigmoid (not softmax) -> matmul
            g = torch.sigmoid(torch.matmul(self.a(x), self.b(x).transpose(2, 3)))
            return self.o_proj(torch.matmul(g, x))
        raise ValueError(self.kind)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["classifier", "param_matmul", "raw_inputs", "router", "gated"]),
       heads=st.sampled_from([1, 2, 4]), width=st.sampled_from([4, 8]))
def test_fuzz_non_attention_is_never_rewritten(kind, heads, width):
    torch.manual_seed(0)
    m = NotAttention(kind, width).eval()
    x = torch.randn(2, heads, 5, width)
    ref, out, report = _run(m, [x], None)
    assert not any(s.rewritten for s in report.sites), str(report)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
