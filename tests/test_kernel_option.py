"""options["kernels"] reaches every op the backend inserts (decode attention, the KV-cache writes, the exact-token
ops), per compile: kernels="torch" and kernels="triton" (Triton interpreter on CPU) run their own implementations,
give the same logits, `explain` names what was chosen, and two compiles with different choices in one process,
driven in turns, each run only their own."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import sqcompile
from sqcompile.cache import SpectralCache
from sqcompile.kernels import KernelPlan, resolve_kernels

from test_hf_models import _model, _rel

pytestmark = pytest.mark.interpreter

STEPS = 3
KERNEL = {"planes": "decode_attention", "fast": "decode_attention_fast_write"}


@contextlib.contextmanager
def _spies(monkeypatch):
    """Count the calls of each op's torch and Triton implementations (the op bodies look them up at call time)."""
    from sqcompile.kernels import decode_attention as da
    from sqcompile.kernels import decode_attention_fast as fa
    from sqcompile.kernels import fast_cache
    from sqcompile.kernels import quantize_write as qw
    from sqcompile.kernels import quantize_write_fast_triton as qwf
    from sqcompile.kernels import sink, sink_triton

    counts: dict[str, int] = {}

    def spy(module, name, tag):
        real = getattr(module, name)

        def wrapped(*a, **k):
            if not any(isinstance(x, FakeTensor) for x in (*a, *k.values())):  # not dynamo's trace of the op
                counts[tag] = counts.get(tag, 0) + 1
            return real(*a, **k)
        monkeypatch.setattr(module, name, wrapped)

    spy(da, "decode_attention_reference", "decode:torch")
    spy(da, "decode_attention_triton", "decode:triton")
    spy(fa, "decode_attention_fast_reference", "decode:torch")
    spy(fa, "decode_attention_fast_triton", "decode:triton")
    spy(qw, "quantize_write_reference", "write:torch")
    spy(qw, "quantize_write_triton", "write:triton")
    spy(qwf, "_launch_kernel", "write:triton")
    spy(fast_cache, "quantize_write_fast_torch", "write:torch")
    spy(sink, "exact_split_torch", "exact:torch")
    spy(sink_triton, "exact_split_triton", "exact:triton")
    yield counts


class _Run:
    """One compiled tiny Llama over its own SpectralCache, fed its greedy picks one step per `step()`."""

    def __init__(self, layout: str, kernels: str):
        self.model = _model("llama")
        self.fn = torch.compile(self.model.forward, backend="spectralquant",
                                options={"kernels": kernels, "lower": "eager"})
        self.cache = SpectralCache(self.model, max_cache_len=32, layout=layout)
        self.x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
        self.logits: list[torch.Tensor] = []

    def step(self) -> None:
        with torch.no_grad():
            out = self.fn(input_ids=self.x, past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.logits.append(out)
        self.x = out.argmax(-1, keepdim=True)


@pytest.mark.parametrize("layout", ["planes", "fast"])
def test_kernels_torch_and_triton_run_their_own_ops_and_agree(layout, monkeypatch):
    runs = {}
    for kernels in ("torch", "triton"):
        torch._dynamo.reset()
        with _spies(monkeypatch) as counts:
            run = _Run(layout, kernels)
            for _ in range(STEPS + 1):  # prefill, then decode steps
                run.step()
        runs[kernels] = run
        other = "triton" if kernels == "torch" else "torch"
        assert counts.get(f"decode:{kernels}", 0) >= 2 * STEPS, counts  # 2 layers per decode step
        assert counts.get(f"write:{kernels}", 0) >= 2 * (STEPS + 1), counts
        assert counts.get(f"exact:{kernels}", 0) >= 2 * STEPS, counts
        assert not any(k.endswith(other) for k in counts), counts
        monkeypatch.undo()
    for i, (a, b) in enumerate(zip(runs["torch"].logits, runs["triton"].logits)):
        assert _rel(b, a) < 2e-3, (i, _rel(b, a))


@pytest.mark.parametrize("layout", ["planes", "fast"])
def test_explain_names_the_kernels_chosen(layout):
    model = _model("llama")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    for kernels in ("torch", "triton"):
        torch._dynamo.reset()
        cache = SpectralCache(model, max_cache_len=32, layout=layout)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        report = sqcompile.explain(model.forward, input_ids=ids[:, -1:], past_key_values=cache, use_cache=True,
                                   options={"kernels": kernels})
        assert [(p.path, p.decode, p.write) for p in report.plans] == [(kernels, kernels, kernels)], str(report)
        assert report.kernels == kernels
        assert f"kernels={kernels!r} on cpu -> {kernels} (decode {kernels}, write {kernels}" in str(report)
        attention = report.by_kind("attention")
        assert attention and all(s.kernel == f"{KERNEL[layout]} ({kernels})" for s in attention), str(report)


def test_two_compiles_with_different_kernels_do_not_leak(monkeypatch):
    """A compile with kernels="torch" and one with kernels="triton", driven in turns: every step of each runs only
    its own implementations, and each gives the logits it gives alone."""
    alone = {}
    for kernels in ("torch", "triton"):
        torch._dynamo.reset()
        run = _Run("fast", kernels)
        for _ in range(STEPS + 1):
            run.step()
        alone[kernels] = run.logits
    torch._dynamo.reset()
    with _spies(monkeypatch) as counts:
        a, b = _Run("fast", "torch"), _Run("fast", "triton")
        for _ in range(STEPS + 1):
            for run, kernels in ((a, "torch"), (b, "triton")):
                other = "triton" if kernels == "torch" else "torch"
                counts.clear()
                run.step()
                assert counts and not any(k.endswith(other) for k in counts), (kernels, counts)
    for run, kernels in ((a, "torch"), (b, "triton")):
        for i, (got, want) in enumerate(zip(run.logits, alone[kernels])):
            assert torch.equal(got, want), (kernels, i)


def test_plan_env_overrides_and_auto():
    """The environment overrides are read where the plan is made, and only there; "auto" is torch on CPU."""
    assert resolve_kernels("auto", "cpu", env={}) == KernelPlan("auto", "cpu", "torch", "torch", "torch", "torch")
    plan = resolve_kernels("triton", "cpu", env={"SQCOMPILE_DECODE_KERNEL": "torch", "SQCOMPILE_WRITE_KERNEL": ""})
    assert (plan.decode, plan.write, plan.moe) == ("torch", "triton", "triton")
    assert plan.overrides == ("SQCOMPILE_DECODE_KERNEL=torch",)
    # on a GPU "auto" takes the CUDA decode kernel, "triton" the Triton one
    assert resolve_kernels("auto", "cuda", env={}).decode == "cuda"
    assert resolve_kernels("triton", "cuda", env={}).decode == "triton"
    # kernels="torch" is torch everywhere, whatever the environment says
    assert resolve_kernels("torch", "cpu", env={"SQCOMPILE_DECODE_KERNEL": "triton"}).decode == "torch"
    with pytest.raises(ValueError, match="SQCOMPILE_DECODE_KERNEL=cuda"):
        resolve_kernels("triton", "cpu", env={"SQCOMPILE_DECODE_KERNEL": "cuda"})
    with pytest.raises(ValueError, match="SQCOMPILE_WRITE_KERNEL must be one of"):
        resolve_kernels("triton", "cpu", env={"SQCOMPILE_WRITE_KERNEL": "cuda"})
