"""Triton kernels of the exact-slot ops (`sqcompile.kernels.sink`) on CUDA: one launch each per layer and decode step.

`sqcompile::exact_split` and `sqcompile::store_exact` are single nodes in the compiled graph (Inductor's fusion
search over their few dozen torch ops cost more compile time than the rest of a layer), so nothing fuses them: in
torch they are ~25 small launches each, 0.15 ms per layer-step on an H100 (BENCHMARKS.md). These kernels do the
same work in one launch:

- `exact_split_triton`: per (batch row, query head) the online softmax over the exact slots and the new token
  (scores in log2 units, without q . k_mean, like the decode kernels'), giving one split (score, value);
- `store_exact_step_triton`: a decode step's one new token per row: the sink if it is at RoPE position 0, else a
  candidate outlier that takes the slot of the nearest held key when its key lies farther from the key mean.
  Prompts (several new tokens) keep the torch form (top-k over the prompt; once per sequence).

`sink.exact_split_torch` and `sink.store_exact_torch` are the references the tests compare them with.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _online(m, l, acc, sc, v):
    """One more token (score sc, log2 units, -inf: none; value v) into the running (max, sum, weighted sum)."""
    mn = tl.maximum(m, sc)
    ms = tl.where(mn == -float("inf"), 0.0, mn)
    al = tl.exp2(m - ms)
    be = tl.exp2(sc - ms)
    return mn, l * al + be, acc * al + be * v


@triton.jit
def _exact_split_kernel(Q, KM, MASK, SK, SV, SP, NK, NV, NP, SCORE, VALUE,
                        Hq, G, Hkv, S, T, scale,
                        q_sb, q_sh, nk_sb, nk_sh, nv_sb, nv_sh,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SLOTS: tl.constexpr,
                        HAS_NEW: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // Hq
    hq = pid % Hq
    h = hq // G
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(Q + b * q_sb + hq * q_sh + d, mask=dm, other=0.0).to(tl.float32)
    km = tl.load(KM + h * D + d, mask=dm, other=0.0)
    c = scale * 1.4426950408889634
    m = tl.full([], -float("inf"), tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    npos = tl.full([], -1, tl.int32)
    if HAS_NEW:
        npos = tl.load(NP).to(tl.int32)
    if HAS_SLOTS:
        for s in range(S):
            p = tl.load(SP + b * S + s).to(tl.int32)
            ok = p >= 0
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * T + tl.maximum(p, 0)) != 0)
            if HAS_NEW:
                ok = ok & (p != npos)
            row = ((b * Hkv + h) * S + s) * D
            k = tl.load(SK + row + d, mask=dm, other=0.0)
            v = tl.load(SV + row + d, mask=dm, other=0.0)
            sc = tl.where(ok, tl.sum(q * (k - km), 0) * c, -float("inf"))
            m, l, acc = _online(m, l, acc, sc, v)
    if HAS_NEW:
        k = tl.load(NK + b * nk_sb + h * nk_sh + d, mask=dm, other=0.0).to(tl.float32)
        v = tl.load(NV + b * nv_sb + h * nv_sh + d, mask=dm, other=0.0).to(tl.float32)
        m, l, acc = _online(m, l, acc, tl.sum(q * (k - km), 0) * c, v)
    has = l > 0
    tl.store(SCORE + pid, tl.where(has, m + tl.log2(tl.maximum(l, 1e-30)), -float("inf")))
    tl.store(VALUE + pid * D + d, tl.where(has, acc / tl.maximum(l, 1e-30), 0.0), mask=dm)


def exact_split_triton(q: torch.Tensor, k_mean: torch.Tensor, kv_mask: Optional[torch.Tensor], scale: float,
                       sink_k: Optional[torch.Tensor], sink_v: Optional[torch.Tensor], sink_pos: Optional[torch.Tensor],
                       new_k: Optional[torch.Tensor], new_v: Optional[torch.Tensor], new_pos: Optional[torch.Tensor],
                       score: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None):
    """`sink.exact_split_torch` in one launch: (score [B, Hq] float32, value [B, Hq, d] float32). Slots in the form
    [B, Hkv, S, d] / [B, S]; `score` / `value` may be given (the tests poison them first)."""
    B, Hq, D = q.shape
    Hkv = k_mean.shape[0]
    dev = q.device
    score = torch.empty(B, Hq, device=dev, dtype=torch.float32) if score is None else score
    value = torch.empty(B, Hq, D, device=dev, dtype=torch.float32) if value is None else value
    has_slots, has_new = sink_k is not None, new_k is not None
    S = sink_pos.shape[1] if has_slots else 0
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    sk = sink_k.float().contiguous() if has_slots else dummy
    sv = sink_v.float().contiguous() if has_slots else dummy
    sp = sink_pos.contiguous() if has_slots else dummy
    T = kv_mask.shape[-1] if kv_mask is not None else 1
    mask = kv_mask.expand(B, T).to(torch.uint8).contiguous() if kv_mask is not None else dummy
    nk = new_k if has_new else dummy.view(1, 1, 1, 1)
    nv = new_v if has_new else dummy.view(1, 1, 1, 1)
    if has_new and (nk.stride(-1) != 1 or nv.stride(-1) != 1):
        nk, nv = nk.contiguous(), nv.contiguous()
    qq = q if q.stride(-1) == 1 else q.contiguous()
    _exact_split_kernel[(B * Hq,)](
        qq, k_mean.float().contiguous(), mask, sk, sv, sp, nk, nv, new_pos if has_new else dummy, score, value,
        Hq, Hq // Hkv, Hkv, S, T, float(scale), qq.stride(0), qq.stride(1), nk.stride(0), nk.stride(1),
        nv.stride(0), nv.stride(1), D=D, BLOCK_D=triton.next_power_of_2(D), HAS_MASK=kv_mask is not None,
        HAS_SLOTS=has_slots, HAS_NEW=has_new)
    return score, value


@triton.jit
def _store_step_kernel(SK, SV, SP, SC, K, V, POS, PID, KM, H, S,
                       k_sb, k_sh, v_sb, v_sh, pid_sb,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_PID: tl.constexpr, O: tl.constexpr,
                       NOUT: tl.constexpr):
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    pos = tl.load(POS).to(tl.int64)
    if HAS_PID:
        first = tl.load(PID + b * pid_sb) == 0
    else:
        first = pos == 0
    crit = tl.zeros([], dtype=tl.float32)
    for h in range(H):
        k = tl.load(K + b * k_sb + h * k_sh + d, mask=dm, other=0.0).to(tl.float32)
        km = tl.load(KM + h * D + d, mask=dm, other=0.0)
        crit += tl.sum((k - km) * (k - km), 0)
    # the outlier slot of the nearest held key (the lowest criterion; empty slots hold -inf)
    worst = tl.full([], float("inf"), tl.float32)
    at = tl.full([], O, tl.int32)
    for s in range(O, S):
        cs = tl.load(SC + b * S + s)
        better = cs < worst
        at = tl.where(better, s, at)
        worst = tl.where(better, cs, worst)
    take = (crit > worst) & (first == 0)
    if NOUT == 0:
        take = take & (pos < 0)  # never: no outlier slots
    if O == 1:
        sink_w = first
    else:
        sink_w = first & (pos < 0)  # never: no sink slot
    slot = tl.where(sink_w, 0, at)
    write = sink_w | take
    # a block mask from the scalar through int32 (the interpreter rejects a scalar bool broadcast into a mask)
    wm = dm & ((write.to(tl.int32) + tl.zeros([BLOCK_D], tl.int32)) != 0)
    for h in range(H):
        k = tl.load(K + b * k_sb + h * k_sh + d, mask=dm, other=0.0).to(tl.float32)
        v = tl.load(V + b * v_sb + h * v_sh + d, mask=dm, other=0.0).to(tl.float32)
        row = ((b * H + h) * S + slot) * D
        tl.store(SK + row + d, k, mask=wm)
        tl.store(SV + row + d, v, mask=wm)
    # scalar stores without a mask (the interpreter takes no scalar mask): the slot's own value where nothing changes
    tl.store(SP + b * S + slot, tl.where(write, pos, tl.load(SP + b * S + slot)))
    tl.store(SC + b * S + slot, tl.where(take, crit, tl.load(SC + b * S + slot)))


def store_exact_step_triton(sink_k: torch.Tensor, sink_v: torch.Tensor, sink_pos: torch.Tensor,
                            sink_crit: torch.Tensor, key_states: torch.Tensor, v_store: torch.Tensor,
                            positions: torch.Tensor, position_ids: Optional[torch.Tensor], k_mean: torch.Tensor,
                            keep_sink: bool, outliers: int) -> None:
    """`sink.store_exact_torch` for one new token per row (a decode step), in one launch; the slot buffers are
    contiguous (SpectralLayer allocates them so)."""
    B, H, n, D = key_states.shape
    if n != 1:
        raise ValueError(f"store_exact_step_triton takes one new token per row, got {n}")
    S = sink_pos.shape[1]
    pid = position_ids.expand(B, 1) if position_ids is not None else positions
    _store_step_kernel[(B,)](
        sink_k, sink_v, sink_pos, sink_crit, key_states, v_store, positions, pid, k_mean.float().contiguous(), H, S,
        key_states.stride(0), key_states.stride(1), v_store.stride(0), v_store.stride(1),
        pid.stride(0) if position_ids is not None else 0,
        D=D, BLOCK_D=triton.next_power_of_2(D), HAS_PID=position_ids is not None, O=int(bool(keep_sink)),
        NOUT=int(outliers))
