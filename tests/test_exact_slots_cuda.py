"""The exact-slot kernels (`sqcompile.kernels.sink_triton`, compiled Triton) on a CUDA GPU at a Llama-3-8B decode
step's shape: B=8, 32/8 heads, d=128, the sink and 4 outlier slots (one empty, one masked, one at the new token's
position), a uint8 token mask. Outputs are poisoned first and compared with the torch forms
(`sink.exact_split_torch`, `sink.store_exact_torch`) on fresh random inputs. The CPU tests in tests/test_sink.py run
the same kernels under the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)")]

B, HQ, HKV, SLOTS, D, T = 8, 32, 8, 5, 128, 32768


def _inputs(seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    q, mean = r(B, HQ, D).to(torch.bfloat16), r(HKV, D)
    slot_k, slot_v = r(B, HKV, SLOTS, D), r(B, HKV, SLOTS, D)
    pos = torch.randint(0, T - 1, (B, SLOTS), device="cuda", generator=g)
    pos[0, 2], pos[1, 1] = -1, 7  # an empty slot; a slot the mask hides
    pos[2, 3] = T - 1  # a slot that holds the new token itself
    mask = torch.ones(B, T, dtype=torch.uint8, device="cuda")
    mask[1, :64] = 0
    new_k, new_v = r(B, HKV, 1, D).to(torch.bfloat16), r(B, HKV, 1, D)
    return q, mean, mask, slot_k, slot_v, pos, new_k, new_v, torch.tensor([T - 1], device="cuda")


def test_exact_split_triton_matches_torch():
    from sqcompile.kernels import sink_triton
    from sqcompile.kernels.sink import exact_split_torch

    q, mean, mask, sk, sv, pos, new_k, new_v, new_pos = _inputs()
    ref = exact_split_torch(q, mean, mask, 0.088, sk, sv, pos, new_k, new_v, new_pos)
    out = (torch.full((B, HQ), float("nan"), device="cuda"), torch.full((B, HQ, D), float("nan"), device="cuda"),
           torch.full(pos.shape, -7, dtype=torch.int32, device="cuda"))
    got = sink_triton.exact_split_triton(q, mean, mask, 0.088, sk, sv, pos, new_k, new_v, new_pos, *out)
    assert torch.equal(torch.isinf(got[0]), torch.isinf(ref[0]))
    assert torch.equal(got[2], pos.int())
    finite = torch.isfinite(ref[0])
    assert (got[0][finite] - ref[0][finite]).abs().max().item() < 1e-3
    assert (got[1] - ref[1]).abs().max().item() < 1e-3


def _canonical(buffers):
    """The slot buffers with the outlier slots (1..S-1) ordered by position: the torch form re-sorts them by their
    criterion, the step kernel writes in place."""
    k, v, p, c = buffers
    order = torch.cat([torch.zeros_like(p[:, :1]), 1 + p[:, 1:].argsort(1)], 1)
    take = order[:, None, :, None].expand_as(k)
    return k.gather(2, take), v.gather(2, take), p.gather(1, order), c.gather(1, order)


def test_store_exact_step_triton_matches_torch():
    from sqcompile.kernels import sink_triton
    from sqcompile.kernels.sink import store_exact_torch

    _, mean, _, sk, sv, pos, _, _, _ = _inputs()
    g = torch.Generator(device="cuda").manual_seed(3)
    ref = [sk.clone(), sv.clone(), pos.clone(), torch.rand(B, SLOTS, device="cuda", generator=g) * 200 * D]
    ref[3][:, 0] = float("-inf")
    mine = [t.clone() for t in ref]
    for step, scale in enumerate((0.1, 5.0, 1.0, 30.0, 0.5, 10.0)):  # some keys take a slot, some do not
        key = mean[None, :, None, :] + scale * torch.randn(B, HKV, 1, D, device="cuda", generator=g)
        val = torch.randn(B, HKV, 1, D, device="cuda", generator=g)
        at = torch.tensor([40000 + step], device="cuda")
        store_exact_torch(*ref, key, val, at, None, mean, True, SLOTS - 1)
        sink_triton.store_exact_step_triton(*mine, key, val, at, None, mean, True, SLOTS - 1)
        for got, want in zip(_canonical(mine), _canonical(ref)):
            if got.is_floating_point():  # the sink's criterion is -inf on both sides
                torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
            else:
                assert torch.equal(got, want), f"step {step}"
