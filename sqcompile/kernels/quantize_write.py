"""Quantize new K/V tokens and write them, packed, into the SpectralQuant cache (one launch a layer).

Memory layout: k_new/v_new [B, Hkv, T_new, d] (keys post-RoPE and unrotated; values already in
the value storage basis); k_packed/v_packed [B, Hkv, max_tokens, row_bytes] uint8 (see
`_bitplanes.py` for a row's bytes); positions [T_new] (shared by the batch, HF's cache_position)
or [B, T_new] int64.

`_quantize_write_kernel`, grid (B * Hkv, cdiv(T_new, BLOCK_T), 2): axis 2 picks K (0) or V (1), so
one launch writes both. For each group: x_g = (k - mu) @ B_k[start:stop]^T (keys: the online
rotation, one tl.dot per group) or the value columns as they are; token scale s = rms(x_g) rounded to
fp16 (or the channel scale); code = nearest codebook level found by a BITS-step binary search over
the midpoints (the reference's `torch.bucketize`); bit-planes packed 8 codes to a byte in
registers. QJL (keys): r = x - dequant(x) on the first qjl_dims storage dims, signs of S r, ||r||.

The torch reference (`quantize_write_reference`) runs `sqcompile.quant`'s encode/pack and is the
op's implementation on devices other than CUDA.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._bitplanes import CODEBOOK_STRIDE, PackedLayout, format_from_args
from . import uses_triton
from .decode_attention import LAST_COMPILED, _interpreted, _pow2, group_constexprs, qjl_per_head, wrap_interpreted

FP16_MAX = 65504.0


@triton.jit
def _store_fp16(row_ptr, OFF: tl.constexpr, x, mask):
    """Store float32 x [rows] as little-endian fp16 at byte OFF of each row."""
    u = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(row_ptr + OFF, (u & 0xFF).to(tl.uint8), mask=mask)
    tl.store(row_ptr + (OFF + 1), ((u >> 8) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _store_bits(row_ptr, mask_t, bits, OFF: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """bits [BLOCK_T, NP] in {0, 1} -> ceil(N/8) bytes at OFF (coordinate j at byte j//8, bit j%8)."""
    NB: tl.constexpr = (N + 7) // 8
    NBP: tl.constexpr = NP // 8
    w = (1 << tl.arange(0, 8))[None, None, :]
    byte = tl.sum(tl.reshape(bits, [BLOCK_T, NBP, 8]) * w, 2)
    c = tl.arange(0, NBP)
    tl.store(row_ptr[:, None] + (OFF + c)[None, :], byte.to(tl.uint8),
             mask=mask_t[:, None] & (c < NB)[None, :])


@triton.jit
def _quantize_group(xg, row_ptr, mask_t, cb_ptr, cs_ptr, START: tl.constexpr, N: tl.constexpr,
                    NP: tl.constexpr, BITS: tl.constexpr, TOKEN: tl.constexpr, PLANE_OFF: tl.constexpr,
                    SCALE_OFF: tl.constexpr, BLOCK_T: tl.constexpr):
    """Quantize x_g [BLOCK_T, NP] fp32 (columns >= N zero), store planes (+ scale); return dequant."""
    j = tl.arange(0, NP)
    jm = (j < N)[None, :]
    xg = tl.where(jm, xg, 0.0)
    if TOKEN:
        s = tl.sqrt(tl.sum(xg * xg, 1) / N)
        s = tl.minimum(s, FP16_MAX_).to(tl.float16).to(tl.float32)
        _store_fp16(row_ptr, SCALE_OFF, s, mask_t)
        y = xg / tl.where(s > 0, s, 1.0)[:, None]
        scale = s[:, None]
    else:
        cs = tl.load(cs_ptr + START + j, mask=j < N, other=1.0)[None, :]
        y = xg / cs
        scale = cs
    # code = number of midpoints 0.5 * (cb[c-1] + cb[c]) strictly below y (torch.bucketize's rule)
    code = tl.zeros([BLOCK_T, NP], dtype=tl.int32)
    if BITS <= 4:  # count against scalar midpoints: no per-element loads
        for c in tl.static_range(1, 1 << BITS):
            mid = 0.5 * (tl.load(cb_ptr + c) + tl.load(cb_ptr + (c - 1)))
            code += (y > mid).to(tl.int32)
    else:  # binary search, BITS gathers per element
        for step in tl.static_range(BITS):
            cand = code + (1 << (BITS - 1 - step))
            mid = 0.5 * (tl.load(cb_ptr + cand) + tl.load(cb_ptr + cand - 1))
            code = tl.where(y > mid, cand, code)
    code = tl.where(jm, code, 0)
    NB: tl.constexpr = (N + 7) // 8
    for p in tl.static_range(BITS):
        _store_bits(row_ptr, mask_t, (code >> p) & 1, PLANE_OFF + p * NB, N, NP, BLOCK_T)
    return tl.where(jm, tl.load(cb_ptr + code) * scale, 0.0)


@triton.jit
def _qjl_group(xg, deq, s_ptr, START: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
               QJL_D: tl.constexpr, QJL_M: tl.constexpr, QJL_MP: tl.constexpr):
    """This group's share of S r and ||r||^2 (r = x - dequant on storage dims < QJL_D)."""
    j = tl.arange(0, NP)
    cols = START + j
    keep = (j < N) & (cols < QJL_D)
    r = tl.where(keep[None, :], xg - deq, 0.0)
    mi = tl.arange(0, QJL_MP)
    s = tl.load(s_ptr + mi[None, :] * QJL_D + cols[:, None], mask=keep[:, None] & (mi < QJL_M)[None, :], other=0.0)
    return tl.dot(r, s, input_precision="ieee"), tl.sum(r * r, 1)


@triton.jit
def _load_x(base, t, mask_t, stride_t, START: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    j = tl.arange(0, NP)
    return tl.load(base + t[:, None] * stride_t + (START + j)[None, :], mask=mask_t[:, None] & (j < N)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _rotate_keys(k_ptr, t, in_t, stride_t, mu_ptr, basis_ptr, START: tl.constexpr, N: tl.constexpr,
                 NP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DCH: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """(k - mu) @ B[START:START+N]^T -> [BLOCK_T, NP] fp32, walking d in chunks of DCH (no d x d tile
    in registers; the key chunks are re-read from L1/L2)."""
    r = tl.arange(0, NP)
    acc = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    for d0 in tl.static_range(0, DP, DCH):
        d = d0 + tl.arange(0, DCH)
        dm = d < D
        kc = tl.load(k_ptr + t[:, None] * stride_t + d[None, :], mask=in_t[:, None] & dm[None, :], other=0.0)
        kc = tl.where(dm[None, :], kc.to(tl.float32) - tl.load(mu_ptr + d, mask=dm, other=0.0)[None, :], 0.0)
        bc = tl.load(basis_ptr + (START + r)[:, None] * D + d[None, :], mask=(r < N)[:, None] & dm[None, :],
                     other=0.0)
        acc += tl.dot(kc, tl.trans(bc), input_precision="ieee")
    return acc


@triton.jit
def _quantize_write_kernel(
    KN, VN, KP, VP, POS, KBASIS, KMEAN, KCS, VCS, KCB, VCB, QJLS,
    T, MAX_T,
    stride_knb, stride_knh, stride_knt, stride_vnb, stride_vnh, stride_vnt,
    stride_kpb, stride_kph, stride_vpb, stride_vph, stride_posb,
    HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, K_BYTES: tl.constexpr, V_BYTES: tl.constexpr,
    BLOCK_T: tl.constexpr, DCH: tl.constexpr,
    KNG: tl.constexpr,
    K0S: tl.constexpr, K0N: tl.constexpr, K0NP: tl.constexpr, K0B: tl.constexpr, K0T: tl.constexpr, K0PO: tl.constexpr, K0SO: tl.constexpr,
    K1S: tl.constexpr, K1N: tl.constexpr, K1NP: tl.constexpr, K1B: tl.constexpr, K1T: tl.constexpr, K1PO: tl.constexpr, K1SO: tl.constexpr,
    K2S: tl.constexpr, K2N: tl.constexpr, K2NP: tl.constexpr, K2B: tl.constexpr, K2T: tl.constexpr, K2PO: tl.constexpr, K2SO: tl.constexpr,
    VNG: tl.constexpr,
    V0S: tl.constexpr, V0N: tl.constexpr, V0NP: tl.constexpr, V0B: tl.constexpr, V0T: tl.constexpr, V0PO: tl.constexpr, V0SO: tl.constexpr,
    V1S: tl.constexpr, V1N: tl.constexpr, V1NP: tl.constexpr, V1B: tl.constexpr, V1T: tl.constexpr, V1PO: tl.constexpr, V1SO: tl.constexpr,
    V2S: tl.constexpr, V2N: tl.constexpr, V2NP: tl.constexpr, V2B: tl.constexpr, V2T: tl.constexpr, V2PO: tl.constexpr, V2SO: tl.constexpr,
    QJL_D: tl.constexpr, QJL_M: tl.constexpr, QJL_MP: tl.constexpr, QJL_OFF: tl.constexpr, QJL_NOFF: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    h = pid_bh % HKV
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < T
    pos = tl.load(POS + b * stride_posb + t, mask=in_t, other=0).to(tl.int64)
    mask_t = in_t & (pos >= 0) & (pos < MAX_T)  # never write outside the cache (the host raises first)

    if tl.program_id(2) == 0:
        # ---- keys: rotate (k - mu) into the storage basis, one dot per group
        k = KN + b.to(tl.int64) * stride_knb + h.to(tl.int64) * stride_knh
        mu = KMEAN + h * D
        basis = KBASIS + h * D * D
        cs = KCS + h * D
        row = KP + b.to(tl.int64) * stride_kpb + h.to(tl.int64) * stride_kph + pos * K_BYTES
        proj = tl.zeros([BLOCK_T, QJL_MP], dtype=tl.float32)
        rn2 = tl.zeros([BLOCK_T], dtype=tl.float32)
        if K0B > 0:
            x0 = _rotate_keys(k, t, in_t, stride_knt, mu, basis, K0S, K0N, K0NP, D, DP, DCH, BLOCK_T)
            d0 = _quantize_group(x0, row, mask_t, KCB, cs, K0S, K0N, K0NP, K0B, K0T, K0PO, K0SO, BLOCK_T)
            if QJL_M > 0:
                if K0S < QJL_D:
                    pr, r2 = _qjl_group(x0, d0, QJLS + h * QJL_M * QJL_D, K0S, K0N, K0NP, QJL_D, QJL_M, QJL_MP)
                    proj += pr
                    rn2 += r2
        elif QJL_M > 0:
            if K0S < QJL_D:
                x0 = _rotate_keys(k, t, in_t, stride_knt, mu, basis, K0S, K0N, K0NP, D, DP, DCH, BLOCK_T)
                pr, r2 = _qjl_group(x0, x0 * 0, QJLS + h * QJL_M * QJL_D, K0S, K0N, K0NP, QJL_D, QJL_M, QJL_MP)
                proj += pr
                rn2 += r2
        if KNG > 1:
            if K1B > 0:
                x1 = _rotate_keys(k, t, in_t, stride_knt, mu, basis, K1S, K1N, K1NP, D, DP, DCH, BLOCK_T)
                d1 = _quantize_group(x1, row, mask_t, KCB + CB_STRIDE_, cs, K1S, K1N, K1NP, K1B, K1T, K1PO, K1SO,
                                     BLOCK_T)
                if QJL_M > 0:
                    if K1S < QJL_D:
                        pr, r2 = _qjl_group(x1, d1, QJLS + h * QJL_M * QJL_D, K1S, K1N, K1NP, QJL_D, QJL_M, QJL_MP)
                        proj += pr
                        rn2 += r2
            elif QJL_M > 0:
                if K1S < QJL_D:
                    x1 = _rotate_keys(k, t, in_t, stride_knt, mu, basis, K1S, K1N, K1NP, D, DP, DCH, BLOCK_T)
                    pr, r2 = _qjl_group(x1, x1 * 0, QJLS + h * QJL_M * QJL_D, K1S, K1N, K1NP, QJL_D, QJL_M, QJL_MP)
                    proj += pr
                    rn2 += r2
        if KNG > 2:
            if K2B > 0:
                x2 = _rotate_keys(k, t, in_t, stride_knt, mu, basis, K2S, K2N, K2NP, D, DP, DCH, BLOCK_T)
                d2 = _quantize_group(x2, row, mask_t, KCB + 2 * CB_STRIDE_, cs, K2S, K2N, K2NP, K2B, K2T, K2PO,
                                     K2SO, BLOCK_T)
                if QJL_M > 0:
                    if K2S < QJL_D:
                        pr, r2 = _qjl_group(x2, d2, QJLS + h * QJL_M * QJL_D, K2S, K2N, K2NP, QJL_D, QJL_M, QJL_MP)
                        proj += pr
                        rn2 += r2
            elif QJL_M > 0:
                if K2S < QJL_D:
                    x2 = _rotate_keys(k, t, in_t, stride_knt, mu, basis, K2S, K2N, K2NP, D, DP, DCH, BLOCK_T)
                    pr, r2 = _qjl_group(x2, x2 * 0, QJLS + h * QJL_M * QJL_D, K2S, K2N, K2NP, QJL_D, QJL_M, QJL_MP)
                    proj += pr
                    rn2 += r2
        if QJL_M > 0:
            mi = tl.arange(0, QJL_MP)
            sign_bits = ((proj >= 0) & (mi < QJL_M)[None, :]).to(tl.int32)  # padding bits stay 0
            _store_bits(row, mask_t, sign_bits, QJL_OFF, QJL_M, QJL_MP, BLOCK_T)
            _store_fp16(row, QJL_NOFF, tl.minimum(tl.sqrt(rn2), FP16_MAX_), mask_t)
    else:
        # ---- values: already in storage coordinates; load each group's columns directly
        base = VN + b.to(tl.int64) * stride_vnb + h.to(tl.int64) * stride_vnh
        cs = VCS + h * D
        row = VP + b.to(tl.int64) * stride_vpb + h.to(tl.int64) * stride_vph + pos * V_BYTES
        if V0B > 0:
            _quantize_group(_load_x(base, t, in_t, stride_vnt, V0S, V0N, V0NP), row, mask_t, VCB, cs,
                            V0S, V0N, V0NP, V0B, V0T, V0PO, V0SO, BLOCK_T)
        if VNG > 1:
            if V1B > 0:
                _quantize_group(_load_x(base, t, in_t, stride_vnt, V1S, V1N, V1NP), row, mask_t, VCB + CB_STRIDE_,
                                cs, V1S, V1N, V1NP, V1B, V1T, V1PO, V1SO, BLOCK_T)
        if VNG > 2:
            if V2B > 0:
                _quantize_group(_load_x(base, t, in_t, stride_vnt, V2S, V2N, V2NP), row, mask_t,
                                VCB + 2 * CB_STRIDE_, cs, V2S, V2N, V2NP, V2B, V2T, V2PO, V2SO, BLOCK_T)


FP16_MAX_ = tl.constexpr(FP16_MAX)
CB_STRIDE_ = tl.constexpr(CODEBOOK_STRIDE)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _is_concrete(*ts: torch.Tensor) -> bool:
    """True for real tensors outside any tracing (fake/functional tensors, proxies, dynamo)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if torch.compiler.is_compiling() or get_proxy_mode() is not None:
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False  # no host sync inside a CUDA graph capture
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in ts)


def check_capacity(positions: torch.Tensor, max_tokens: int) -> None:
    """Raise IndexError naming the capacity if a write position is outside [0, max_tokens)."""
    if positions.numel() == 0 or not _is_concrete(positions):
        return
    hi, lo = int(positions.max()), int(positions.min())
    if hi >= max_tokens or lo < 0:
        raise IndexError(f"quantize_write: position {hi if hi >= max_tokens else lo} is outside the cache "
                         f"capacity of {max_tokens} tokens (max_tokens={max_tokens})")


def _check_args(k_new, v_new, k_packed, v_packed, positions, kl: PackedLayout, vl: PackedLayout):
    if k_new.dim() != 4 or k_new.shape != v_new.shape:
        raise ValueError(f"k_new/v_new must both be [B, kv_heads, T_new, d]; got {tuple(k_new.shape)} / {tuple(v_new.shape)}")
    B, H, T, D = k_new.shape
    if tuple(k_packed.shape[:2]) != (B, H) or tuple(v_packed.shape[:2]) != (B, H):
        raise ValueError(f"cache {tuple(k_packed.shape)} does not match new tokens {tuple(k_new.shape)}")
    if k_packed.shape[-1] != kl.row_bytes or v_packed.shape[-1] != vl.row_bytes:
        raise ValueError(f"row bytes {k_packed.shape[-1]}/{v_packed.shape[-1]} != format's {kl.row_bytes}/{vl.row_bytes}")
    if positions.shape not in ((T,), (B, T)):
        raise ValueError(f"positions must be [T_new] or [B, T_new], got {tuple(positions.shape)}")
    if vl.has_qjl:
        raise NotImplementedError("QJL on values is not supported (keys only)")


def quantize_write_triton(
    k_new: torch.Tensor, v_new: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor,
    positions: torch.Tensor, k_basis: torch.Tensor, k_mean: torch.Tensor, k_codebooks: torch.Tensor,
    k_channel_scale: torch.Tensor, v_codebooks: torch.Tensor, v_channel_scale: torch.Tensor,
    k_qjl_proj: Optional[torch.Tensor], k_groups: list[int], v_groups: list[int], qjl_dims: int, qjl_bits: int,
    block_t: int = 16, num_warps: int = 4, check: bool = True, _launch=None,
) -> None:
    """Launch the kernel (wrap_triton'd from the op). check=False skips the host capacity check."""
    B, H, T, D = k_new.shape
    kl = PackedLayout.from_flat(D, k_groups, qjl_dims, qjl_bits)
    vl = PackedLayout.from_flat(D, v_groups)
    _check_args(k_new, v_new, k_packed, v_packed, positions, kl, vl)
    max_t = k_packed.shape[2]
    if check:
        check_capacity(positions, max_t)
    if k_packed.stride(-1) != 1 or k_packed.stride(-2) != kl.row_bytes or v_packed.stride(-1) != 1 \
            or v_packed.stride(-2) != vl.row_bytes:
        raise ValueError("k_packed/v_packed rows must be contiguous (stride(-2) == row bytes)")
    if T == 0:
        return
    launch = _launch or (lambda k: k if k_new.is_cuda else _interpreted(k))
    k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
    v_new = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
    positions = positions.contiguous()
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731  (bases may arrive in bf16/fp16)
    k_basis, k_mean, k_codebooks, v_codebooks = f32(k_basis), f32(k_mean), f32(k_codebooks), f32(v_codebooks)
    k_channel_scale, v_channel_scale = f32(k_channel_scale), f32(v_channel_scale)
    if kl.has_qjl:
        s = qjl_per_head(k_qjl_proj, H).contiguous()
        qjl = dict(QJL_D=qjl_dims, QJL_M=qjl_bits, QJL_MP=_pow2(qjl_bits), QJL_OFF=kl.qjl_offset,
                   QJL_NOFF=kl.qjl_norm_offset)
    else:
        s = k_basis
        qjl = dict(QJL_D=0, QJL_M=0, QJL_MP=16, QJL_OFF=0, QJL_NOFF=0)
    ck = launch(_quantize_write_kernel)[(B * H, triton.cdiv(T, block_t), 2)](
        k_new, v_new, k_packed, v_packed, positions, k_basis, k_mean, k_channel_scale, v_channel_scale,
        k_codebooks, v_codebooks, s, T, max_t,
        k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_packed.stride(0), k_packed.stride(1), v_packed.stride(0), v_packed.stride(1),
        positions.stride(0) if positions.dim() == 2 else 0,
        HKV=H, D=D, DP=_pow2(D), K_BYTES=kl.row_bytes, V_BYTES=vl.row_bytes, BLOCK_T=block_t,
        DCH=min(32, _pow2(D)),
        **group_constexprs(kl, "K"), **group_constexprs(vl, "V"), **qjl, num_warps=num_warps,
    )
    if hasattr(ck, "n_regs"):
        LAST_COMPILED["quantize_write"] = ck


def quantize_write_reference(
    k_new: torch.Tensor, v_new: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor,
    positions: torch.Tensor, k_basis: torch.Tensor, k_mean: torch.Tensor, k_codebooks: torch.Tensor,
    k_channel_scale: torch.Tensor, v_codebooks: torch.Tensor, v_channel_scale: torch.Tensor,
    k_qjl_proj: Optional[torch.Tensor], k_groups: list[int], v_groups: list[int], qjl_dims: int, qjl_bits: int,
) -> None:
    """Plain torch: rotate keys, encode/pack with sqcompile.quant, scatter rows into the caches."""
    from sqcompile.quant import packing

    B, H, T, D = k_new.shape
    kf = format_from_args(D, k_groups, k_codebooks, k_channel_scale, qjl_dims, qjl_bits)
    vf = format_from_args(D, v_groups, v_codebooks, v_channel_scale)
    _check_args(k_new, v_new, k_packed, v_packed, positions, PackedLayout.from_format(kf), PackedLayout.from_format(vf))
    check_capacity(positions, k_packed.shape[2])
    k_store = torch.einsum("bhtd,hed->bhte", k_new.float() - k_mean.float()[None, :, None, :], k_basis.float())
    codes, scales = kf.encode(k_store)
    signs = norm = None
    if qjl_bits > 0:
        deq = kf.decode(codes, scales, k_store)
        residual = (k_store - deq)[..., :qjl_dims]
        # sqcompile.quant.qjl.sketch with one S per kv-head [Hkv, m, qjl_dims]
        proj = torch.einsum("bhtd,hmd->bhtm", residual, qjl_per_head(k_qjl_proj, H))
        signs = (proj >= 0).to(torch.int64)
        norm = residual.pow(2).sum(-1).sqrt().clamp(max=FP16_MAX).to(torch.float16).float()
    k_rows = packing.pack(kf, codes, scales, signs, norm)
    v_rows = packing.pack(vf, *vf.encode(v_new.float()))
    if positions.dim() == 1:
        k_packed.index_copy_(2, positions, k_rows)
        v_packed.index_copy_(2, positions, v_rows)
    else:
        for b in range(B):
            k_packed[b].index_copy_(1, positions[b], k_rows[b])
            v_packed[b].index_copy_(1, positions[b], v_rows[b])


@triton_op("sqcompile::quantize_write", mutates_args=("k_packed", "v_packed"))
def quantize_write(
    k_new: torch.Tensor, v_new: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor,
    positions: torch.Tensor, k_basis: torch.Tensor, k_mean: torch.Tensor, k_codebooks: torch.Tensor,
    k_channel_scale: torch.Tensor, v_codebooks: torch.Tensor, v_channel_scale: torch.Tensor,
    k_qjl_proj: Optional[torch.Tensor], k_groups: list[int], v_groups: list[int], qjl_dims: int, qjl_bits: int,
    impl: str = "auto",
) -> None:
    """Quantize k_new (post-RoPE, unrotated) and v_new (value storage basis) [B, Hkv, T_new, d] and
    store their packed rows at `positions` of k_packed/v_packed. k_basis [Hkv, d, d], k_mean [Hkv, d],
    codebooks [groups, 256], channel scales [Hkv, d], k_qjl_proj [Hkv, m, qjl_dims] or [m, qjl_dims] or None; groups
    flattened (start, stop, bits, token_scale). Positions outside [0, max_tokens) raise IndexError
    (checked on the host when not tracing; the kernel never writes outside the cache). impl: "torch" |
    "triton" (CPU tensors: under TRITON_INTERPRET=1) | "auto" (Triton on CUDA, else torch), the backend's
    `KernelPlan.write`."""
    if not uses_triton(impl, k_new):
        quantize_write_reference(k_new, v_new, k_packed, v_packed, positions, k_basis, k_mean, k_codebooks,
                                 k_channel_scale, v_codebooks, v_channel_scale, k_qjl_proj, k_groups, v_groups,
                                 qjl_dims, qjl_bits)
        return
    quantize_write_triton(k_new, v_new, k_packed, v_packed, positions, k_basis, k_mean, k_codebooks,
                          k_channel_scale, v_codebooks, v_channel_scale, k_qjl_proj, k_groups, v_groups,
                          qjl_dims, qjl_bits, _launch=wrap_triton if k_new.is_cuda else wrap_interpreted)
