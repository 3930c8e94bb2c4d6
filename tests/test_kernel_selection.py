"""Kernel-path selection: "auto" picks Triton on a GPU and torch on CPU, never TensorRT (no test runs sqcompile's
ops through torch_tensorrt on hardware); an explicit choice that cannot run here is an error that says why."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import sqcompile
from sqcompile.kernels import select_kernels, tensorrt_unavailable_reason


def test_auto_on_cpu_is_torch():
    assert select_kernels("auto", "cpu") == "torch"
    assert select_kernels("torch", "cpu") == "torch"


def test_tensorrt_explicit_where_it_cannot_run_says_why(monkeypatch):
    with pytest.raises(RuntimeError, match="tensorrt"):
        select_kernels("tensorrt", "cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch_tensorrt" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "SM90" in tensorrt_unavailable_reason("cuda", (9, 0))
    assert tensorrt_unavailable_reason("cuda", (10, 0)) is None
    assert select_kernels("auto", "cuda", (10, 0)) == "triton"  # TensorRT only when asked for
    assert select_kernels("tensorrt", "cuda", (10, 0)) == "tensorrt"
    assert select_kernels("auto", "cuda", (9, 0)) == "triton"
    with pytest.raises(RuntimeError, match="SM100"):
        select_kernels("tensorrt", "cuda", (9, 0))


def test_tensorrt_not_importable_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_tensorrt" else real(name, *a))
    assert tensorrt_unavailable_reason("cuda", (10, 0)) == "torch_tensorrt is not importable"
    assert select_kernels("auto", "cpu") == "torch"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_kernels("triton", "cpu")
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2, backend="spectralquant", options={"kernels": "triton", "lower": "eager"})
    with pytest.raises(Exception, match="TRITON_INTERPRET"):
        fn(torch.randn(3))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_kernels("triton", "cpu") == "triton"


@pytest.mark.cuda
@pytest.mark.skipif(tensorrt_unavailable_reason("cuda" if torch.cuda.is_available() else "cpu") is not None,
                    reason="needs torch_tensorrt and an SM100 (Blackwell) GPU; neither exists on our machines")
def test_tensorrt_path_on_hardware():  # pragma: no cover - not run anywhere yet
    x = torch.randn(4, device="cuda")
    fn = torch.compile(lambda t: t + 1, backend="spectralquant", options={"kernels": "tensorrt"})
    assert torch.equal(fn(x), x + 1)


@pytest.mark.parametrize("how", ["options", "mode"])
def test_cudagraphs_reach_inductor(how, monkeypatch):
    """options={"cudagraphs": True} (or mode="reduce-overhead", which torch.compile passes only without
    options) compiles with Inductor's cudagraph trees on; the default does not."""
    import torch._inductor.compile_fx as cfx

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kw):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    for on in (True, False):
        torch._dynamo.reset()
        if how == "options":
            fn = torch.compile(lambda x: x * 2, backend=sqcompile.spectralquant,
                               options={"quantize": False, "cudagraphs": on})
        else:
            fn = torch.compile(lambda x: x * 2, backend=sqcompile.spectralquant,
                               mode="reduce-overhead" if on else "default")
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
    assert seen == [{"triton.cudagraphs": True}, None]
