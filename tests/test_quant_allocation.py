"""Bit allocation: reverse water-filling and budget-exact plans."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqcompile.quant.allocation import allocate_bits, plan_hybrid, plan_rotated, plan_waterfill, waterfill


def spectrum(d: int, decay: float) -> torch.Tensor:
    return torch.exp(-torch.arange(d, dtype=torch.float64) / decay)


@settings(max_examples=30, deadline=None)
@given(d=st.sampled_from([16, 64, 128]), decay=st.floats(1.0, 64.0), per_dim=st.floats(0.0, 8.0))
def test_integer_waterfill_sums_to_budget(d, decay, per_dim):
    lam = spectrum(d, decay)
    total = int(per_dim * d)
    bits = allocate_bits(lam, total)
    assert int(bits.sum()) == min(total, 8 * d)
    assert int(bits.min()) >= 0 and int(bits.max()) <= 8
    assert torch.all(bits[1:] <= bits[:-1])  # descending spectrum -> non-increasing bits


def test_continuous_waterfill_formula():
    lam = spectrum(64, 10.0)
    theta, b = waterfill(lam, 128.0)
    assert float(b.sum()) == pytest.approx(128.0, abs=1e-6)
    expect = (0.5 * torch.log2(lam / theta)).clamp_min(0)
    assert torch.allclose(b, expect, atol=1e-9)
    ints = allocate_bits(lam, 128)
    assert float((ints.double() - b).abs().max()) <= 1.0 + 1e-9


@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("budget_bits", [2.0, 2.25, 2.6875, 3.0, 4.25])
def test_plans_fit_their_byte_budget(d, budget_bits):
    budget = int(budget_bits * d / 8)
    lam = spectrum(d, d / 6)
    for plan in (plan_rotated(d, budget), plan_hybrid(lam, budget), plan_hybrid(lam, budget, weights=lam),
                 plan_waterfill(lam, budget)):
        assert plan is not None
        assert plan.bytes_per_token() <= budget
        assert plan.groups[0].start == 0 and plan.groups[-1].stop == d
    # the rotated plan wastes less than one scale's worth of budget plus a byte of rounding
    assert plan_rotated(d, budget).bytes_per_token() >= budget - 3
