"""Decode attention over the FAST packed cache (`sqcompile.quant.fast_layout`): flash-decoding, split-K.

    q          [B, Hq, d]                  fp16/bf16/fp32, unrotated (post-RoPE)
    k_packed   [B, Hkv, T, k_bytes] uint8  one row per (token, kv-head): packed codes per group, then
    v_packed   [B, Hkv, T, v_bytes] uint8  the fp16 token scales (fast_layout's module doc)
    lengths    [B] int32                   valid tokens per batch row (clamped to T)
    k_basis    [Hkv, d, d]                 rows = key storage basis vectors (q_store = q @ B_k^T)
    k_factor   [Hkv, d] float32            step_g (x channel_scale[h, j] for "channel" groups) per dim:
    v_factor   [Hkv, d] float32            `FastLayout.column_factor`
    out        [B, Hq, d]                  in the VALUE storage basis

Levels are uniform: x_hat_j = s_t * step * (c_j - off_g), off_g = (2^b - 1) / 2. So

    q . k_hat = s_t * (q' . c - off_g * sum(q'))     with q' = q_store * step (folded in the prologue)
    P @ V_hat = step * (sum_t p_t s_t c_t - off_g * sum_t p_t s_t)

Kernel 1 (`_fast_split_kernel`), one program per (batch, kv-head, split):
  * prologue: q_store = q @ B_k^T for the G = Hq / Hkv heads of the kv-head, one [G (padded to 16), n]
    slice per group, times k_factor, the softmax scale and log2(e); its fp16 copy is the dot operand.
  * loop over blocks of BLOCK_N tokens: each group's code bytes [BLOCK_N, n*b/8] are loaded once for all
    G heads and expanded without shifts: the value of coordinate j = E*i + e (E = 8/b codes per byte i)
    is  byte_i & (mask << b*e), read as an integer = 2^(b*e) * c_j, exact in fp16. The factor 2^(-b*e) is
    folded into q' (keys) or into the epilogue (values). MODE 2 (GPU) does this with inline PTX, 4 bytes
    per call: 2 PRMT ({byte, 0x64, byte', 0x64}: 1024 + byte in each fp16 lane), then per 2 elements one
    LOP3 (keep slot e and the 0x64 exponent) and one HSUB2 (- 1024); MODE 0/1 are plain Triton (CPU tests).
    Columns inside a group are SLOT-MAJOR (column e*NBP + i = coordinate E*i + e), so an mma operand
    register pair is slot e of two neighbouring bytes, as the PTX produces it; the prologue and the
    epilogue apply the permutation. One tl.dot per group for the scores (M = 16 rows, G used), one per
    group for P @ V; sum(p) and sum(P_s) are accumulated per token and reduced after the loop (LAZY).
  * writes the split's normalized partial output and its log2-sum-exp.

Measured (H100, BENCHMARKS.md, "Decode attention"): correct; 1.2-1.3x FP16 SDPA at 64K, 0.9-1.0x
at 4K, 2.4-4.2x faster than the bit-plane op at 64K; ~5.2 SASS instructions per K/V element (unpack 1.16).
Kernel 2 (`decode_attention._decode_reduce_kernel`, shared with the bit-plane op), one program per (batch, query
head): merges the splits, and the exact sink token where one is given (`sqcompile.kernels.sink`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from sqcompile.kernels import decode_attention_cuda as _cuda
from sqcompile.kernels import op_kernel
from sqcompile.kernels.decode_attention import launch_reduce, wrap_interpreted
from sqcompile.kernels.sink import check_sink, merge_sink_reference, skip_mask
from sqcompile.quant.fast_layout import FastLayout

LOG2E = 1.4426950408889634
MAX_GROUPS = 3
LAST_COMPILED: dict = {}


# ---------------------------------------------------------------------------------------------
# inline PTX: 4 code bytes -> 8 / b fp16 tensors (code e of each byte, times 2^(b*e)), 2 regs each
# ---------------------------------------------------------------------------------------------

def _make_asm(bits: int) -> str:
    """PTX for 4 bytes (one 32-bit register, input ${2E}) -> E = 8/bits outputs, 2 registers each:
    PRMT spreads bytes (0, 1) and (2, 3) into the low bytes of two fp16 lanes with 0x64 above them
    (= 1024 + byte as fp16); one AND keeps code slot e and the 0x64 exponent: 1024 + 2^(b e) c;
    HSUB2 removes the 1024 (exact). 2 PRMT + 2E (LOP3 + HADD2) per 4 bytes."""
    E = 8 // bits
    src = f"${2 * E}"
    lines = ["{", ".reg .b32 t0, t1, m, k;", "mov.b32 m, 0x00006400;", "mov.b32 k, 0x64006400;",
             f"prmt.b32 t0, {src}, m, 0x5150;",  # {b0, 0x64, b1, 0x64}
             f"prmt.b32 t1, {src}, m, 0x5352;"]  # {b2, 0x64, b3, 0x64}
    for e in range(E):
        mask = (((1 << bits) - 1) << (bits * e)) | 0x6400
        mask2 = mask | (mask << 16)
        for r, t in ((2 * e, "t0"), (2 * e + 1, "t1")):
            if mask2 == 0x64FF64FF:
                lines.append(f"sub.f16x2 ${r}, {t}, k;")
            else:
                lines.append(f"and.b32 ${r}, {t}, {mask2:#010x};")
                lines.append(f"sub.f16x2 ${r}, ${r}, k;")
    lines.append("}")
    return " ".join(lines)  # one line: Inductor copies this constant into generated Python source


_ASM1 = tl.constexpr(_make_asm(1))
_ASM2 = tl.constexpr(_make_asm(2))
_ASM4 = tl.constexpr(_make_asm(4))
_ASM8 = tl.constexpr(_make_asm(8))
_CON1 = tl.constexpr(",".join(["=r"] * 16) + ",r")
_CON2 = tl.constexpr(",".join(["=r"] * 8) + ",r")
_CON4 = tl.constexpr(",".join(["=r"] * 4) + ",r")
_CON8 = tl.constexpr(",".join(["=r"] * 2) + ",r")


@triton.jit
def _concat_slots(o0, o1, o2, o3, o4, o5, o6, o7, E: tl.constexpr, BLOCK_N: tl.constexpr, NBP: tl.constexpr):
    """E tensors [BLOCK_N, NBP] (o_e = code slot e of each byte) -> [BLOCK_N, E * NBP], column e*NBP + i
    ("slot-major": a register pair of the mma operand is slot e of two bytes, as the PTX produces it)."""
    if E == 1:
        out = o0
    elif E == 2:
        out = tl.reshape(tl.permute(tl.join(o0, o1), (0, 2, 1)), [BLOCK_N, NBP * 2])
    elif E == 4:
        out = tl.reshape(tl.permute(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (0, 2, 3, 1)), [BLOCK_N, NBP * 4])
    else:
        x = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
        out = tl.reshape(tl.permute(x, (0, 2, 3, 4, 1)), [BLOCK_N, NBP * 8])
    return out


@triton.jit
def _expand(byte, BITS: tl.constexpr, BLOCK_N: tl.constexpr, NBP: tl.constexpr, MODE: tl.constexpr):
    """uint8 [BLOCK_N, NBP] -> fp16 [BLOCK_N, NBP * E]: column e*NBP + i = byte_i & (mask << BITS*e)
    (= 2^(BITS e) x the code of coordinate E*i + e)."""
    E: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if MODE == 0:  # plain Triton, one 3-D expression (interpreter reference)
        sh = MASK << (BITS * tl.arange(0, E))
        x = byte.to(tl.int32)[:, :, None] & sh[None, None, :]
        out = tl.reshape(tl.permute(x.to(tl.float16), (0, 2, 1)), [BLOCK_N, NBP * E])
    elif MODE == 1:  # plain Triton per code slot + the join tree MODE 2 uses (tests the interleave)
        x = byte.to(tl.int32)
        o0 = (x & MASK).to(tl.float16)
        o1 = o0
        o2 = o0
        o3 = o0
        o4 = o0
        o5 = o0
        o6 = o0
        o7 = o0
        if E >= 2:
            o1 = (x & (MASK << BITS)).to(tl.float16)
        if E >= 4:
            o2 = (x & (MASK << (2 * BITS))).to(tl.float16)
            o3 = (x & (MASK << (3 * BITS))).to(tl.float16)
        if E >= 8:
            o4 = (x & (MASK << 4)).to(tl.float16)
            o5 = (x & (MASK << 5)).to(tl.float16)
            o6 = (x & (MASK << 6)).to(tl.float16)
            o7 = (x & (MASK << 7)).to(tl.float16)
        out = _concat_slots(o0, o1, o2, o3, o4, o5, o6, o7, E, BLOCK_N, NBP)
    else:  # MODE 2: inline PTX (GPU only)
        if BITS == 8:
            out = tl.inline_asm_elementwise(_ASM8, _CON8, [byte], dtype=(tl.float16,), is_pure=True, pack=4)[0]
        elif BITS == 4:
            o0, o1 = tl.inline_asm_elementwise(_ASM4, _CON4, [byte], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
            out = _concat_slots(o0, o1, o0, o0, o0, o0, o0, o0, E, BLOCK_N, NBP)
        elif BITS == 2:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(_ASM2, _CON2, [byte], dtype=(tl.float16,) * 4,
                                                       is_pure=True, pack=4)
            out = _concat_slots(o0, o1, o2, o3, o0, o0, o0, o0, E, BLOCK_N, NBP)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(_ASM1, _CON1, [byte],
                                                                       dtype=(tl.float16,) * 8,
                                                                       is_pure=True, pack=4)
            out = _concat_slots(o0, o1, o2, o3, o4, o5, o6, o7, E, BLOCK_N, NBP)
    return out


@triton.jit
def _load_codes(row_ptr, mask_n, CO: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, BITS: tl.constexpr,
                BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    c = tl.arange(0, NBP)
    if NB == NBP:
        m2 = mask_n[:, None]
    else:
        m2 = mask_n[:, None] & (c < NB)[None, :]
    byte = tl.load(row_ptr[:, None] + (CO + c)[None, :], mask=m2, other=0)
    return _expand(byte, BITS, BLOCK_N, NBP, MODE)


@triton.jit
def _load_scale(row_ptr, SO: tl.constexpr, mask_n):
    """fp16 token scale at byte SO of each row (rows are 2-byte aligned) -> float32 [BLOCK_N]."""
    p = (row_ptr + SO).to(tl.pointer_type(tl.float16))
    return tl.load(p, mask=mask_n, other=0.0).to(tl.float32)


@triton.jit
def _group_query(q_ptr, stride_qh, G: tl.constexpr, BG: tl.constexpr, basis_ptr, fac_ptr, qk_scale,
                 START: tl.constexpr, N: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, NP: tl.constexpr,
                 BITS: tl.constexpr,
                 D: tl.constexpr, DP: tl.constexpr, DCH: tl.constexpr, PREC: tl.constexpr):
    """-> (q' fp16 [BG, NP], sum_c q'_c 2^(b e_c) fp32 [BG]) for the group's dims [START, START + N), in
    the kernel's slot-major column order: column c = e*NBP + i is coordinate j = E*i + e, and
    q'_c = (q @ B^T)[:, START + j] * factor_j * qk_scale * 2^(-b e)."""
    E: tl.constexpr = 8 // BITS
    c = tl.arange(0, NP)
    g = tl.arange(0, BG)
    rm = (c % NBP) < NB
    r = E * (c % NBP) + c // NBP  # coordinate of column c
    acc = tl.zeros([BG, NP], dtype=tl.float32)
    for d0 in tl.static_range(0, DP, DCH):
        d = d0 + tl.arange(0, DCH)
        qc = tl.load(q_ptr + g[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None] & (d < D)[None, :],
                     other=0.0).to(tl.float32)
        bc = tl.load(basis_ptr + (START + r)[:, None] * D + d[None, :], mask=rm[:, None] & (d < D)[None, :],
                     other=0.0)
        acc += tl.dot(qc, tl.trans(bc), input_precision=PREC)
    fac = tl.load(fac_ptr + START + r, mask=rm, other=0.0) * qk_scale
    p2 = (1 << (BITS * (c // NBP))).to(tl.float32)
    q16 = (acc * (fac / p2)[None, :]).to(tl.float16)
    qsum = tl.sum(q16.to(tl.float32) * p2[None, :], 1)
    return q16, qsum


@triton.jit
def _group_scores(qg, qsum, row_ptr, mask_n, CO: tl.constexpr, SO: tl.constexpr, NB: tl.constexpr,
                  NBP: tl.constexpr, BITS: tl.constexpr, TOKEN: tl.constexpr, BLOCK_N: tl.constexpr,
                  MODE: tl.constexpr, TRANS_K: tl.constexpr):
    """[BG, BLOCK_N] fp32: s_t * (q' . x - off * sum q')."""
    OFF: tl.constexpr = ((1 << BITS) - 1) / 2
    kx = _load_codes(row_ptr, mask_n, CO, NB, NBP, BITS, BLOCK_N, MODE)
    if TRANS_K:  # scores^T = codes @ q'^T: the decoded codes are the register A operand
        s = tl.trans(tl.dot(kx, tl.trans(qg))) - OFF * qsum[:, None]
    else:
        s = tl.dot(qg, tl.trans(kx)) - OFF * qsum[:, None]
    if TOKEN:
        s = s * _load_scale(row_ptr, SO, mask_n)[None, :]
    return s


@triton.jit
def _group_pv(p, row_ptr, mask_n, CO: tl.constexpr, SO: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
              BITS: tl.constexpr, TOKEN: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    """([BG, NP] fp32 P_s @ x, [BG, BLOCK_N] fp32 P_s) with P_s = p * s_t rounded to fp16 (the caller
    accumulates P_s elementwise and sums it over tokens once, after the loop)."""
    vx = _load_codes(row_ptr, mask_n, CO, NB, NBP, BITS, BLOCK_N, MODE)
    if TOKEN:
        p = p * _load_scale(row_ptr, SO, mask_n)[None, :]
    p16 = p.to(tl.float16)
    return tl.dot(p16, vx), p16.to(tl.float32)


@triton.jit
def _lazy_sum(x, LAZY: tl.constexpr):
    if LAZY:
        out = x
    else:
        out = tl.sum(x, 1, keep_dims=True)
    return out


@triton.jit
def _store_group_out(o_ptr, acc, sps, inv_l, fac_ptr, START: tl.constexpr, N: tl.constexpr, NB: tl.constexpr,
                     NBP: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr, BG: tl.constexpr, G: tl.constexpr,
                     stride_row):
    """out_j = factor_j * (acc_c * 2^(-b e) - off * sum P_s) / l, column c = e*NBP + i -> j = E*i + e."""
    c = tl.arange(0, NP)
    g = tl.arange(0, BG)
    if BITS == 0:
        m = (g < G)[:, None] & (c < N)[None, :]
        tl.store(o_ptr + g[:, None] * stride_row + (START + c)[None, :], tl.zeros([BG, NP], tl.float32), mask=m)
    else:
        E: tl.constexpr = 8 // BITS
        OFF: tl.constexpr = ((1 << BITS) - 1) / 2
        j = E * (c % NBP) + c // NBP
        cm = (c % NBP) < NB
        m = (g < G)[:, None] & cm[None, :]
        p2 = (1 << (BITS * (c // NBP))).to(tl.float32)
        fac = tl.load(fac_ptr + START + j, mask=cm, other=0.0)
        o = (acc / p2[None, :] - OFF * sps[:, None]) * fac[None, :] * inv_l[:, None]
        tl.store(o_ptr + g[:, None] * stride_row + (START + j)[None, :], o, mask=m)


# ---------------------------------------------------------------------------------------------
# Kernel 1: one program per (batch, kv-head, split)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fast_split_kernel(
    Q, KP, VP, LEN, KBASIS, KFAC, VFAC, OP, LSE, KVM,
    qk_scale, max_tokens,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb,
    HAS_MASK: tl.constexpr,  # KVM [B, max_tokens] uint8: 0 = this token is masked out (padding, window)
    HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    K_BYTES: tl.constexpr, V_BYTES: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    KNG: tl.constexpr,
    K0S: tl.constexpr, K0N: tl.constexpr, K0B: tl.constexpr, K0T: tl.constexpr, K0CO: tl.constexpr, K0SO: tl.constexpr, K0NB: tl.constexpr, K0NBP: tl.constexpr, K0NP: tl.constexpr,
    K1S: tl.constexpr, K1N: tl.constexpr, K1B: tl.constexpr, K1T: tl.constexpr, K1CO: tl.constexpr, K1SO: tl.constexpr, K1NB: tl.constexpr, K1NBP: tl.constexpr, K1NP: tl.constexpr,
    K2S: tl.constexpr, K2N: tl.constexpr, K2B: tl.constexpr, K2T: tl.constexpr, K2CO: tl.constexpr, K2SO: tl.constexpr, K2NB: tl.constexpr, K2NBP: tl.constexpr, K2NP: tl.constexpr,
    VNG: tl.constexpr,
    V0S: tl.constexpr, V0N: tl.constexpr, V0B: tl.constexpr, V0T: tl.constexpr, V0CO: tl.constexpr, V0SO: tl.constexpr, V0NB: tl.constexpr, V0NBP: tl.constexpr, V0NP: tl.constexpr,
    V1S: tl.constexpr, V1N: tl.constexpr, V1B: tl.constexpr, V1T: tl.constexpr, V1CO: tl.constexpr, V1SO: tl.constexpr, V1NB: tl.constexpr, V1NBP: tl.constexpr, V1NP: tl.constexpr,
    V2S: tl.constexpr, V2N: tl.constexpr, V2B: tl.constexpr, V2T: tl.constexpr, V2CO: tl.constexpr, V2SO: tl.constexpr, V2NB: tl.constexpr, V2NBP: tl.constexpr, V2NP: tl.constexpr,
    MODE: tl.constexpr, DCH: tl.constexpr, PREC: tl.constexpr, TRANS_K: tl.constexpr = 0,
    LAZY: tl.constexpr = 1,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV

    length = tl.minimum(tl.load(LEN + b).to(tl.int32), max_tokens)
    chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)

    # ---- prologue: rotated, pre-scaled queries of the G heads sharing kv-head h, per key group
    g = tl.arange(0, BG)
    q_ptr = Q + b * stride_qb + (h * G) * stride_qh
    basis = KBASIS + h * D * D
    kfac = KFAC + h * D
    vfac = VFAC + h * D
    q0 = tl.zeros([BG, K0NP], dtype=tl.float16)
    qs0 = tl.zeros([BG], dtype=tl.float32)
    q1, qs1 = q0, qs0
    q2, qs2 = q0, qs0
    if K0B > 0:
        q0, qs0 = _group_query(q_ptr, stride_qh, G, BG, basis, kfac, qk_scale, K0S, K0N, K0NB, K0NBP, K0NP, K0B, D, DP, DCH, PREC)
    if KNG > 1:
        if K1B > 0:
            q1, qs1 = _group_query(q_ptr, stride_qh, G, BG, basis, kfac, qk_scale, K1S, K1N, K1NB, K1NBP, K1NP, K1B, D, DP, DCH, PREC)
    if KNG > 2:
        if K2B > 0:
            q2, qs2 = _group_query(q_ptr, stride_qh, G, BG, basis, kfac, qk_scale, K2S, K2N, K2NB, K2NBP, K2NP, K2B, D, DP, DCH, PREC)

    m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
    # LAZY: per-token partial sums of p and P_s, reduced once after the loop (no per-block cross-warp sums,
    # but [BG, BLOCK_N] registers each); else [BG] sums reduced every block
    SW: tl.constexpr = BLOCK_N if LAZY else 1
    l_i = tl.zeros([BG, SW], dtype=tl.float32)
    acc0 = tl.zeros([BG, V0NP], dtype=tl.float32)
    acc1 = tl.zeros([BG, V1NP], dtype=tl.float32)
    acc2 = tl.zeros([BG, V2NP], dtype=tl.float32)
    sp0 = tl.zeros([BG, SW], dtype=tl.float32)
    sp1 = tl.zeros([BG, SW], dtype=tl.float32)
    sp2 = tl.zeros([BG, SW], dtype=tl.float32)

    k_base = KP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = VP + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mask_n = offs < hi
        if HAS_MASK:  # masked tokens are not even loaded (codes and scales read as 0: p = 0 stays exact)
            keep = tl.load(KVM + b.to(tl.int64) * stride_mb + offs, mask=mask_n, other=0)
            mask_n = mask_n & (keep != 0)
        krow = k_base + offs * K_BYTES
        vrow = v_base + offs * V_BYTES

        s = tl.zeros([BG, BLOCK_N], dtype=tl.float32)
        if K0B > 0:
            s += _group_scores(q0, qs0, krow, mask_n, K0CO, K0SO, K0NB, K0NBP, K0B, K0T, BLOCK_N, MODE, TRANS_K)
        if KNG > 1:
            if K1B > 0:
                s += _group_scores(q1, qs1, krow, mask_n, K1CO, K1SO, K1NB, K1NBP, K1B, K1T, BLOCK_N, MODE, TRANS_K)
        if KNG > 2:
            if K2B > 0:
                s += _group_scores(q2, qs2, krow, mask_n, K2CO, K2SO, K2NB, K2NBP, K2B, K2T, BLOCK_N, MODE, TRANS_K)

        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_MASK:  # a fully masked block before any valid token: m stays -inf, alpha = p = 0 (no NaN)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every block has a valid token (start < hi): m_new is finite
            m_safe = m_new
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha[:, None] + _lazy_sum(p, LAZY)
        m_i = m_new

        if V0B > 0:
            pv, sp = _group_pv(p, vrow, mask_n, V0CO, V0SO, V0NB, V0NBP, V0B, V0T, BLOCK_N, MODE)
            acc0 = acc0 * alpha[:, None] + pv
            sp0 = sp0 * alpha[:, None] + _lazy_sum(sp, LAZY)
        if VNG > 1:
            if V1B > 0:
                pv, sp = _group_pv(p, vrow, mask_n, V1CO, V1SO, V1NB, V1NBP, V1B, V1T, BLOCK_N, MODE)
                acc1 = acc1 * alpha[:, None] + pv
                sp1 = sp1 * alpha[:, None] + _lazy_sum(sp, LAZY)
        if VNG > 2:
            if V2B > 0:
                pv, sp = _group_pv(p, vrow, mask_n, V2CO, V2SO, V2NB, V2NBP, V2B, V2T, BLOCK_N, MODE)
                acc2 = acc2 * alpha[:, None] + pv
                sp2 = sp2 * alpha[:, None] + _lazy_sum(sp, LAZY)

    # ---- epilogue: normalized partial output and log2-sum-exp of this split
    l_i = tl.sum(l_i, 1)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    inv_l = tl.where(l_i > 0, 1.0 / l_safe, 0.0)
    row = (pid_bh * G + g) * NSPLIT + split
    o_ptr = OP + ((pid_bh * G) * NSPLIT + split) * D
    _store_group_out(o_ptr, acc0, tl.sum(sp0, 1), inv_l, vfac, V0S, V0N, V0NB, V0NBP, V0NP, V0B, BG, G, NSPLIT * D)
    if VNG > 1:
        _store_group_out(o_ptr, acc1, tl.sum(sp1, 1), inv_l, vfac, V1S, V1N, V1NB, V1NBP, V1NP, V1B, BG, G, NSPLIT * D)
    if VNG > 2:
        _store_group_out(o_ptr, acc2, tl.sum(sp2, 1), inv_l, vfac, V2S, V2N, V2NB, V2NBP, V2NP, V2B, BG, G, NSPLIT * D)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(LSE + row, lse, mask=g < G)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def group_constexprs(layout: FastLayout, prefix: str) -> dict:
    if not 1 <= len(layout.groups) <= MAX_GROUPS:
        raise ValueError(f"the fast kernel supports 1..{MAX_GROUPS} groups per tensor, got {len(layout.groups)}")
    out = {f"{prefix}NG": len(layout.groups)}
    cos, sos = layout.code_offsets(), layout.scale_offsets()
    for i in range(MAX_GROUPS):
        if i < len(layout.groups):
            gr = layout.groups[i]
            nb = max(gr.code_bytes, 1)
            npad = _pow2(nb) * (8 // gr.bits) if gr.bits else _pow2(gr.n)
            vals = (gr.start, gr.n, gr.bits, int(gr.stores_scale), cos[i], max(sos[i], 0), nb, _pow2(nb), npad)
        else:
            vals = (0, 1, 0, 0, 0, 0, 1, 16, 16)
        for name, v in zip(("S", "N", "B", "T", "CO", "SO", "NB", "NBP", "NP"), vals):
            out[f"{prefix}{i}{name}"] = v
    return out


def default_num_splits(batch: int, kv_heads: int, max_tokens: int, block_n: int, device: torch.device,
                       per_sm: int = 8) -> int:
    """~per_sm (batch, kv-head, split) programs per multiprocessor, each split >= 2 blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(per_sm * sms, batch * kv_heads)
    return int(max(1, min(want, triton.cdiv(max_tokens, 2 * block_n), 128)))


def _interpreted(kernel):
    if type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    return kernel


def _check(q, k_packed, v_packed, kl: FastLayout, vl: FastLayout):
    B, Hq, D = q.shape
    if k_packed.dim() != 4 or v_packed.dim() != 4:
        raise ValueError("k_packed/v_packed must be [B, kv_heads, max_tokens, bytes]")
    if k_packed.shape[:3] != v_packed.shape[:3] or k_packed.shape[0] != B:
        raise ValueError(f"cache shapes {tuple(k_packed.shape)} / {tuple(v_packed.shape)} do not match q {tuple(q.shape)}")
    if Hq % k_packed.shape[1]:
        raise ValueError(f"query heads {Hq} not a multiple of kv-heads {k_packed.shape[1]}")
    if k_packed.shape[-1] != kl.bytes_per_token() or v_packed.shape[-1] != vl.bytes_per_token():
        raise ValueError(f"row bytes {k_packed.shape[-1]}/{v_packed.shape[-1]} != layout's "
                         f"{kl.bytes_per_token()}/{vl.bytes_per_token()}")
    if kl.head_dim != D or vl.head_dim != D:
        raise ValueError(f"layouts are for head_dim {kl.head_dim}/{vl.head_dim}, q has {D}")
    for lay in (kl, vl):
        if any(so >= 0 and so % 2 for so in lay.scale_offsets()) or lay.bytes_per_token() % 2:
            raise ValueError("fp16 token scales must be 2-byte aligned (even code bytes and row bytes)")


def decode_attention_fast_triton(
    q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, lengths: torch.Tensor,
    k_basis: torch.Tensor, k_factor: torch.Tensor, v_factor: torch.Tensor,
    k_groups: list[int], v_groups: list[int], scale: float,
    num_splits: int = 0, block_n: int = 128, poison: bool = False, _launch=None, kv_mask: Optional[torch.Tensor] = None,
    sink_score: Optional[torch.Tensor] = None, sink_value: Optional[torch.Tensor] = None, sink_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch split + reduce with the fastest variant measured on an H100 (benchmarks/decode_attention_fast.py
    --tune): 128-token blocks (`block_n`), 4 warps, no software pipelining; ~4 programs per SM below 32K cache
    tokens, ~8 from 32K on (num_splits=0 picks); the inline-PTX unpack on CUDA, plain Triton in the interpreter.
    The other variants the tuner measures (warps, stages, registers, unpack mode, transposed scores, eager sums)
    are `sqcompile.prototype.decode_attention_variants`. poison=True fills every buffer with NaN first (tests).
    kv_mask [B, T] or [1, T] (bool/int, nonzero = attend; T = cache capacity) further masks tokens below
    the length (padding, sliding windows); sink_score / sink_value: the exact sink token, merged in the reduce
    (`sqcompile::decode_attention_fast`)."""
    return launch_fast(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups, v_groups, scale,
                       num_splits=num_splits, block_n=block_n, poison=poison, _launch=_launch, kv_mask=kv_mask,
                       sink_score=sink_score, sink_value=sink_value, sink_pos=sink_pos)


def launch_fast(
    q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, lengths: torch.Tensor,
    k_basis: torch.Tensor, k_factor: torch.Tensor, v_factor: torch.Tensor,
    k_groups: list[int], v_groups: list[int], scale: float,
    num_splits: int = 0, block_n: int = 128, num_warps: int = 4, num_stages: int = 1,
    maxnreg: Optional[int] = None, mode: Optional[int] = None, per_sm: int = 0, trans_k: int = 0, lazy: int = 1,
    poison: bool = False, _launch=None, kv_mask: Optional[torch.Tensor] = None,
    sink_score: Optional[torch.Tensor] = None, sink_value: Optional[torch.Tensor] = None, sink_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`decode_attention_fast_triton` with every launch knob (`sqcompile.prototype.decode_attention_variants`
    documents them); the defaults are the production variant."""
    B, Hq, D = q.shape
    Hkv, T = k_packed.shape[1], k_packed.shape[2]
    kl = FastLayout.from_flat(D, k_groups, [1.0] * (len(k_groups) // 4))
    vl = FastLayout.from_flat(D, v_groups, [1.0] * (len(v_groups) // 4))
    _check(q, k_packed, v_packed, kl, vl)
    sink_score, sink_value, sink_pos = check_sink(q, sink_score, sink_value, sink_pos, Hkv)
    kv_mask = skip_mask(kv_mask, sink_pos, B, T, q.device)
    G = Hq // Hkv
    if mode is None:
        mode = 2 if q.is_cuda else 0
    if per_sm <= 0:
        per_sm = 4 if T < 32768 else 8
    nsplit = int(num_splits) if num_splits > 0 else default_num_splits(B, Hkv, T, block_n, q.device, per_sm)
    launch = _launch or (lambda k: k if q.is_cuda else _interpreted(k))
    kb, vb = kl.bytes_per_token(), vl.bytes_per_token()
    if k_packed.stride(-1) != 1 or k_packed.stride(-2) != kb:
        k_packed = k_packed.contiguous()
    if v_packed.stride(-1) != 1 or v_packed.stride(-2) != vb:
        v_packed = v_packed.contiguous()
    q = q.contiguous() if q.stride(-1) != 1 else q
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    k_basis, k_factor, v_factor = f32(k_basis), f32(k_factor), f32(v_factor)

    op = torch.empty(B, Hq, nsplit, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, nsplit, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    if poison:
        op.fill_(float("nan")), lse.fill_(float("nan")), out.fill_(float("nan"))
    extra = {"maxnreg": maxnreg} if (maxnreg and q.is_cuda) else {}
    if kv_mask is not None:
        kv_mask = kv_mask.to(torch.uint8).expand(B, T).contiguous()
    mask_arg = kv_mask if kv_mask is not None else lengths
    ck = launch(_fast_split_kernel)[(B * Hkv, nsplit)](
        q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, op, lse, mask_arg, float(scale) * LOG2E, T,
        q.stride(0), q.stride(1), k_packed.stride(0), k_packed.stride(1), v_packed.stride(0), v_packed.stride(1),
        kv_mask.stride(0) if kv_mask is not None else 0, HAS_MASK=kv_mask is not None,
        HKV=Hkv, G=G, BG=_pow2(G), D=D, DP=_pow2(D), K_BYTES=kb, V_BYTES=vb, NSPLIT=nsplit, BLOCK_N=block_n,
        **group_constexprs(kl, "K"), **group_constexprs(vl, "V"), MODE=mode, DCH=min(32, _pow2(D)),
        PREC="tf32x3" if q.is_cuda else "ieee", TRANS_K=int(trans_k), LAZY=int(lazy),
        num_warps=num_warps, num_stages=num_stages, **extra,
    )
    if hasattr(ck, "n_regs"):
        LAST_COMPILED["fast_split"] = ck
    launch_reduce(launch, op, lse, out, sink_score, sink_value)
    return out


def decode_attention_fast_reference(
    q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, lengths: torch.Tensor,
    k_basis: torch.Tensor, k_factor: torch.Tensor, v_factor: torch.Tensor,
    k_groups: list[int], v_groups: list[int], scale: float, kv_mask: Optional[torch.Tensor] = None,
    sink_score: Optional[torch.Tensor] = None, sink_value: Optional[torch.Tensor] = None, sink_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain torch: unpack codes with FastLayout, dequantize (factor = step [x channel scale]), softmax.
    kv_mask [B, T] (nonzero = attend) further masks tokens below the length (padding, windows);
    sink_score / sink_value add the exact sink token (`sqcompile.kernels.sink.merge_sink_reference`)."""
    B, Hq, D = q.shape
    Hkv, T = k_packed.shape[1], k_packed.shape[2]
    G = Hq // Hkv
    kl = FastLayout.from_flat(D, k_groups, [1.0] * (len(k_groups) // 4))
    vl = FastLayout.from_flat(D, v_groups, [1.0] * (len(v_groups) // 4))

    def deq(lay: FastLayout, packed, fac):
        codes, scales = lay.unpack(packed)
        parts = []
        for gr, c, s in zip(lay.groups, codes, scales):
            if gr.bits == 0:
                parts.append(torch.zeros(B, Hkv, T, gr.n, device=q.device))
                continue
            x = (c.float() - gr.offset) * fac.float()[None, :, None, gr.start:gr.stop]
            parts.append(x * s[..., None] if gr.stores_scale else x)
        return torch.cat(parts, -1)

    k = deq(kl, k_packed, k_factor)
    v = deq(vl, v_packed, v_factor)
    q_store = torch.einsum("bhgd,hed->bhge", q.float().reshape(B, Hkv, G, D), k_basis.float())
    scores = torch.einsum("bhgd,bhtd->bhgt", q_store, k) * scale
    sink_score, sink_value, sink_pos = check_sink(q, sink_score, sink_value, sink_pos, Hkv)
    kv_mask = skip_mask(kv_mask, sink_pos, B, T, q.device)
    valid = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    if kv_mask is not None:
        valid = valid & (kv_mask.to(q.device).expand(B, T) != 0)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = merge_sink_reference(scores, v, sink_score, sink_value)
    return out.reshape(B, Hq, D).to(q.dtype)


@triton_op("sqcompile::decode_attention_fast", mutates_args=())
def decode_attention_fast(
    q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, lengths: torch.Tensor,
    k_basis: torch.Tensor, k_factor: torch.Tensor, v_factor: torch.Tensor,
    k_groups: list[int], v_groups: list[int], scale: float, num_splits: int = 0,
    kv_mask: Optional[torch.Tensor] = None, sink_score: Optional[torch.Tensor] = None,
    sink_value: Optional[torch.Tensor] = None, sink_pos: Optional[torch.Tensor] = None, impl: str = "auto",
) -> torch.Tensor:
    """Decode attention for q [B, Hq, d] over the fast packed cache; [B, Hq, d] in the value storage
    basis. k_groups / v_groups: (start, stop, bits, token) quadruples flattened
    (`FastLayout.flat_groups`); k_factor / v_factor [Hkv, d] float32 = `FastLayout.column_factor`
    (step x channel scale); scale = the softmax scale; kv_mask [B, T] or [1, T] or None (nonzero = attend)
    further masks tokens below the length; sink_score [B, Hq] / sink_value [B, Hkv, d] / sink_pos [B]: an exact
    token in place of the packed one at sink_pos (as in `sqcompile::decode_attention`). impl (the backend's
    `KernelPlan.decode`): "cuda" the hand-written CUDA kernel (`sqcompile.kernels.decode_attention_cuda`, 3-4x
    faster) where it supports the layout, else the Triton kernels; "triton" the Triton kernels (CPU tensors: under
    TRITON_INTERPRET=1); "torch" `decode_attention_fast_reference`; "auto" = "cuda" on CUDA, else "torch"."""
    impl = op_kernel(impl, q)
    if impl == "torch":
        return decode_attention_fast_reference(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor,
                                               k_groups, v_groups, scale, kv_mask=kv_mask,
                                               sink_score=sink_score, sink_value=sink_value, sink_pos=sink_pos)
    if impl == "cuda" and q.is_cuda and num_splits == 0 and _cuda.available(q, k_packed, k_groups, v_groups) is None:
        return torch.ops.sqcompile.decode_attention_fast_cuda(q, k_packed, v_packed, lengths, k_basis, k_factor,
                                                              v_factor, k_groups, v_groups, scale, kv_mask,
                                                              sink_score, sink_value, sink_pos)
    return decode_attention_fast_triton(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups,
                                        v_groups, scale, num_splits=num_splits,
                                        _launch=wrap_triton if q.is_cuda else wrap_interpreted,
                                        kv_mask=kv_mask, sink_score=sink_score, sink_value=sink_value, sink_pos=sink_pos)


# ---------------------------------------------------------------------------------------------
# one decode step's cache write and attention as one op
# ---------------------------------------------------------------------------------------------

_LIB = torch.library.Library("sqcompile", "FRAGMENT")  # noqa: TOR901  (defines into the shared namespace)
_LIB.define(
    "decode_attention_fast_write(Tensor q, Tensor(a!) k_packed, Tensor(b!) v_packed, Tensor lengths, "
    "Tensor k_basis, Tensor k_factor, Tensor v_factor, int[] k_groups, int[] v_groups, float scale, Tensor key, "
    "Tensor v_store, Tensor positions, Tensor k_mean, str k_layout, str v_layout, Tensor? kv_mask=None, "
    "Tensor? sink_score=None, Tensor? sink_value=None, Tensor? sink_pos=None, str impl=\"auto\", "
    "str write_impl=\"auto\") -> Tensor")


def decode_attention_fast_write(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups, v_groups,
                                scale, key, v_store, positions, k_mean, k_layout, v_layout, kv_mask=None, sink_score=None,
                                sink_value=None, sink_pos=None, impl="auto", write_impl="auto"):
    """`sqcompile::quantize_write_fast(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout,
    v_layout)` and then `sqcompile::decode_attention_fast(q, k_packed, v_packed, lengths, ...)`: what the
    substitution pass puts in a decode step's graph when nothing else reads the packed cache in between. On
    CUDA, where the CUDA decode kernel runs and the write is one token per sequence, the write happens inside
    the kernel's first launch (the query transform, which reads the same key basis), so a decode step pays no
    launch of its own for it; elsewhere the two ops run one after the other. impl: the attention's (as
    `decode_attention_fast`'s), write_impl: the separate write's (as `quantize_write_fast`'s)."""
    if q.is_cuda and op_kernel(impl, q) == "cuda" and _cuda.available(q, k_packed, k_groups, v_groups) is None:
        if _write_fusable(q.shape[-1], k_layout, v_layout, tuple(key.shape)):
            return torch.ops.sqcompile.decode_attention_fast_cuda_write(
                q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups, v_groups, scale, key,
                v_store, positions, k_mean, k_layout, v_layout, kv_mask, sink_score, sink_value, sink_pos)
    torch.ops.sqcompile.quantize_write_fast(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout,
                                            v_layout, impl=write_impl)
    return torch.ops.sqcompile.decode_attention_fast(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor,
                                                     k_groups, v_groups, scale, kv_mask=kv_mask,
                                                     sink_score=sink_score, sink_value=sink_value, sink_pos=sink_pos,
                                                     impl=impl)


@functools.lru_cache(maxsize=256)
def _write_fusable(head_dim: int, k_layout: str, v_layout: str, key_shape: tuple) -> bool:
    """Whether the CUDA kernel can store the new token in its query launch (parsed once per layout and shape)."""
    kl, vl = (FastLayout.from_spec(head_dim, sp) for sp in (k_layout, v_layout))
    return _cuda.write_supported(kl, vl, head_dim, key_shape) is None


_LIB.impl("decode_attention_fast_write", decode_attention_fast_write, "CompositeExplicitAutograd")


@torch.library.register_fake("sqcompile::decode_attention_fast_write")
def _(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups, v_groups, scale, key, v_store,
      positions, k_mean, k_layout, v_layout, kv_mask=None, sink_score=None, sink_value=None, sink_pos=None,
      impl="auto", write_impl="auto"):
    return torch.empty_like(q)
