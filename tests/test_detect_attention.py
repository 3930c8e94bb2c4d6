"""Attention detection on small hand-built modules captured by dynamo: every form is found with the right
fields and rewritten exactly (rotation only); graphs that are not attention, or that the pass cannot prove,
are left alone with a reason (issue #2)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sqcompile
from sqcompile import SpectralProfile

B, S, D_MODEL, HQ, HKV, HD = 2, 6, 32, 4, 2, 8


def rope(x, pos):
    half = x.shape[-1] // 2
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


class Attention(nn.Module):
    """One attention block in several forms. `cache`: None | "static" (index_copy_) | "dynamic" (cat)."""

    def __init__(self, form="sdpa_gqa", qkv="separate", bias=False, hkv=HKV):
        super().__init__()
        self.form, self.qkv, self.hkv = form, qkv, hkv
        if qkv == "separate":
            self.q_proj = nn.Linear(D_MODEL, HQ * HD, bias=bias)
            self.k_proj = nn.Linear(D_MODEL, hkv * HD, bias=bias)
            self.v_proj = nn.Linear(D_MODEL, hkv * HD, bias=bias)
        else:
            self.qkv_proj = nn.Linear(D_MODEL, (HQ + 2 * hkv) * HD, bias=bias)
        self.o_proj = nn.Linear(HQ * HD, D_MODEL, bias=bias)

    def project(self, x):
        if self.qkv == "separate":
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qkv = self.qkv_proj(x)
        sizes = [HQ * HD, self.hkv * HD, self.hkv * HD]
        if self.qkv == "slice":
            return qkv[..., :sizes[0]], qkv[..., sizes[0]:sizes[0] + sizes[1]], qkv[..., sizes[0] + sizes[1]:]
        if self.qkv == "split":
            return qkv.split(sizes, dim=-1)
        assert self.hkv == HQ
        return qkv.chunk(3, dim=-1)

    def forward(self, x, k_cache=None, v_cache=None, pos=None):
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(b, s, HQ, HD).transpose(1, 2)
        k = k.view(b, s, self.hkv, HD).transpose(1, 2)
        v = v.view(b, s, self.hkv, HD).transpose(1, 2)
        pos = torch.arange(s) if pos is None else pos
        q, k = rope(q, pos), rope(k, pos)
        if k_cache is not None and k_cache.shape[2] > s:  # static cache: write at positions, read all
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            k, v = k_cache[:, :, :s], v_cache[:, :, :s]
        elif k_cache is not None:  # dynamic cache: append
            k, v = torch.cat([k_cache, k], dim=-2), torch.cat([v_cache, v], dim=-2)
        rep = HQ // self.hkv
        if self.form == "sdpa_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
        else:
            if rep > 1:  # repeat_kv
                k = k[:, :, None].expand(b, self.hkv, rep, k.shape[2], HD).reshape(b, HQ, k.shape[2], HD)
                v = v[:, :, None].expand(b, self.hkv, rep, v.shape[2], HD).reshape(b, HQ, v.shape[2], HD)
            if self.form == "sdpa_repeat":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(HD))
                if self.form == "eager_softcap":
                    scores = torch.tanh(scores / 5.0) * 5.0
                mask = torch.full((s, k.shape[2]), float("-inf")).triu(1 + k.shape[2] - s)
                p = torch.softmax(scores + mask, dim=-1)
                o = torch.matmul(p, v)
        o = o.transpose(1, 2).reshape(b, s, HQ * HD)
        return self.o_proj(o)


def _capture(fn, *args):
    """Run `fn` under a backend that only detects; returns the sites of its graph."""
    from sqcompile.passes.detect_attention import detect_attention

    found = []

    def backend(gm, example_inputs):
        found.extend(detect_attention(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*args)
    return found


def _check_exact(module, *args, profile=None):
    """Rotation-only under the backend equals eager (fresh cache copies for both runs)."""
    profile = profile or SpectralProfile.random(1, module.hkv, HD, num_heads=HQ, seed=7, mean_scale=0.7)
    clone = lambda a: a.clone() if isinstance(a, torch.Tensor) else a
    ref = module(*[clone(a) for a in args])
    torch._dynamo.reset()
    fn = torch.compile(module.forward, backend="spectralquant",
                       options={"quantize": False, "profile": profile, "lower": "eager"})
    cargs = [clone(a) for a in args]
    out = fn(*cargs)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    return cargs


FORMS = [
    ("sdpa_gqa", "separate", None),
    ("sdpa_repeat", "separate", None),
    ("eager", "separate", None),
    ("eager_softcap", "separate", None),
    ("sdpa_gqa", "slice", None),
    ("sdpa_gqa", "split", None),
    ("sdpa_gqa", "separate", "static"),
    ("eager", "separate", "dynamic"),
]


@pytest.mark.parametrize("form,qkv,cache", FORMS)
def test_attention_forms_detected_and_exact(form, qkv, cache):
    torch.manual_seed(0)
    m = Attention(form, qkv, bias=True).eval()
    x = torch.randn(B, S, D_MODEL)
    args = [x]
    if cache == "static":
        args += [torch.zeros(B, HKV, 16, HD), torch.zeros(B, HKV, 16, HD), torch.arange(S)]
    elif cache == "dynamic":
        args += [torch.randn(B, HKV, 3, HD), torch.randn(B, HKV, 3, HD)]
    with torch.no_grad():
        sites = _capture(m, *args)
        assert len(sites) == 1, sites
        s = sites[0]
        assert s.reason is None, s.reason
        assert (s.q_heads, s.kv_heads, s.head_dim, s.rope) == (HQ, HKV, HD, True)
        assert s.form == ("eager" if form.startswith("eager") else "sdpa")
        assert s.kv_write == {"static": "index_copy", "dynamic": "cat", None: "direct"}[cache]
        if cache != "dynamic":  # a dynamic past must itself be stored rotated: the HF model tests cover that
            _check_exact(m, *args)


def test_fused_qkv_chunk():
    torch.manual_seed(0)
    m = Attention("sdpa_gqa", "chunk", hkv=HQ).eval()
    x = torch.randn(B, S, D_MODEL)
    with torch.no_grad():
        sites = _capture(m, x)
        assert sites[0].reason is None and sites[0].kv_heads == HQ
        _check_exact(m, x)


def test_soft_capped_scores_keep_the_key_mean():
    """tanh soft-capping is not shift-invariant: the pass must not subtract the key mean there."""
    torch.manual_seed(0)
    m = Attention("eager_softcap").eval()
    x = torch.randn(B, S, D_MODEL)
    with torch.no_grad():
        sites = _capture(m, x)
        assert sites[0].nodes["centering_ok"] is False
        _check_exact(m, x, profile=SpectralProfile.random(1, HKV, HD, num_heads=HQ, seed=1, mean_scale=3.0))


# ---- negatives: never rewrite what is not (provably) attention --------------------------------------------

class SoftmaxClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        return torch.softmax(self.head(torch.relu(self.body(x))), -1)


class MatmulSoftmaxNotAttention(nn.Module):
    """x W^T -> softmax -> @ V with parameters: a matmul-softmax-matmul that is not attention."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 1, 8, 8))
        self.v = nn.Parameter(torch.randn(1, 1, 8, 8))
        self.o_proj = nn.Linear(8, 8)

    def forward(self, x):
        p = torch.softmax(torch.matmul(x, self.w.transpose(2, 3)), -1)
        return self.o_proj(torch.matmul(p, self.v))


class LoneOProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.o_proj(torch.relu(x))


@pytest.mark.parametrize("module,shape", [(SoftmaxClassifier, (4, 16)), (MatmulSoftmaxNotAttention, (1, 1, 8, 8)),
                                          (LoneOProj, (2, 8))])
def test_non_attention_is_not_rewritten(module, shape):
    torch.manual_seed(0)
    m = module().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        sites = _capture(m, x)
        assert all(s.reason is not None for s in sites)
        report = sqcompile.explain(m, x, options={"quantize": False})
        assert not any(s.rewritten for s in report.sites)
        torch._dynamo.reset()
        out = torch.compile(m, backend="spectralquant", options={"quantize": False, "lower": "eager"})(x)
        assert torch.equal(out, m(x))


def test_graph_without_attention_reports_zero_sites_under_inductor_default():
    m = SoftmaxClassifier().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        report = sqcompile.explain(m, x)
        assert report.sites == [] and "no attention" in str(report)


class ExtraConsumer(Attention):
    """The attention output also feeds something other than o_proj: the pass must not fold o_proj (it undoes the
    value rotation on the output instead)."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(b, s, HQ, HD).transpose(1, 2)
        k = k.view(b, s, HKV, HD).transpose(1, 2)
        v = v.view(b, s, HKV, HD).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        side = o.sum()
        o = o.transpose(1, 2).reshape(b, s, HQ * HD)
        return self.o_proj(o) + side


class SharedProjection(nn.Module):
    """Two attention calls sharing v_proj and o_proj weights."""

    def __init__(self):
        super().__init__()
        self.a = Attention()
        self.a2 = Attention()
        self.a2.v_proj = self.a.v_proj
        self.a2.o_proj = self.a.o_proj

    def forward(self, x):
        return self.a2(self.a(x))


class OProjOtherUser(Attention):
    """o_proj's weight is also used outside attention."""

    def forward(self, x):
        return super().forward(x) + F.linear(x[..., :HQ * HD].repeat(1, 1, HQ * HD // x.shape[-1] or 1)[..., :HQ * HD],
                                             self.o_proj.weight)


def test_extra_reader_of_the_output_gets_the_output_rotation():
    torch.manual_seed(0)
    m = ExtraConsumer().eval()
    x = torch.randn(B, S, D_MODEL)
    profile = SpectralProfile.random(1, HKV, HD, num_heads=HQ, seed=2, mean_scale=1.0)
    with torch.no_grad():
        report = sqcompile.explain(m, x, options={"quantize": False, "profile": profile})
        assert len(report.sites) == 1, str(report)
        s = report.sites[0]
        assert s.rewritten and not s.o_proj_folded and "2 consumers before o_proj" in s.output_rotation, str(report)
        torch._dynamo.reset()
        out = torch.compile(m, backend="spectralquant", options={"quantize": False, "profile": profile,
                                                                 "lower": "eager"})(x)
        ref = m(x)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("module,reason", [(SharedProjection, "shared"), (OProjOtherUser, "used by")])
def test_unprovable_sites_left_alone_with_reason(module, reason):
    torch.manual_seed(0)
    m = module().eval()
    x = torch.randn(B, S, D_MODEL)
    with torch.no_grad():
        report = sqcompile.explain(m, x, options={"quantize": False})
        assert report.sites and all(not s.rewritten for s in report.sites), str(report)
        assert all(reason in s.reason for s in report.sites), str(report)
        torch._dynamo.reset()
        out = torch.compile(m, backend="spectralquant", options={"quantize": False, "lower": "eager"})(x)
        assert torch.allclose(out, m(x), atol=1e-6)


def test_profile_mismatch_names_layer_and_shapes():
    m = Attention().eval()
    x = torch.randn(B, S, D_MODEL)
    bad = SpectralProfile.random(1, HKV + 1, HD, num_heads=HQ, seed=0)
    torch._dynamo.reset()
    fn = torch.compile(m, backend="spectralquant", options={"quantize": False, "profile": bad, "lower": "eager"})
    with pytest.raises(Exception) as e:
        fn(x)
    msg = str(e.value)
    assert "layer 0" in msg and f"num_kv_heads: profile has {HKV + 1}, model has {HKV}" in msg


def test_unknown_option_lists_valid_ones():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1, backend="spectralquant", options={"bitz": 3})
    with pytest.raises(Exception) as e:
        fn(torch.randn(3))
    assert "bitz" in str(e.value) and "quantize" in str(e.value) and "profile" in str(e.value)


@pytest.mark.parametrize("options,needle", [({"bits": "4"}, "bits"), ({"quantize": 1}, "quantize"),
                                            ({"kernels": "cuda"}, "kernels"), ({"lower": "tvm"}, "lower")])
def test_options_of_wrong_type_or_value(options, needle):
    with pytest.raises((TypeError, ValueError)) as e:
        sqcompile.Options.from_dict(options)
    assert needle in str(e.value)


def test_entry_point_backend_in_fresh_interpreter():
    code = (
        "import torch, sys\n"
        "f = torch.compile(lambda x: torch.relu(x) * 2, backend='spectralquant', options={'lower': 'eager'})\n"
        "x = torch.randn(4)\n"
        "assert torch.equal(f(x), torch.relu(x) * 2)\n"
        "assert 'sqcompile' in sys.modules  # loaded through the entry point, not imported here\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_a_layer_treated_differently_by_two_graphs_is_an_error():
    """Prefill rotated layer 0's cache; a decode graph that cannot prove layer 0 must not read it unrotated."""
    from sqcompile.backend import _check_consistent
    from sqcompile.passes.sites import Site

    scope = {"quantize": False}
    _check_consistent(scope, [Site(layer=0, kind="attention", rewritten=True)])
    _check_consistent(scope, [Site(layer=0, kind="attention", rewritten=True)])  # same decision: fine
    _check_consistent({"quantize": False}, [Site(layer=0, kind="attention", reason="other compile")])  # other scope
    with pytest.raises(RuntimeError, match="layer 0 was rewritten in an earlier graph"):
        _check_consistent(scope, [Site(layer=0, kind="attention", reason="cannot prove")])


# ---- value rows gathered from a fused or transposed projection (GPT-NeoX, Falcon, GPT-2 forms) -------------

class FusedPerHead(nn.Module):
    """A fused QKV projection whose value rows the graph has to map. `form`:
    per_head: [B, S, H, 3d] chunked after the head split (GPT-NeoX, MHA);
    grouped: per kv head [q.. | k | v], the value picked by an integer index (Falcon's new decoder);
    conv1d: Conv1D `addmm(b, x, W)` with W [in, out], split on the last dim (GPT-2);
    matmul_t: `x @ W.T + b` written by hand, split per head (FalconLinear with a bias);
    rolled: per_head with the value's features rolled (a permutation the row mapping does not follow);
    gathered: the value taken by a tensor index (a gather);
    overlap: per_head, but the key is also read from the value's rows."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.hkv = HKV if form == "grouped" else HQ
        out = (HQ + 2 * self.hkv) * HD
        w = torch.randn(out, D_MODEL) / D_MODEL ** 0.5
        self.w = nn.Parameter(w.t().contiguous() if form == "conv1d" else w)  # Conv1D stores [in, out]
        self.b = nn.Parameter(torch.randn(out) * 0.1)
        self.o_proj = nn.Linear(HQ * HD, D_MODEL)
        self.register_buffer("idx", torch.arange(2 * HD, 3 * HD))

    def forward(self, x):
        b, s, _ = x.shape
        if self.form == "conv1d":
            y = torch.addmm(self.b, x.view(-1, D_MODEL), self.w).view(b, s, -1)
        elif self.form == "matmul_t":
            y = x @ self.w.T + self.b
        else:
            y = F.linear(x, self.w, self.b)
        if self.form == "grouped":
            g = y.view(b, s, self.hkv, HQ // self.hkv + 2, HD)
            q = g[..., :-2, :].flatten(-3, -2).transpose(1, 2)
            k, v = g[..., -2, :].transpose(1, 2), g[..., -1, :].transpose(1, 2)
        elif self.form == "conv1d":
            q, k, v = (t.view(b, s, HQ, HD).transpose(1, 2) for t in y.split(HQ * HD, dim=2))
        elif self.form == "gathered":
            h = y.view(b, s, HQ, 3 * HD)
            q, k, v = h[..., :HD].transpose(1, 2), h[..., HD:2 * HD].transpose(1, 2), h[..., self.idx].transpose(1, 2)
        else:
            q, k, v = y.view(b, s, HQ, 3 * HD).transpose(1, 2).chunk(3, dim=-1)
            if self.form == "rolled":
                v = v.roll(1, dims=-1)
            elif self.form == "overlap":
                k = y.view(b, s, HQ, 3 * HD).transpose(1, 2)[..., 2 * HD - 4:3 * HD - 4]
        q, k = rope(q, torch.arange(s)), rope(k, torch.arange(s))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.hkv != HQ)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, HQ * HD))


@pytest.mark.parametrize("form", ["per_head", "grouped", "conv1d", "matmul_t"])
def test_fused_value_rows_gathered_and_exact(form):
    torch.manual_seed(0)
    m = FusedPerHead(form).eval()
    x = torch.randn(B, S, D_MODEL)
    with torch.no_grad():
        sites = _capture(m, x)
        assert len(sites) == 1 and sites[0].reason is None, sites[0].reason
        rows = sites[0].nodes["v_rows"]
        assert rows is not None and tuple(rows.shape) == (m.hkv, HD)
        _check_exact(m, x)


@pytest.mark.parametrize("form,reason", [("rolled", "roll"), ("gathered", "gather"), ("overlap", "value rows")])
def test_fused_value_rows_not_mapped_left_alone(form, reason):
    torch.manual_seed(0)
    m = FusedPerHead(form).eval()
    x = torch.randn(B, S, D_MODEL)
    with torch.no_grad():
        report = sqcompile.explain(m, x, options={"quantize": False})
        att = report.by_kind("attention")
        assert len(att) == 1 and not att[0].rewritten and reason in att[0].reason, str(report)
        torch._dynamo.reset()
        out = torch.compile(m, backend="spectralquant", options={"quantize": False, "lower": "eager"})(x)
        assert torch.allclose(out, m(x), atol=1e-6)


class DropoutAttention(Attention):
    """Eager attention whose weights go through dropout (GPT-2 / BERT style): the identity in eval mode."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q = rope(q.view(b, s, HQ, HD).transpose(1, 2), torch.arange(s))
        k = rope(k.view(b, s, HKV, HD).transpose(1, 2), torch.arange(s))
        v = v.view(b, s, HKV, HD).transpose(1, 2)
        k, v = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
        p = torch.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HD), dim=-1)
        o = torch.matmul(F.dropout(p, 0.1, self.training), v)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, HQ * HD))


def test_dropout_on_the_weights_is_attention_in_eval_mode_only():
    torch.manual_seed(0)
    m = DropoutAttention(bias=True).eval()
    x = torch.randn(B, S, D_MODEL)
    with torch.no_grad():
        sites = _capture(m, x)
        assert len(sites) == 1 and sites[0].reason is None, sites[0].reason
        _check_exact(m, x)
        m.train()
        report = sqcompile.explain(m, x, options={"quantize": False})
        att = report.by_kind("attention")
        assert len(att) == 1 and not att[0].rewritten and "training mode" in att[0].reason, str(report)
