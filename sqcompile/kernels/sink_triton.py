"""Triton kernels of the exact-slot ops (`sqcompile.kernels.sink`) on CUDA: one launch each per layer and decode step.

`sqcompile::exact_split` and `sqcompile::store_exact` are single nodes in the compiled graph (Inductor's fusion
search over their few dozen torch ops cost more compile time than the rest of a layer), so nothing fuses them: in
torch they are ~25 small launches each, 0.15 ms per layer-step on an H100. These kernels do the
same work in one launch:

- `exact_split_triton`: per (batch row, query head) the softmax over the exact slots and the new token (scores in
  log2 units, without q . k_mean, like the decode kernels'), giving one split (score, value), and the slots'
  positions as int32 (what the decode op's skip list reads);
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
def _exact_positions(ptrs, valid, row_mask, npos, HAS_MASK: tl.constexpr, HAS_NEW: tl.constexpr):
    """(positions int32 at ptrs, -1 where not valid; which of them count: held (>= 0), not hidden by the row's token
    mask, not the step's new token, which counts from its own copy)."""
    p = tl.load(ptrs, mask=valid, other=-1).to(tl.int32)
    ok = valid & (p >= 0)
    if HAS_MASK:
        ok = ok & (tl.load(row_mask + tl.maximum(p, 0), mask=ok, other=0) != 0)
    if HAS_NEW:
        ok = ok & (p != npos)
    return p, ok


@triton.jit
def _exact_split_kernel(Q, KM, MASK, SK, SV, SP, NK, NV, NP, WK, WV, WP, SCORE, VALUE, POS,
                        Hq, G, Hkv, S, T, NW, scale,
                        q_sb, q_sh, nk_sb, nk_sh, nv_sb, nv_sh,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
                        HAS_MASK: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_NEW: tl.constexpr, HAS_WIN: tl.constexpr):
    """One program per (batch row b, query head hq). All exact slots at once: positions [BLOCK_S], keys and values
    [BLOCK_S, BLOCK_D] (one load each, no loop: a loop over the slots chained their loads, 6.6 us per launch on an
    H100). The program of query head 0 also writes the row's positions as int32 (POS [B, S], or [B, 1] = -1
    without slots): the op's third output, without a conversion and a copy of its own. The recent window (WK / WV
    fp16 [B, Hkv, NW, D], WP [B, NW]) streams in blocks of BLOCK_W slots with an online softmax; a window slot whose
    position a slot or the new token holds is left out (they count once, from their own copy)."""
    pid = tl.program_id(0)
    b = pid // Hq
    hq = pid % Hq
    h = hq // G
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    sl = tl.arange(0, BLOCK_S)
    # the positions' writer, as a block mask (the interpreter rejects a scalar bool broadcast into a mask)
    first_head = (hq + tl.zeros([BLOCK_S], tl.int32)) == 0
    q = tl.load(Q + b * q_sb + hq * q_sh + d, mask=dm, other=0.0).to(tl.float32)
    km = tl.load(KM + h * D + d, mask=dm, other=0.0)
    c = scale * 1.4426950408889634
    npos = tl.full([], -1, tl.int32)
    if HAS_NEW:
        npos = tl.load(NP).to(tl.int32)
    m = tl.full([], -float("inf"), tl.float32)
    p = tl.full([BLOCK_S], -1, tl.int32)
    if HAS_SLOTS:
        sm = sl < S
        p, ok = _exact_positions(SP + b * S + sl, sm, MASK + b * T, npos, HAS_MASK, HAS_NEW)
        rows = ((b * Hkv + h) * S + sl) * D
        tile = sm[:, None] & dm[None, :]
        k = tl.load(SK + rows[:, None] + d[None, :], mask=tile, other=0.0)
        v = tl.load(SV + rows[:, None] + d[None, :], mask=tile, other=0.0)
        sc = tl.where(ok, tl.sum(q[None, :] * (k - km[None, :]), 1) * c, -float("inf"))  # [BLOCK_S], log2 units
        m = tl.max(sc, 0)
        tl.store(POS + b * S + sl, p, mask=sm & first_head)
    else:
        tl.store(POS + b + sl, tl.full([BLOCK_S], -1, tl.int32), mask=(sl < 1) & first_head)
    if HAS_NEW:
        k_new = tl.load(NK + b * nk_sb + h * nk_sh + d, mask=dm, other=0.0).to(tl.float32)
        v_new = tl.load(NV + b * nv_sb + h * nv_sh + d, mask=dm, other=0.0).to(tl.float32)
        sc_new = tl.sum(q * (k_new - km), 0) * c
        m = tl.maximum(m, sc_new)
    ms = tl.where(m == -float("inf"), 0.0, m)  # nothing exact: every weight 0, score -inf, value 0
    l = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_SLOTS:
        w = tl.exp2(sc - ms)
        l += tl.sum(w, 0)
        acc += tl.sum(w[:, None] * v, 0)
    if HAS_NEW:
        w_new = tl.exp2(sc_new - ms)
        l += w_new
        acc += w_new * v_new
    if HAS_WIN:
        # online softmax over the ring, continuing from (m, l, acc) of the slots and the new token
        wr = tl.arange(0, BLOCK_W)
        for w0 in range(0, NW, BLOCK_W):
            ws = w0 + wr
            wm = ws < NW
            wp, wok = _exact_positions(WP + b * NW + ws, wm, MASK + b * T, npos, HAS_MASK, HAS_NEW)
            if HAS_SLOTS:  # held by a slot (p = -1 for none; wp >= 0 here)
                wok = wok & (tl.max((wp[:, None] == p[None, :]).to(tl.int32), 1) == 0)
            wrows = ((b * Hkv + h) * NW + ws) * D
            wtile = wm[:, None] & dm[None, :]
            kw = tl.load(WK + wrows[:, None] + d[None, :], mask=wtile, other=0.0).to(tl.float32)
            scw = tl.where(wok, tl.sum(q[None, :] * (kw - km[None, :]), 1) * c, -float("inf"))
            m_new = tl.maximum(m, tl.max(scw, 0))
            mn = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.where(m == -float("inf"), 0.0, tl.exp2(ms - mn))  # nothing before: l = 0, acc = 0
            pw = tl.exp2(scw - mn)
            vw = tl.load(WV + wrows[:, None] + d[None, :], mask=wtile, other=0.0).to(tl.float32)
            l = l * alpha + tl.sum(pw, 0)
            acc = acc * alpha + tl.sum(pw[:, None] * vw, 0)
            m = m_new
            ms = mn
    has = l > 0
    tl.store(SCORE + pid, tl.where(has, ms + tl.log2(tl.maximum(l, 1e-30)), -float("inf")))
    tl.store(VALUE + pid * D + d, tl.where(has, acc / tl.maximum(l, 1e-30), 0.0), mask=dm)


def exact_split_triton(q: torch.Tensor, k_mean: torch.Tensor, kv_mask: Optional[torch.Tensor], scale: float,
                       sink_k: Optional[torch.Tensor], sink_v: Optional[torch.Tensor], sink_pos: Optional[torch.Tensor],
                       new_k: Optional[torch.Tensor], new_v: Optional[torch.Tensor], new_pos: Optional[torch.Tensor],
                       score: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                       pos: Optional[torch.Tensor] = None, window: Optional[tuple] = None):
    """`sink.exact_split_torch` in one launch: (score [B, Hq] float32, value [B, Hq, d] float32, the slots' positions
    int32 [B, S], or [B, 1] of -1 without slots). Slots in the form [B, Hkv, S, d] / [B, S]; a uint8 kv_mask
    [B, T] (what the substitution pass hands every layer, converted once per step) is read as it is, any other
    form is converted here. `score` / `value` / `pos` may be given (the tests poison them first). window =
    (window_k, window_v [B, Hkv, W, d], window_pos [B, W]): the recent window's ring, read in the same launch."""
    B, Hq, D = q.shape
    Hkv = k_mean.shape[0]
    dev = q.device
    has_slots, has_new = sink_k is not None, new_k is not None
    S = sink_pos.shape[1] if has_slots else 0
    score = torch.empty(B, Hq, device=dev, dtype=torch.float32) if score is None else score
    value = torch.empty(B, Hq, D, device=dev, dtype=torch.float32) if value is None else value
    pos = torch.empty(B, max(S, 1), device=dev, dtype=torch.int32) if pos is None else pos
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
    wk, wv, wp = (dummy, dummy, dummy) if window is None else (t.contiguous() for t in window)
    NW = 0 if window is None else wk.shape[2]
    _exact_split_kernel[(B * Hq,)](
        qq, k_mean.float().contiguous(), mask, sk, sv, sp, nk, nv, new_pos if has_new else dummy, wk, wv, wp, score,
        value, pos, Hq, Hq // Hkv, Hkv, S, T, NW, float(scale), qq.stride(0), qq.stride(1), nk.stride(0),
        nk.stride(1), nv.stride(0), nv.stride(1), D=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_S=triton.next_power_of_2(max(S, 1)), BLOCK_W=min(32, triton.next_power_of_2(max(NW, 1))),
        HAS_MASK=kv_mask is not None, HAS_SLOTS=has_slots, HAS_NEW=has_new, HAS_WIN=window is not None)
    return score, value, pos


@triton.jit
def _store_step_kernel(SK, SV, SP, SC, K, V, POS, PID, KM, H, S,
                       k_sb, k_sh, v_sb, v_sh, pid_sb,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                       HAS_PID: tl.constexpr, O: tl.constexpr, NOUT: tl.constexpr):
    """One program per batch row: the new token's key and value of every kv-head as one [BLOCK_H, BLOCK_D] tile
    each, the held criteria as one [BLOCK_S] vector (loops over heads and slots chained their loads: 7.8 us per
    launch on an H100)."""
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    hh = tl.arange(0, BLOCK_H)
    tile = (hh < H)[:, None] & (d < D)[None, :]
    pos = tl.load(POS).to(tl.int64)
    if HAS_PID:
        first = tl.load(PID + b * pid_sb) == 0
    else:
        first = pos == 0
    k = tl.load(K + b * k_sb + hh[:, None] * k_sh + d[None, :], mask=tile, other=0.0).to(tl.float32)
    v = tl.load(V + b * v_sb + hh[:, None] * v_sh + d[None, :], mask=tile, other=0.0).to(tl.float32)
    km = tl.load(KM + hh[:, None] * D + d[None, :], mask=tile, other=0.0)
    crit = tl.sum(tl.sum((k - km) * (k - km), 1), 0)
    # the outlier slot of the nearest held key: the first of the lowest criterion (empty slots hold -inf; a NaN
    # criterion is never the lowest). Without outlier slots nothing is taken and `at` only addresses the scalar
    # stores below, which then write back what they read: slot 0 of this row (slot O = S was the next row's slot 0,
    # which that row's program may be writing, and past the buffer for the last row).
    s = tl.arange(0, BLOCK_S)
    cand = (s >= O) & (s < S)
    cs = tl.load(SC + b * S + s, mask=cand, other=float("inf"))
    cs = tl.where(cs == cs, cs, float("inf"))
    worst = tl.min(cs, 0)
    at = tl.min(tl.where(cand & (cs == worst), s, BLOCK_S), 0)
    at = tl.where(at == BLOCK_S, 0, at)
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
    wm = tile & ((write.to(tl.int32) + tl.zeros([BLOCK_H, BLOCK_D], tl.int32)) != 0)
    rows = ((b * H + hh) * S + slot) * D
    tl.store(SK + rows[:, None] + d[None, :], k, mask=wm)
    tl.store(SV + rows[:, None] + d[None, :], v, mask=wm)
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
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_H=triton.next_power_of_2(H), BLOCK_S=triton.next_power_of_2(S),
        HAS_PID=position_ids is not None, O=int(bool(keep_sink)), NOUT=int(outliers))
