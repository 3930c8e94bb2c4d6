"""Decode attention straight from the packed SpectralQuant KV cache (flash-decoding, split-K).

Memory layout (see `_bitplanes.py` for the bytes of one row):

    q          [B, Hq, d]                 fp16/bf16/fp32, unrotated (post-RoPE)
    k_packed   [B, Hkv, max_tokens, k_bytes] uint8, one row per (token, kv-head), rows of one
    v_packed   [B, Hkv, max_tokens, v_bytes] uint8   (batch, kv-head) contiguous: a block of BLOCK_N
                                              tokens is one contiguous run of BLOCK_N * row bytes,
                                              so every load below is coalesced
    lengths    [B] int32                     valid tokens of each batch row
    out        [B, Hq, d]                    in the VALUE storage basis (o_proj absorbed B_v^T)

Kernel 1 (`_decode_split_kernel`), one program per (batch, kv-head, split):
  * prologue: q_store = q @ B_k^T for the G = Hq / Hkv query heads of the kv-head (the key mean is
    dropped: softmax-invariant), one [G, n] slice per group; "channel" groups fold channel_scale into
    q; the softmax scale and log2(e) are folded in too. QJL: sq = q @ (S B_k[:dq])^T.
  * loop over the split's tokens in blocks of BLOCK_N: load each group's bit-plane bytes once per
    token, expand the bits in registers and pick the codebook level with a select tree (bits <= 4;
    a gather from the codebook above), score with one tl.dot per group for all G heads (each
    KV block is loaded once per GQA group), multiply by the token scale, add the QJL correction
    sqrt(pi/2)/m * ||r|| * <sq, sign>, online softmax, and accumulate P @ V per value group (the value
    token scale is folded into P).
  * writes the split's normalized partial output and its log2-sum-exp.
Kernel 2 (`_decode_reduce_kernel`), one program per (batch, query head): merges the splits.

The torch reference (`decode_attention_reference`) dequantizes with `sqcompile.quant` and runs
plain softmax attention; it is the CPU implementation of the op.

Speed (benchmarks/decode_attention.py, H200; BENCHMARKS.md): correct, 25-44x faster than dequantize + SDPA, but
still 0.2-0.4x of FP16 SDPA on an H200: the loop spends ~10.5 instructions per K/V element on bit
tests, selects and operand layout conversions, where the byte floor allows ~3.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import uses_triton
from ._bitplanes import CODEBOOK_STRIDE, MAX_GROUPS, QJL_CONST, PackedLayout, format_from_args
from .sink import check_sink, merge_sink_reference, skip_mask

LOG2E = 1.4426950408889634
LAST_COMPILED: dict = {}  # kernel name -> the last CompiledKernel (n_regs, n_spills, asm) launched on a GPU


# ---------------------------------------------------------------------------------------------
# Triton device helpers (shared with quantize_write)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_fp16(row_ptr, OFF: tl.constexpr, mask):
    """fp16 stored little-endian at byte OFF of each row -> float32 [rows]."""
    lo = tl.load(row_ptr + OFF, mask=mask, other=0).to(tl.int32)
    hi = tl.load(row_ptr + (OFF + 1), mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _unpack_codes(row_ptr, mask_n, PLANE_OFF: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                  BITS: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
    """Codes [BLOCK_N, NP] int32 of one group (columns >= N: zeros or the format's zero padding bits).

    UNPACK 0: one byte gather per coordinate and plane (simple; 8 lanes share each byte).
    UNPACK 1: load each plane's ceil(n/8) bytes once per token and expand the 8 bits in registers.
    """
    NB: tl.constexpr = (N + 7) // 8
    if UNPACK == 0:
        j = tl.arange(0, NP)
        m2 = mask_n[:, None] & (j < N)[None, :]
        ptrs = row_ptr[:, None] + (PLANE_OFF + j // 8)[None, :]
        sh = (j % 8)[None, :]
        code = tl.zeros([BLOCK_N, NP], dtype=tl.int32)
        for p in tl.static_range(BITS):
            b = tl.load(ptrs + p * NB, mask=m2, other=0).to(tl.int32)
            code = code | (((b >> sh) & 1) << p)
    else:
        NBP: tl.constexpr = NP // 8
        c = tl.arange(0, NBP)
        m2 = mask_n[:, None] & (c < NB)[None, :]
        ptrs = row_ptr[:, None] + (PLANE_OFF + c)[None, :]
        sh = tl.arange(0, 8)[None, None, :]
        code3 = tl.zeros([BLOCK_N, NBP, 8], dtype=tl.int32)
        for p in tl.static_range(BITS):
            b = tl.load(ptrs + p * NB, mask=m2, other=0).to(tl.int32)
            code3 = code3 | (((b[:, :, None] >> sh) & 1) << p)
        code = tl.reshape(code3, [BLOCK_N, NP])
    return code


@triton.jit
def _group_query(q_ptr, stride_qh, G: tl.constexpr, BG: tl.constexpr, basis_ptr, cs_ptr, START: tl.constexpr,
                 N: tl.constexpr, NP: tl.constexpr, TOKEN: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                 DCH: tl.constexpr):
    """q rows [G, D] (global) -> q @ B[START:START+N]^T [BG, NP] fp32 (x channel scale for channel
    groups). The d axis is walked in chunks of DCH so no d x d tile sits in registers."""
    r = tl.arange(0, NP)
    g = tl.arange(0, BG)
    rm = r < N
    acc = tl.zeros([BG, NP], dtype=tl.float32)
    for d0 in tl.static_range(0, DP, DCH):
        d = d0 + tl.arange(0, DCH)
        qc = tl.load(q_ptr + g[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None] & (d < D)[None, :],
                     other=0.0).to(tl.float32)
        bc = tl.load(basis_ptr + (START + r)[:, None] * D + d[None, :], mask=rm[:, None] & (d < D)[None, :],
                     other=0.0)
        acc += tl.dot(qc, tl.trans(bc), input_precision="ieee")
    if not TOKEN:
        cs = tl.load(cs_ptr + START + r, mask=rm, other=0.0)
        acc = acc * cs[None, :]
    return acc


@triton.jit
def _select_tree(b0, b1, b2, b3, cb_ptr, BITS: tl.constexpr, DT: tl.constexpr):
    """codebook[code] from the code's bits (booleans), by a tree of 2**BITS - 1 selects in dtype DT."""
    v01 = tl.where(b0, tl.load(cb_ptr + 1).to(DT), tl.load(cb_ptr).to(DT))
    out = v01
    if BITS >= 2:
        v23 = tl.where(b0, tl.load(cb_ptr + 3).to(DT), tl.load(cb_ptr + 2).to(DT))
        out = tl.where(b1, v23, v01)
    if BITS >= 3:
        v45 = tl.where(b0, tl.load(cb_ptr + 5).to(DT), tl.load(cb_ptr + 4).to(DT))
        v67 = tl.where(b0, tl.load(cb_ptr + 7).to(DT), tl.load(cb_ptr + 6).to(DT))
        out = tl.where(b2, tl.where(b1, v67, v45), out)
    if BITS >= 4:
        v89 = tl.where(b0, tl.load(cb_ptr + 9).to(DT), tl.load(cb_ptr + 8).to(DT))
        vab = tl.where(b0, tl.load(cb_ptr + 11).to(DT), tl.load(cb_ptr + 10).to(DT))
        vcd = tl.where(b0, tl.load(cb_ptr + 13).to(DT), tl.load(cb_ptr + 12).to(DT))
        vef = tl.where(b0, tl.load(cb_ptr + 15).to(DT), tl.load(cb_ptr + 14).to(DT))
        hi = tl.where(b2, tl.where(b1, vef, vcd), tl.where(b1, vab, v89))
        out = tl.where(b3, hi, out)
    return out


@triton.jit
def _plane_bits(ptrs, m2, bit, OFF: tl.constexpr):
    """Bits of one plane: bytes [BLOCK_N, NBP] -> booleans [BLOCK_N, NBP, 8] (bit i of byte c);
    bit = 1 << arange(8), a constant per register once unrolled: one AND and one compare a bit."""
    byte = tl.load(ptrs + OFF, mask=m2, other=0).to(tl.int32)
    return (byte[:, :, None] & bit) != 0


@triton.jit
def _decode_group(row_ptr, mask_n, cb_ptr, PLANE_OFF: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                  BITS: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr, LOOKUP: tl.constexpr):
    """codebook[codes] [BLOCK_N, NP] fp16 of one group (unscaled).

    LOOKUP 1/2 (bits <= 4; the tree in fp16/fp32): each plane's ceil(n/8) bytes are loaded once per token, the bits expanded
    in registers to [BLOCK_N, n/8, 8] and the level picked by a select tree: no per-element loads.
    LOOKUP 0: codes assembled by `_unpack_codes`, then one gather per element from the codebook.
    """
    if LOOKUP >= 1 and BITS <= 4:
        NB: tl.constexpr = (N + 7) // 8
        NBP: tl.constexpr = NP // 8
        c = tl.arange(0, NBP)
        m2 = mask_n[:, None] & (c < NB)[None, :]
        ptrs = row_ptr[:, None] + (PLANE_OFF + c)[None, :]
        bit = (1 << tl.arange(0, 8))[None, None, :]
        b0 = _plane_bits(ptrs, m2, bit, 0)
        b1 = b0
        b2 = b0
        b3 = b0
        if BITS >= 2:
            b1 = _plane_bits(ptrs, m2, bit, NB)
        if BITS >= 3:
            b2 = _plane_bits(ptrs, m2, bit, 2 * NB)
        if BITS >= 4:
            b3 = _plane_bits(ptrs, m2, bit, 3 * NB)
        if LOOKUP == 1:
            vals = _select_tree(b0, b1, b2, b3, cb_ptr, BITS, tl.float16)
        else:  # LOOKUP 2: the same tree on fp32 values, one conversion at the end
            vals = _select_tree(b0, b1, b2, b3, cb_ptr, BITS, tl.float32).to(tl.float16)
        out = tl.reshape(vals, [BLOCK_N, NP])
    else:
        codes = _unpack_codes(row_ptr, mask_n, PLANE_OFF, N, NP, BITS, BLOCK_N, UNPACK)
        out = tl.load(cb_ptr + codes).to(tl.float16)
    return out


@triton.jit
def _group_scores(qg, row_ptr, mask_n, cb_ptr, PLANE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr,
                  N: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr, TOKEN: tl.constexpr,
                  BLOCK_N: tl.constexpr, UNPACK: tl.constexpr, LOOKUP: tl.constexpr):
    """[BG, BLOCK_N] fp32: q_g . codebook[codes] (x token scale)."""
    kv = _decode_group(row_ptr, mask_n, cb_ptr, PLANE_OFF, N, NP, BITS, BLOCK_N, UNPACK, LOOKUP)
    s = tl.dot(qg, tl.trans(kv))
    if TOKEN:
        s = s * _load_fp16(row_ptr, SCALE_OFF, mask_n)[None, :]
    return s


@triton.jit
def _group_pv(p, row_ptr, mask_n, cb_ptr, PLANE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr,
              N: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr, TOKEN: tl.constexpr,
              BLOCK_N: tl.constexpr, UNPACK: tl.constexpr, LOOKUP: tl.constexpr):
    """[BG, NP] fp32: P @ codebook[codes] (token scale folded into P)."""
    vv = _decode_group(row_ptr, mask_n, cb_ptr, PLANE_OFF, N, NP, BITS, BLOCK_N, UNPACK, LOOKUP)
    if TOKEN:
        p = p * _load_fp16(row_ptr, SCALE_OFF, mask_n)[None, :]
    return tl.dot(p.to(tl.float16), vv)


@triton.jit
def _store_group_out(o_ptr, acc, cs_ptr, START: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                     TOKEN: tl.constexpr, BG: tl.constexpr, G: tl.constexpr, stride_row):
    j = tl.arange(0, NP)
    g = tl.arange(0, BG)
    if not TOKEN:
        acc = acc * tl.load(cs_ptr + START + j, mask=j < N, other=0.0)[None, :]
    tl.store(o_ptr + g[:, None] * stride_row + (START + j)[None, :], acc,
             mask=(g < G)[:, None] & (j < N)[None, :])


# ---------------------------------------------------------------------------------------------
# Kernel 1: one program per (batch, kv-head, split)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _decode_split_kernel(
    Q, KP, VP, LEN, KBASIS, KCS, VCS, KCB, VCB, QJLW, OP, LSE, KVM,
    qk_scale,  # softmax scale * log2(e)
    max_tokens,  # cache capacity: lengths are clamped to it, so a bad length never reads past the cache
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb,
    HAS_MASK: tl.constexpr,  # KVM [B, max_tokens] uint8: 0 = this token is masked out (padding, window)
    HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    K_BYTES: tl.constexpr, V_BYTES: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    KNG: tl.constexpr,
    K0S: tl.constexpr, K0N: tl.constexpr, K0NP: tl.constexpr, K0B: tl.constexpr, K0T: tl.constexpr, K0PO: tl.constexpr, K0SO: tl.constexpr,
    K1S: tl.constexpr, K1N: tl.constexpr, K1NP: tl.constexpr, K1B: tl.constexpr, K1T: tl.constexpr, K1PO: tl.constexpr, K1SO: tl.constexpr,
    K2S: tl.constexpr, K2N: tl.constexpr, K2NP: tl.constexpr, K2B: tl.constexpr, K2T: tl.constexpr, K2PO: tl.constexpr, K2SO: tl.constexpr,
    VNG: tl.constexpr,
    V0S: tl.constexpr, V0N: tl.constexpr, V0NP: tl.constexpr, V0B: tl.constexpr, V0T: tl.constexpr, V0PO: tl.constexpr, V0SO: tl.constexpr,
    V1S: tl.constexpr, V1N: tl.constexpr, V1NP: tl.constexpr, V1B: tl.constexpr, V1T: tl.constexpr, V1PO: tl.constexpr, V1SO: tl.constexpr,
    V2S: tl.constexpr, V2N: tl.constexpr, V2NP: tl.constexpr, V2B: tl.constexpr, V2T: tl.constexpr, V2PO: tl.constexpr, V2SO: tl.constexpr,
    QJL_M: tl.constexpr, QJL_MP: tl.constexpr, QJL_OFF: tl.constexpr, QJL_NOFF: tl.constexpr,
    UNPACK: tl.constexpr, LOOKUP: tl.constexpr, DCH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV

    # ---- this split's token range: the valid length is cut into NSPLIT chunks of whole blocks
    length = tl.minimum(tl.load(LEN + b).to(tl.int32), max_tokens)
    chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)

    # ---- prologue: rotated, pre-scaled queries of the G heads that share kv-head h
    g = tl.arange(0, BG)
    q_ptr = Q + b * stride_qb + (h * G) * stride_qh
    basis = KBASIS + h * D * D
    kcs = KCS + h * D
    vcs = VCS + h * D
    q0 = (_group_query(q_ptr, stride_qh, G, BG, basis, kcs, K0S, K0N, K0NP, K0T, D, DP, DCH)
          * qk_scale).to(tl.float16)
    q1 = q0
    q2 = q0
    if KNG > 1:
        q1 = (_group_query(q_ptr, stride_qh, G, BG, basis, kcs, K1S, K1N, K1NP, K1T, D, DP, DCH)
              * qk_scale).to(tl.float16)
    if KNG > 2:
        q2 = (_group_query(q_ptr, stride_qh, G, BG, basis, kcs, K2S, K2N, K2NP, K2T, D, DP, DCH)
              * qk_scale).to(tl.float16)
    if QJL_M > 0:
        # sq = (S B_k[:dq]) q, pre-scaled by sqrt(pi/2)/m and the softmax scale
        sq = (_group_query(q_ptr, stride_qh, G, BG, QJLW + h * QJL_M * D, kcs, 0, QJL_M, QJL_MP, True, D, DP, DCH)
              * (qk_scale * QJL_CONST_ / QJL_M)).to(tl.float16)

    m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc0 = tl.zeros([BG, V0NP], dtype=tl.float32)
    acc1 = tl.zeros([BG, V1NP], dtype=tl.float32)
    acc2 = tl.zeros([BG, V2NP], dtype=tl.float32)

    k_base = KP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = VP + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mask_n = offs < hi
        krow = k_base + offs.to(tl.int64) * K_BYTES
        vrow = v_base + offs.to(tl.int64) * V_BYTES

        s = tl.zeros([BG, BLOCK_N], dtype=tl.float32)
        if K0B > 0:
            s += _group_scores(q0, krow, mask_n, KCB, K0PO, K0SO, K0N, K0NP, K0B, K0T, BLOCK_N, UNPACK, LOOKUP)
        if KNG > 1:
            if K1B > 0:
                s += _group_scores(q1, krow, mask_n, KCB + CB_STRIDE_, K1PO, K1SO, K1N, K1NP, K1B, K1T,
                                   BLOCK_N, UNPACK, LOOKUP)
        if KNG > 2:
            if K2B > 0:
                s += _group_scores(q2, krow, mask_n, KCB + 2 * CB_STRIDE_, K2PO, K2SO, K2N, K2NP, K2B, K2T,
                                   BLOCK_N, UNPACK, LOOKUP)
        if QJL_M > 0:
            signs = _unpack_codes(krow, mask_n, QJL_OFF, QJL_M, QJL_MP, 1, BLOCK_N, UNPACK)
            signs = (signs * 2 - 1).to(tl.float16)
            corr = tl.dot(sq, tl.trans(signs))
            s += corr * _load_fp16(krow, QJL_NOFF, mask_n)[None, :]

        valid = mask_n
        if HAS_MASK:
            keep = tl.load(KVM + b.to(tl.int64) * stride_mb + offs, mask=mask_n, other=0)
            valid = mask_n & (keep != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked block adds nothing
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

        acc0 = acc0 * alpha[:, None]
        if V0B > 0:
            acc0 += _group_pv(p, vrow, mask_n, VCB, V0PO, V0SO, V0N, V0NP, V0B, V0T, BLOCK_N, UNPACK, LOOKUP)
        if VNG > 1:
            acc1 = acc1 * alpha[:, None]
            if V1B > 0:
                acc1 += _group_pv(p, vrow, mask_n, VCB + CB_STRIDE_, V1PO, V1SO, V1N, V1NP, V1B, V1T,
                                  BLOCK_N, UNPACK, LOOKUP)
        if VNG > 2:
            acc2 = acc2 * alpha[:, None]
            if V2B > 0:
                acc2 += _group_pv(p, vrow, mask_n, VCB + 2 * CB_STRIDE_, V2PO, V2SO, V2N, V2NP, V2B, V2T,
                                  BLOCK_N, UNPACK, LOOKUP)

    # ---- epilogue: normalized partial output and log2-sum-exp of this split
    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    row = (pid_bh * G + g) * NSPLIT + split  # = ((b * Hq) + h * G + g) * NSPLIT + split
    o_ptr = OP + ((pid_bh * G) * NSPLIT + split) * D
    _store_group_out(o_ptr, acc0 * inv_l[:, None], vcs, V0S, V0N, V0NP, V0T, BG, G, NSPLIT * D)
    if VNG > 1:
        _store_group_out(o_ptr, acc1 * inv_l[:, None], vcs, V1S, V1N, V1NP, V1T, BG, G, NSPLIT * D)
    if VNG > 2:
        _store_group_out(o_ptr, acc2 * inv_l[:, None], vcs, V2S, V2N, V2NP, V2T, BG, G, NSPLIT * D)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    tl.store(LSE + row, lse, mask=g < G)


@triton.jit
def _decode_reduce_kernel(OP, LSE, OUT, SINK_S, SINK_V, NSPLIT: tl.constexpr, NSPLIT_P: tl.constexpr,
                          D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, HAS_SINK: tl.constexpr):
    """One program per (batch, query head): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); with
    HAS_SINK the exact sink token is one more split: lse SINK_S[row] (log2 units), o SINK_V[row // G]."""
    pid = tl.program_id(0)
    s = tl.arange(0, NSPLIT_P)
    d = tl.arange(0, DP)
    lse = tl.load(LSE + pid * NSPLIT + s, mask=s < NSPLIT, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINK:
        ss = tl.load(SINK_S + pid)
        m = tl.maximum(m, ss)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - m))
    o = tl.load(OP + (pid * NSPLIT + s)[:, None] * D + d[None, :],
                mask=(s < NSPLIT)[:, None] & (d < D)[None, :], other=0.0)
    o = tl.where((lse == float("-inf"))[:, None], 0.0, o)
    tot = tl.sum(w, 0)
    acc = tl.sum(w[:, None] * o, 0)
    if HAS_SINK:
        ws = tl.where(ss == float("-inf"), 0.0, tl.exp2(ss - m))
        acc += ws * tl.load(SINK_V + (pid // G) * D + d, mask=d < D, other=0.0)
        tot += ws
    out = acc / tl.where(tot > 0, tot, 1.0)
    tl.store(OUT + pid * D + d, out.to(OUT.dtype.element_ty), mask=d < D)


def launch_reduce(launch, op, lse, out, sink_score, sink_value):
    """The split reduction (one program per (batch, query head)), with the exact sink merged where given: its
    value per kv-head (row // G) or per query head (G = 1)."""
    B, Hq, nsplit, D = op.shape
    has = sink_score is not None
    launch(_decode_reduce_kernel)[(B * Hq,)](
        op, lse, out, sink_score if has else lse, sink_value if has else op, NSPLIT=nsplit,
        NSPLIT_P=_pow2(nsplit, 2), D=D, DP=_pow2(D, 16), G=Hq // sink_value.shape[1] if has else 1, HAS_SINK=has)


# module-level constants the jit functions read as globals
QJL_CONST_ = tl.constexpr(QJL_CONST)
CB_STRIDE_ = tl.constexpr(CODEBOOK_STRIDE)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def group_constexprs(layout: PackedLayout, prefix: str) -> dict:
    """Per-group (start, n, padded n, bits, token, plane offset, scale offset) as kernel constexprs."""
    out = {f"{prefix}NG": len(layout.groups)}
    for i in range(MAX_GROUPS):
        if i < len(layout.groups):
            gl = layout.groups[i]
            vals = (gl.start, gl.n, _pow2(gl.n), gl.bits, int(gl.token_scale and gl.bits > 0),
                    gl.plane_offset, max(gl.scale_offset, 0))
        else:
            vals = (0, 1, 16, 0, 0, 0, 0)
        for name, v in zip(("S", "N", "NP", "B", "T", "PO", "SO"), vals):
            out[f"{prefix}{i}{name}"] = v
    return out


def default_num_splits(batch: int, kv_heads: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """~8 (batch, kv-head, split) programs per multiprocessor, each split >= 4 blocks of tokens.
    (H200, B=8, Hkv=8: 17 splits; 16 splits with maxnreg=128 was the fastest of 8 variants tried.)"""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(8 * sms, batch * kv_heads)
    return int(max(1, min(want, triton.cdiv(max_tokens, 4 * block_n), 64)))


def qjl_per_head(proj: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The QJL sketch as [Hkv, m, qjl_dims] float32 (a per-layer [m, qjl_dims] S is shared by all heads)."""
    proj = proj.to(torch.float32)
    return proj.expand(kv_heads, *proj.shape) if proj.dim() == 2 else proj


def _interpreted(kernel):
    """On CPU tensors the kernels must run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    return kernel


def wrap_interpreted(kernel):
    """`wrap_triton` for a triton_op's body on CPU tensors (TRITON_INTERPRET=1): torch 2.13 wraps interpreted
    kernels (so tracing works), torch 2.11 rejects them; there they are launched directly."""
    try:
        return wrap_triton(kernel)
    except RuntimeError:
        return kernel


def _check_args(q, k_packed, v_packed, lengths, kl: PackedLayout, vl: PackedLayout):
    B, Hq, D = q.shape
    if k_packed.dim() != 4 or v_packed.dim() != 4:
        raise ValueError("k_packed/v_packed must be [B, kv_heads, max_tokens, bytes]")
    if k_packed.shape[:3] != v_packed.shape[:3] or k_packed.shape[0] != B:
        raise ValueError(f"cache shapes {tuple(k_packed.shape)} / {tuple(v_packed.shape)} do not match q {tuple(q.shape)}")
    if Hq % k_packed.shape[1]:
        raise ValueError(f"query heads {Hq} not a multiple of kv-heads {k_packed.shape[1]}")
    if k_packed.shape[-1] != kl.row_bytes or v_packed.shape[-1] != vl.row_bytes:
        raise ValueError(f"row bytes {k_packed.shape[-1]}/{v_packed.shape[-1]} != format's {kl.row_bytes}/{vl.row_bytes}")
    if vl.has_qjl:
        raise NotImplementedError("QJL on values is not supported by decode_attention (keys only)")


def decode_attention_triton(
    q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, lengths: torch.Tensor,
    k_basis: torch.Tensor, k_codebooks: torch.Tensor, k_channel_scale: torch.Tensor,
    v_codebooks: torch.Tensor, v_channel_scale: torch.Tensor, k_qjl_proj: Optional[torch.Tensor],
    k_groups: list[int], v_groups: list[int], qjl_dims: int, qjl_bits: int, scale: float,
    num_splits: int = 0, block_n: int = 64, unpack: int = 1, lookup: int = 1, num_warps: int = 4,
    num_stages: int = 2, maxnreg: Optional[int] = 128, poison: bool = False, _launch=None,
    kv_mask: Optional[torch.Tensor] = None, sink_score: Optional[torch.Tensor] = None,
    sink_value: Optional[torch.Tensor] = None, sink_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the two kernels (wrap_triton'd when called from the custom op, plain otherwise).
    Defaults = the fastest variant measured (benchmarks/decode_attention.py --tune, H200): 64-token blocks,
    bit-plane expansion + select-tree lookup, 4 warps, registers capped at 128 (more programs resident).
    poison=True fills every buffer with NaN first (tests: each element must be written). sink_score [B, Hq]
    (log2 units) / sink_value [B, Hkv, d] / sink_pos [B]: the exact sink token (`sqcompile.kernels.sink`), its
    packed copy masked out, merged in the reduce."""
    B, Hq, D = q.shape
    Hkv, T = k_packed.shape[1], k_packed.shape[2]
    kl = PackedLayout.from_flat(D, k_groups, qjl_dims, qjl_bits)
    vl = PackedLayout.from_flat(D, v_groups)
    _check_args(q, k_packed, v_packed, lengths, kl, vl)
    sink_score, sink_value, sink_pos = check_sink(q, sink_score, sink_value, sink_pos, Hkv)
    kv_mask = skip_mask(kv_mask, sink_pos, B, T, q.device)
    G = Hq // Hkv
    nsplit = int(num_splits) if num_splits > 0 else default_num_splits(B, Hkv, T, block_n, q.device)
    launch = _launch or (lambda k: k if q.is_cuda else _interpreted(k))

    k_packed = k_packed.contiguous() if k_packed.stride(-1) != 1 or k_packed.stride(-2) != kl.row_bytes else k_packed
    v_packed = v_packed.contiguous() if v_packed.stride(-1) != 1 or v_packed.stride(-2) != vl.row_bytes else v_packed
    q = q.contiguous() if q.stride(-1) != 1 else q
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731  (bases may arrive in bf16/fp16)
    k_basis, k_codebooks, v_codebooks = f32(k_basis), f32(k_codebooks), f32(v_codebooks)
    k_channel_scale, v_channel_scale = f32(k_channel_scale), f32(v_channel_scale)
    if kl.has_qjl:
        m = qjl_bits
        # S q_store[:dq] = S B_k[:dq] q: fold the sketch into the key basis once per call
        s_proj = qjl_per_head(k_qjl_proj, Hkv)
        w = torch.matmul(s_proj, k_basis[:, :qjl_dims, :].to(torch.float32)).contiguous()
        qjl_meta = dict(QJL_M=m, QJL_MP=_pow2(m), QJL_OFF=kl.qjl_offset, QJL_NOFF=kl.qjl_norm_offset)
    else:
        w = k_basis  # unused
        qjl_meta = dict(QJL_M=0, QJL_MP=16, QJL_OFF=0, QJL_NOFF=0)

    op = torch.empty(B, Hq, nsplit, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, nsplit, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    if poison:
        op.fill_(float("nan")), lse.fill_(float("nan")), out.fill_(float("nan"))
    if kv_mask is not None:
        kv_mask = kv_mask.to(torch.uint8).expand(B, T).contiguous()
    mask_arg = kv_mask if kv_mask is not None else lengths
    ck = launch(_decode_split_kernel)[(B * Hkv, nsplit)](
        q, k_packed, v_packed, lengths, k_basis, k_channel_scale, v_channel_scale,
        k_codebooks, v_codebooks, w, op, lse, mask_arg, float(scale) * LOG2E, T,
        q.stride(0), q.stride(1), k_packed.stride(0), k_packed.stride(1), v_packed.stride(0), v_packed.stride(1),
        kv_mask.stride(0) if kv_mask is not None else 0, HAS_MASK=kv_mask is not None,
        HKV=Hkv, G=G, BG=_pow2(G), D=D, DP=_pow2(D, 16), K_BYTES=kl.row_bytes, V_BYTES=vl.row_bytes,
        NSPLIT=nsplit, BLOCK_N=block_n, **group_constexprs(kl, "K"), **group_constexprs(vl, "V"),
        **qjl_meta, UNPACK=unpack, LOOKUP=lookup, DCH=min(32, _pow2(D, 16)), num_warps=num_warps,
        num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg and q.is_cuda else {}),
    )
    if hasattr(ck, "n_regs"):  # compiled on a GPU: keep the resource report for the benchmark
        LAST_COMPILED["decode_split"] = ck
    launch_reduce(launch, op, lse, out, sink_score, sink_value)
    return out


def decode_attention_reference(
    q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, lengths: torch.Tensor,
    k_basis: torch.Tensor, k_codebooks: torch.Tensor, k_channel_scale: torch.Tensor,
    v_codebooks: torch.Tensor, v_channel_scale: torch.Tensor, k_qjl_proj: Optional[torch.Tensor],
    k_groups: list[int], v_groups: list[int], qjl_dims: int, qjl_bits: int, scale: float,
    kv_mask: Optional[torch.Tensor] = None, sink_score: Optional[torch.Tensor] = None,
    sink_value: Optional[torch.Tensor] = None, sink_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain torch: dequantize the whole cache with sqcompile.quant, rotate q, softmax attention.
    kv_mask [B, T] (nonzero = attend) further masks tokens below the length (padding, windows);
    sink_score / sink_value add the exact sink token (`sqcompile.kernels.sink.merge_sink_reference`)."""
    from sqcompile.quant import packing

    B, Hq, D = q.shape
    Hkv, T = k_packed.shape[1], k_packed.shape[2]
    G = Hq // Hkv
    kf = format_from_args(D, k_groups, k_codebooks, k_channel_scale, qjl_dims, qjl_bits)
    vf = format_from_args(D, v_groups, v_codebooks, v_channel_scale)
    kc, ks, ksign, knorm = packing.unpack(kf, k_packed)
    vc, vs, _, _ = packing.unpack(vf, v_packed)
    k = kf.decode(kc, ks, torch.empty(B, Hkv, T, D, device=q.device))  # [B, Hkv, T, D]
    v = vf.decode(vc, vs, torch.empty(B, Hkv, T, D, device=q.device))
    # q_store = q @ B_k^T; query head h*G + g reads kv-head h (HF repeat_kv order)
    q_store = torch.einsum("bhgd,hed->bhge", q.float().reshape(B, Hkv, G, D), k_basis.float())
    scores = torch.einsum("bhgd,bhtd->bhgt", q_store, k)
    if qjl_bits > 0:
        # <q, r> ~ sqrt(pi/2)/m * ||r|| * <S q_store[:dq], sign(S r)>, S per kv-head [Hkv, m, dq]
        sq = torch.einsum("bhgd,hmd->bhgm", q_store[..., :qjl_dims], qjl_per_head(k_qjl_proj, Hkv))
        signs = ksign.float() * 2 - 1
        corr = torch.einsum("bhgm,bhtm->bhgt", sq, signs) * knorm[:, :, None, :]
        scores = scores + corr * (QJL_CONST / qjl_bits)
    scores = scores * scale
    sink_score, sink_value, sink_pos = check_sink(q, sink_score, sink_value, sink_pos, Hkv)
    kv_mask = skip_mask(kv_mask, sink_pos, B, T, q.device)
    valid = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [B, T]
    if kv_mask is not None:
        valid = valid & (kv_mask.to(q.device).expand(B, T) != 0)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = merge_sink_reference(scores, v, sink_score, sink_value)  # stays in the value storage basis
    return out.reshape(B, Hq, D).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# the custom op
# ---------------------------------------------------------------------------------------------

@triton_op("sqcompile::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, lengths: torch.Tensor,
    k_basis: torch.Tensor, k_codebooks: torch.Tensor, k_channel_scale: torch.Tensor,
    v_codebooks: torch.Tensor, v_channel_scale: torch.Tensor, k_qjl_proj: Optional[torch.Tensor],
    k_groups: list[int], v_groups: list[int], qjl_dims: int, qjl_bits: int, scale: float,
    num_splits: int = 0, kv_mask: Optional[torch.Tensor] = None, sink_score: Optional[torch.Tensor] = None,
    sink_value: Optional[torch.Tensor] = None, sink_pos: Optional[torch.Tensor] = None, impl: str = "auto",
) -> torch.Tensor:
    """Decode attention for q [B, Hq, d] over the packed cache; returns [B, Hq, d] in the value
    storage basis. k_basis [Hkv, d, d] (rows = storage basis vectors), codebooks [groups, 256],
    channel scales [Hkv, d], k_qjl_proj [Hkv, m, qjl_dims] or [m, qjl_dims] or None, groups flattened
    (start, stop, bits, token_scale) quadruples, scale = the softmax scale, kv_mask [B|1, T] (nonzero = attend),
    sink_score [B, Hq] / sink_value [B, Hkv or Hq, d] / sink_pos [B]: an exact token in place of the packed one at
    sink_pos (`sqcompile.kernels.sink`: score in log2 units, without q . k_mean like the kernels' own; value in
    the storage basis; sink_pos -1: no packed copy to skip, a -inf score: no exact token). impl (the backend's
    `KernelPlan.decode`): "triton" the Triton kernels (CPU tensors: under TRITON_INTERPRET=1; "cuda" is the same:
    this layout has no CUDA kernel), "torch" `decode_attention_reference`, "auto" Triton on CUDA, else torch."""
    if not uses_triton(impl, q):
        return decode_attention_reference(q, k_packed, v_packed, lengths, k_basis, k_codebooks, k_channel_scale,
                                          v_codebooks, v_channel_scale, k_qjl_proj, k_groups, v_groups,
                                          qjl_dims, qjl_bits, scale, kv_mask=kv_mask, sink_score=sink_score,
                                          sink_value=sink_value, sink_pos=sink_pos)
    return decode_attention_triton(q, k_packed, v_packed, lengths, k_basis, k_codebooks, k_channel_scale,
                                   v_codebooks, v_channel_scale, k_qjl_proj, k_groups, v_groups, qjl_dims,
                                   qjl_bits, scale, num_splits=num_splits,
                                   _launch=wrap_triton if q.is_cuda else wrap_interpreted, kv_mask=kv_mask,
                                   sink_score=sink_score, sink_value=sink_value, sink_pos=sink_pos)
