"""One Triton launch for the fast-layout cache write: rotate, quantize, pack and store K and V rows.

`sqcompile::quantize_write_fast_triton(key, v_store, k_packed, v_packed, positions, k_basis, k_mean,
k_layout, v_layout)` takes the arguments of `sqcompile::quantize_write_fast`
(`sqcompile.kernels.fast_cache.quantize_write_fast`, its plain-torch reference) and writes the same bytes:

    key, v_store   [B, Hkv, T_new, d]  float32 / bfloat16 / float16 (any strides); v_store already in the
                                       value storage basis
    k_packed,      [B, Hkv, capacity, row_bytes] uint8, contiguous, row_bytes = the layout's bytes_per_token
    v_packed
    positions      [T_new] int32/int64 (shared by the batch); rows at positions outside [0, capacity) are
                   skipped (the reference's index_copy_ raises; no host sync here to check)
    k_basis        [Hkv, d, d] float32, rows = key storage basis vectors; k_mean [Hkv, d] float32
    k_layout,      `FastLayout.spec()` strings, token-scaled groups only (`fast_cache.layout_spec`),
    v_layout       at most MAX_CODED coded groups each; d a power of two in [16, 256] (tested: 64, 128)

`_quantize_write_fast_kernel`, grid (Hkv, cdiv(B * T_new, BLOCK_M), coded groups of K + coded groups of V):
one program writes one coded group g (static: constexprs parsed on the host from the spec strings, cached
per spec) of BLOCK_M rows r = b * T_new + t of one kv-head:
  * x_g [BLOCK_M, n padded to a power of two >= 16]: keys x_g = (k - mu) @ B[start:stop]^T in fp32, walking
    d in chunks; values: the group's columns as they are. Two paths, picked on the host by the rows per
    kv-head: <= GEMV_MAX_ROWS (decode): BLOCK_M = 1, a GEMV (the [n, DCH] basis tile times the row, summed
    over chunks, reduced once); more (prefill): BLOCK_M = 16, one tl.dot per chunk (input_precision="ieee");
  * s = fp16(min(sqrt(sum(x_g^2) / n), 65504)), c = x_g / s (s == 0 or NaN: c = x_g),
    code = clamp(floor(fl(c * fl32(1 / step)) + 2^(b-1)), 0, 2^b - 1), NaN -> 0: `token_normalize` and
    `uniform_codes` op for op (IEEE division/sqrt; on the GPU the product is an explicit mul.rn so it is
    not contracted into an FMA with the + 2^(b-1), which would move ties);
  * packs 8 / b codes a byte (reshape [BLOCK_M, n / (8/b), 8/b], shift, sum) and stores the n * b / 8 code
    bytes at `FastLayout.code_offsets()[g]` and the fp16 scale, little-endian, at `scale_offsets()[g]`
    (code bytes masked to n * b / 8, which need not be a power of two; offsets may be odd).
0-bit groups store nothing. The keys' rotation adds in another order than torch's matmul, so a code may
differ from the reference by one level where the value lies within rounding of a decision boundary
(on H100/H200 all but 1 in 10^5 bytes matched the eager reference in the layouts tried).

Measured (CUDA graph of 100 launches, B=8, Hkv=8, d=128, T_new=1, bf16 keys), the same through
torch.compile: H100 2.9 us for the budget 3.25 / 4.25 layouts, 3.6 us for 2.69 (one 128-dim key group);
B=4, T_new=32 (tl.dot path) 8.4 / 13.3 us. H200: 2.8 / 3.7 us; there an empty Triton kernel took 0.9 us and
the Inductor-compiled torch form 17-25 us (but 2.8 us with static shapes at 3.25 / 4.25 and B=8).
One program a group and a row (rather than 16 rows, K and V together) was 2-4x faster at decode sizes.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from sqcompile.quant.fast_layout import FastLayout

from .decode_attention import _interpreted, wrap_interpreted

MAX_CODED = 4  # coded (bits > 0) groups per layout the kernel unrolls
BLOCK_M = 16  # rows (b, t) per program on the tl.dot path (tl.dot's minimum M)
GEMV_MAX_ROWS = 64  # up to this many rows (B * T_new) per kv-head: one row a program (GEMV), else tl.dot
FP16_MAX = 65504.0
_SLOT = ("S", "N", "NP", "B", "INV", "CO", "SO")
_FP16_MAX = tl.constexpr(FP16_MAX)


# ---------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _mul_rn(a, b, USE_ASM: tl.constexpr):
    """a * b rounded on its own (never fused into an FMA with a following add)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _rotate_group(k_rows, in_r, stride_kd, mu_ptr, stride_md, basis_ptr, stride_br, stride_bc,
                  START: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, DCH: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """(k - mu) @ B[START:START+N]^T -> fp32 [BLOCK_M, NP] (columns >= N are 0), d walked in DCH chunks.
    BLOCK_M == 1: a GEMV, the [NP, DCH] products summed over the chunks and reduced once at the end;
    else one tl.dot per chunk (fp32, input_precision="ieee")."""
    j = tl.arange(0, NP)
    acc = tl.zeros([BLOCK_M, NP], dtype=tl.float32)
    acc2 = tl.zeros([NP, DCH], dtype=tl.float32)
    for d0 in tl.static_range(0, D, DCH):
        dd = d0 + tl.arange(0, DCH)
        kc = tl.load(k_rows[:, None] + dd[None, :] * stride_kd, mask=in_r[:, None], other=0.0).to(tl.float32)
        kc = kc - tl.load(mu_ptr + dd * stride_md)[None, :]
        bc = tl.load(basis_ptr + (START + j)[:, None] * stride_br + dd[None, :] * stride_bc,
                     mask=(j < N)[:, None], other=0.0)
        if BLOCK_M == 1:
            acc2 += bc * kc
        else:
            acc += tl.dot(kc, tl.trans(bc), input_precision="ieee")
    if BLOCK_M == 1:
        acc = tl.sum(acc2, 1)[None, :]
    return acc


@triton.jit
def _load_group(v_rows, in_r, stride_vd, START: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    j = tl.arange(0, NP)
    return tl.load(v_rows[:, None] + (START + j)[None, :] * stride_vd, mask=in_r[:, None] & (j < N)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _encode_store(x, row_ptr, mask_w, N: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr,
                  INV: tl.constexpr, CO: tl.constexpr, SO: tl.constexpr, BLOCK_M: tl.constexpr,
                  USE_ASM: tl.constexpr):
    """Quantize x [BLOCK_M, NP] fp32 (one token-scaled group) and store its code bytes and fp16 scale."""
    j = tl.arange(0, NP)
    x = tl.where((j < N)[None, :], x, 0.0)
    # token_normalize: s = fp16(clamp(sqrt(mean(x^2)), max=65504)); c = x / (s if s > 0 else 1)
    ms = tl.math.div_rn(tl.sum(x * x, 1), tl.full([BLOCK_M], N, tl.float32))
    s = tl.sqrt_rn(ms)
    s = tl.where(s > _FP16_MAX, _FP16_MAX, s)  # keeps NaN, as torch.clamp does
    s16 = s.to(tl.float16)
    sf = s16.to(tl.float32)
    c = tl.math.div_rn(x, tl.where(sf > 0, sf, 1.0)[:, None])
    # uniform_codes: floor(c * (1 / step) + ((2^b - 1) / 2 + 1/2)), NaN -> 0, clamped to [0, 2^b - 1]
    HALF: tl.constexpr = float(1 << (BITS - 1))
    MAXC: tl.constexpr = float((1 << BITS) - 1)
    y = _mul_rn(c, tl.full([BLOCK_M, NP], INV, tl.float32), USE_ASM)
    cf = tl.floor(y + HALF)
    cf = tl.where(cf != cf, 0.0, cf)
    cf = tl.where(cf < 0.0, 0.0, tl.where(cf > MAXC, MAXC, cf))
    code = cf.to(tl.int32)
    # pack: coordinate j -> byte j * b // 8, bit (j * b) % 8
    PER: tl.constexpr = 8 // BITS
    NBP: tl.constexpr = NP // PER
    NB: tl.constexpr = N // PER
    if PER == 1:
        byte = code
    else:
        sh = tl.arange(0, PER) * BITS
        byte = tl.sum(tl.reshape(code, [BLOCK_M, NBP, PER]) << sh[None, None, :], 2)
    i = tl.arange(0, NBP)
    tl.store(row_ptr[:, None] + (CO + i)[None, :], byte.to(tl.uint8), mask=mask_w[:, None] & (i < NB)[None, :])
    u = s16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(row_ptr + SO, (u & 0xFF).to(tl.uint8), mask=mask_w)
    tl.store(row_ptr + (SO + 1), ((u >> 8) & 0xFF).to(tl.uint8), mask=mask_w)


@triton.jit
def _key_group(k_rows, in_r, stride_kd, mu_ptr, stride_md, basis_ptr, stride_br, stride_bc, row_ptr, mask_w,
               START: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr, INV: tl.constexpr,
               CO: tl.constexpr, SO: tl.constexpr, D: tl.constexpr, DCH: tl.constexpr, BLOCK_M: tl.constexpr,
               USE_ASM: tl.constexpr):
    if BITS > 0:
        x = _rotate_group(k_rows, in_r, stride_kd, mu_ptr, stride_md, basis_ptr, stride_br, stride_bc,
                          START, N, NP, D, DCH, BLOCK_M)
        _encode_store(x, row_ptr, mask_w, N, NP, BITS, INV, CO, SO, BLOCK_M, USE_ASM)


@triton.jit
def _value_group(v_rows, in_r, stride_vd, row_ptr, mask_w, START: tl.constexpr, N: tl.constexpr,
                 NP: tl.constexpr, BITS: tl.constexpr, INV: tl.constexpr, CO: tl.constexpr, SO: tl.constexpr,
                 BLOCK_M: tl.constexpr, USE_ASM: tl.constexpr):
    if BITS > 0:
        x = _load_group(v_rows, in_r, stride_vd, START, N, NP)
        _encode_store(x, row_ptr, mask_w, N, NP, BITS, INV, CO, SO, BLOCK_M, USE_ASM)


@triton.jit
def _quantize_write_fast_kernel(
    K, V, KP, VP, POS, KB, KM,
    M, T, K_CAP, V_CAP,
    stride_kb, stride_kh, stride_kt, stride_kd, stride_vb, stride_vh, stride_vt, stride_vd, stride_pos,
    stride_bh, stride_br, stride_bc, stride_mh, stride_md,
    HKV: tl.constexpr, D: tl.constexpr, DCH: tl.constexpr, BLOCK_M: tl.constexpr,
    K_BYTES: tl.constexpr, V_BYTES: tl.constexpr, USE_ASM: tl.constexpr,
    KNC: tl.constexpr, VNC: tl.constexpr,
    K0S: tl.constexpr, K0N: tl.constexpr, K0NP: tl.constexpr, K0B: tl.constexpr, K0INV: tl.constexpr, K0CO: tl.constexpr, K0SO: tl.constexpr,
    K1S: tl.constexpr, K1N: tl.constexpr, K1NP: tl.constexpr, K1B: tl.constexpr, K1INV: tl.constexpr, K1CO: tl.constexpr, K1SO: tl.constexpr,
    K2S: tl.constexpr, K2N: tl.constexpr, K2NP: tl.constexpr, K2B: tl.constexpr, K2INV: tl.constexpr, K2CO: tl.constexpr, K2SO: tl.constexpr,
    K3S: tl.constexpr, K3N: tl.constexpr, K3NP: tl.constexpr, K3B: tl.constexpr, K3INV: tl.constexpr, K3CO: tl.constexpr, K3SO: tl.constexpr,
    V0S: tl.constexpr, V0N: tl.constexpr, V0NP: tl.constexpr, V0B: tl.constexpr, V0INV: tl.constexpr, V0CO: tl.constexpr, V0SO: tl.constexpr,
    V1S: tl.constexpr, V1N: tl.constexpr, V1NP: tl.constexpr, V1B: tl.constexpr, V1INV: tl.constexpr, V1CO: tl.constexpr, V1SO: tl.constexpr,
    V2S: tl.constexpr, V2N: tl.constexpr, V2NP: tl.constexpr, V2B: tl.constexpr, V2INV: tl.constexpr, V2CO: tl.constexpr, V2SO: tl.constexpr,
    V3S: tl.constexpr, V3N: tl.constexpr, V3NP: tl.constexpr, V3B: tl.constexpr, V3INV: tl.constexpr, V3CO: tl.constexpr, V3SO: tl.constexpr,
):
    h = tl.program_id(0)
    part = tl.program_id(2)  # which coded group this program writes: K's 0..KNC-1, then V's
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_r = r < M
    b = (r // T).to(tl.int64)
    t = r % T
    pos = tl.load(POS + t * stride_pos, mask=in_r, other=0).to(tl.int64)
    bh = b * HKV + h
    h64 = h.to(tl.int64)

    # ---- keys: rotate (k - mu) into the storage basis, group by group
    k_rows = K + b * stride_kb + h64 * stride_kh + t.to(tl.int64) * stride_kt
    mu = KM + h64 * stride_mh
    basis = KB + h64 * stride_bh
    krow = KP + (bh * K_CAP + pos) * K_BYTES
    kw = in_r & (pos >= 0) & (pos < K_CAP)
    if part == 0:
        _key_group(k_rows, in_r, stride_kd, mu, stride_md, basis, stride_br, stride_bc, krow, kw,
                   K0S, K0N, K0NP, K0B, K0INV, K0CO, K0SO, D, DCH, BLOCK_M, USE_ASM)
    if part == 1:
        _key_group(k_rows, in_r, stride_kd, mu, stride_md, basis, stride_br, stride_bc, krow, kw,
                   K1S, K1N, K1NP, K1B, K1INV, K1CO, K1SO, D, DCH, BLOCK_M, USE_ASM)
    if part == 2:
        _key_group(k_rows, in_r, stride_kd, mu, stride_md, basis, stride_br, stride_bc, krow, kw,
                   K2S, K2N, K2NP, K2B, K2INV, K2CO, K2SO, D, DCH, BLOCK_M, USE_ASM)
    if part == 3:
        _key_group(k_rows, in_r, stride_kd, mu, stride_md, basis, stride_br, stride_bc, krow, kw,
                   K3S, K3N, K3NP, K3B, K3INV, K3CO, K3SO, D, DCH, BLOCK_M, USE_ASM)

    # ---- values: already in storage coordinates
    v_rows = V + b * stride_vb + h64 * stride_vh + t.to(tl.int64) * stride_vt
    vrow = VP + (bh * V_CAP + pos) * V_BYTES
    vw = in_r & (pos >= 0) & (pos < V_CAP)
    if part == KNC + 0:
        _value_group(v_rows, in_r, stride_vd, vrow, vw, V0S, V0N, V0NP, V0B, V0INV, V0CO, V0SO, BLOCK_M, USE_ASM)
    if part == KNC + 1:
        _value_group(v_rows, in_r, stride_vd, vrow, vw, V1S, V1N, V1NP, V1B, V1INV, V1CO, V1SO, BLOCK_M, USE_ASM)
    if part == KNC + 2:
        _value_group(v_rows, in_r, stride_vd, vrow, vw, V2S, V2N, V2NP, V2B, V2INV, V2CO, V2SO, BLOCK_M, USE_ASM)
    if part == KNC + 3:
        _value_group(v_rows, in_r, stride_vd, vrow, vw, V3S, V3N, V3NP, V3B, V3INV, V3CO, V3SO, BLOCK_M, USE_ASM)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _slot_constexprs(layout: FastLayout, prefix: str, what: str) -> dict:
    coded = [(g, co, so) for g, co, so in zip(layout.groups, layout.code_offsets(), layout.scale_offsets())
             if g.bits > 0]
    if len(coded) > MAX_CODED:
        raise ValueError(f"{what}: the kernel takes at most {MAX_CODED} coded groups, got {len(coded)}")
    out = {f"{prefix}NC": len(coded)}
    for i in range(MAX_CODED):
        if i < len(coded):
            g, co, so = coded[i]
            vals = (g.start, g.n, _pow2(g.n), g.bits, 1.0 / g.step, co, so)
        else:
            vals = (0, 1, 16, 0, 1.0, 0, 0)
        out.update({f"{prefix}{i}{name}": v for name, v in zip(_SLOT, vals)})
    return out


@functools.lru_cache(maxsize=256)
def _plan(d: int, k_layout: str, v_layout: str) -> tuple[int, int, dict]:
    """(K row bytes, V row bytes, kernel constexprs) for head_dim d and the two spec strings."""
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256] (64 or 128 tested), got {d}")
    out = {}
    rows = []
    for spec, prefix, what in ((k_layout, "K", "k_layout"), (v_layout, "V", "v_layout")):
        try:
            lay = FastLayout.from_spec(d, spec)
        except ValueError as e:
            raise ValueError(f"{what} must be a FastLayout spec for head_dim {d}: {e}") from None
        if any(g.scale != "token" for g in lay.groups if g.bits):
            raise ValueError(f"{what}: expected token-scaled groups only, got {lay.describe()}")
        out.update(_slot_constexprs(lay, prefix, what))
        rows.append(lay.bytes_per_token())
    return rows[0], rows[1], out


def supports(d: int, k_layout: str, v_layout: str) -> Optional[str]:
    """None when the kernel writes these layouts at head_dim d, else why not (`quantize_write_fast` then
    keeps its torch form)."""
    try:
        _plan(int(d), k_layout, v_layout)
    except ValueError as e:
        return str(e)
    return None


def _check(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout, v_layout):
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if key.dim() != 4:
        raise ValueError(f"key must be [B, Hkv, T_new, d], got shape {tuple(key.shape)}")
    if v_store.shape != key.shape:
        raise ValueError(f"v_store must have key's shape {tuple(key.shape)} [B, Hkv, T_new, d], "
                         f"got {tuple(v_store.shape)}")
    if key.dtype not in floats or v_store.dtype not in floats:
        raise ValueError(f"key/v_store must be float32, bfloat16 or float16, got {key.dtype}/{v_store.dtype}")
    B, H, T, d = key.shape
    kb, vb, consts = _plan(int(d), k_layout, v_layout)
    for name, p, rb in (("k_packed", k_packed, kb), ("v_packed", v_packed, vb)):
        if p.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8, got {p.dtype}")
        if p.dim() != 4 or tuple(p.shape[:2]) != (B, H) or p.shape[3] != rb:
            raise ValueError(f"{name} must be [B={B}, Hkv={H}, capacity, row_bytes={rb}] (the layout's "
                             f"bytes_per_token), got {tuple(p.shape)}")
        if not p.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if positions.dim() != 1 or positions.shape[0] != T:
        raise ValueError(f"positions must be [T_new={T}] (shared by the batch), got {tuple(positions.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if tuple(k_basis.shape) != (H, d, d) or k_basis.dtype != torch.float32:
        raise ValueError(f"k_basis must be float32 [Hkv={H}, d={d}, d={d}], got {k_basis.dtype} "
                         f"{tuple(k_basis.shape)}")
    if tuple(k_mean.shape) != (H, d) or k_mean.dtype != torch.float32:
        raise ValueError(f"k_mean must be float32 [Hkv={H}, d={d}], got {k_mean.dtype} {tuple(k_mean.shape)}")
    devs = {t.device for t in (key, v_store, k_packed, v_packed, positions, k_basis, k_mean)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(x) for x in devs)}")
    return consts


def _launch_kernel(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, consts, launch,
                   block_m: int = 0, num_warps: int = 0, dch: int = 0):
    """One launch, grid (Hkv, cdiv(B * T_new, block_m), coded groups of K and V).
    block_m 1: the GEMV path (the default up to GEMV_MAX_ROWS rows per kv-head, decode), 16 (or any power
    of two >= 16): tl.dot (the default above)."""
    B, H, T, d = key.shape
    M = B * T
    if M == 0:
        return None
    block_m = block_m or (1 if M <= GEMV_MAX_ROWS else BLOCK_M)
    if block_m != 1 and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be 1 (GEMV) or a power of two >= 16 (tl.dot), got {block_m}")
    num_warps = num_warps or (2 if block_m == 1 else 4)
    dch = dch or min(64 if block_m == 1 else 32, d)
    parts = consts["KNC"] + consts["VNC"]
    if parts == 0:
        return None
    return launch(_quantize_write_fast_kernel)[(H, triton.cdiv(M, block_m), parts)](
        key, v_store, k_packed, v_packed, positions, k_basis, k_mean,
        M, T, k_packed.shape[2], v_packed.shape[2],
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        v_store.stride(0), v_store.stride(1), v_store.stride(2), v_store.stride(3), positions.stride(0),
        k_basis.stride(0), k_basis.stride(1), k_basis.stride(2), k_mean.stride(0), k_mean.stride(1),
        HKV=H, D=d, DCH=dch, BLOCK_M=block_m, K_BYTES=k_packed.shape[3], V_BYTES=v_packed.shape[3],
        USE_ASM=key.is_cuda, **consts, num_warps=num_warps,
    )


@triton_op("sqcompile::quantize_write_fast_triton", mutates_args={"k_packed", "v_packed"})
def quantize_write_fast_triton(key: torch.Tensor, v_store: torch.Tensor, k_packed: torch.Tensor,
                               v_packed: torch.Tensor, positions: torch.Tensor, k_basis: torch.Tensor,
                               k_mean: torch.Tensor, k_layout: str, v_layout: str) -> None:
    """`sqcompile::quantize_write_fast` in one Triton launch (see the module doc). CUDA tensors run the
    compiled kernel, CPU tensors the interpreted one (TRITON_INTERPRET=1 set before triton was imported; else an
    error that says so)."""
    consts = _check(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout, v_layout)
    if not key.is_cuda:
        _interpreted(_quantize_write_fast_kernel)
    _launch_kernel(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, consts,
                   wrap_triton if key.is_cuda else wrap_interpreted)
