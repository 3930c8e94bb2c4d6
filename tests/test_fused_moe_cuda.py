"""The fused MoE op's GPU tiers against its torch reference (bf16, random inputs, every buffer poisoned first).

The torch._grouped_mm tiers ("down", "both") next to the all-Triton prefill tier, and the tier `_config` picks
by itself for many rows per expert. Runs on a CUDA GPU only (the interpreted checks are in test_fused_moe.py).
"""
from __future__ import annotations

import pytest
import torch

import sqcompile.kernels.fused_moe as fm

pytestmark = pytest.mark.cuda  # the fused MoE op's GPU tiers


def _poisoned_empty(*shape, dtype=None, device=None):
    fill = float("nan") if dtype is None or dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(fm, "_empty", _poisoned_empty)  # every element the op returns must be written


def _inputs(tokens, experts, hidden, inter, skew, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").bfloat16()
    logits = torch.randn(tokens, experts, generator=gen, device="cuda")
    if skew:
        logits[: tokens * 9 // 10, 1] += 10.0  # 90% of tokens to expert 1
        logits[:, experts - 1] -= 30.0  # the last expert gets nothing
    w1 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device="cuda") / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device="cuda") / inter ** 0.5).bfloat16()
    return x, logits, w1, w2


def _rel_err(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("tier", ["", "down", "both", "down:x_sorted", "down:x_gathered", ":two_tiles",
                                  "down:two_tiles", ":h_store", "down:h_store"])
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,skew", [
    (1024, 8, 2, 512, 1024, False), (1024, 8, 2, 512, 1024, True), (512, 64, 8, 256, 192, False),
    (37, 8, 2, 256, 136, True)])
def test_prefill_tiers_equal_reference(tier, tokens, experts, top_k, hidden, inter, skew):
    if tier and not fm._grouped_mm_ok(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm needs sm_90+")
    x, logits, w1, w2 = _inputs(tokens, experts, hidden, inter, skew)
    cfg = dict(fm._config(1 << 20, experts, hidden, inter, fm._smem_bytes(fm._device_index(x.device))))
    cfg.pop("GROUPED_MM", None)
    tier, _, variant = tier.partition(":")
    if variant.startswith("x_"):  # x by TMA from a block-ordered copy, or gathered row by row in the gate/up kernel
        cfg["X_SORTED"] = variant == "x_sorted"
    if variant == "two_tiles":  # gate and up tiles in two TMA boxes and two dots (W_PAIR: one box, one dot)
        cfg["W_PAIR"] = False
    if variant == "h_store":  # h stored row by row with masks (H_STORE_TMA: by TMA, padding rows included)
        cfg["H_STORE_TMA"] = False
    if tier:
        cfg["GROUPED_MM"] = tier
    fm._config_override = cfg
    try:
        got = torch.ops.sqcompile.fused_moe_triton(x, logits, w1, w2, top_k, True, "softmax")
    finally:
        fm._config_override = None
    want = fm.fused_moe_reference(x, logits, w1, w2, top_k, True)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert _rel_err(got, want) < 1e-2, (tier, _rel_err(got, want))


def test_default_tier_for_many_rows_equals_reference():
    """`_config`'s own choice at Mixtral-like rows per expert (the grouped_mm tier where the GPU has it), eager and
    under Inductor."""
    x, logits, w1, w2 = _inputs(2048, 8, 512, 1024, False, seed=1)
    want = fm.fused_moe_reference(x, logits, w1, w2, 2, True)
    got = torch.ops.sqcompile.fused_moe_triton(x, logits, w1, w2, 2, True, "softmax")
    assert _rel_err(got, want) < 1e-2
    compiled = torch.compile(lambda x, l: torch.ops.sqcompile.fused_moe_triton(x, l, w1, w2, 2, True, "softmax"),
                             dynamic=False)
    assert _rel_err(compiled(x, logits), want) < 1e-2
