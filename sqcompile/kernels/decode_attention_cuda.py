"""Decode attention over the FAST packed cache as a hand-written CUDA kernel (NVRTC, mma.sync).

The CUDA source is `csrc/decode_attention_fast.cu`, a template this module fills per layout (`_Plan._source`:
the layout's constants and its generated unpack code) and compiles with NVRTC (`torch.cuda._compile_kernel`);
torch's cpp_extension `load` does not fit: the code differs per layout and needs no host compiler.

Same contract as `sqcompile.kernels.decode_attention_fast` (its torch reference is the reference here
too); this is its register-controlled version. The Triton kernel spends ~5.2
instructions per K/V element, ~4 of them in layout conversions Triton inserts around `tl.dot`. Here
every operand is built where the mma wants it:

* scores^T = codes @ q'^T with `mma.m16n8k16` (M = 16 tokens, N = 8 query heads of one kv-head: G <= 8
  rows are real, not 4 of 16), q' held in registers for the whole loop;
* each thread reads exactly the code bytes of its A fragment (K) from shared memory: a fixed
  permutation of the storage coordinates per group makes "slot e of bytes 2m, 2m+1" the register
  pair the fragment needs. The permutation is applied to q' once (host) and to the output once
  (epilogue), so the packed format is unchanged;
* decode per pair: PRMT {byte, 0x64, byte', 0x64} (once per two bytes) + LOP3 + HSUB2 that yields
  2^(b e) (c - 2^(b-1)) exactly in fp16; the remaining +0.5 of the symmetric offset is one term per
  score (0.5 sum q') and per output (0.5 sum_t p_t s_t);
* P stays in registers: the fp32 score accumulators are scaled by the value token scale, packed to
  fp16 and transposed in registers with `movmatrix` into the B operand of out^T = V^T P^T;
* K/V tiles of 32 tokens stream global -> shared with `cp.async` (16-byte, zero-fill past the cache),
  STAGES deep per warp; warps of a CTA take alternate tiles and are merged through shared memory.

Each CTA writes per (batch, query head, split) the normalized partial output (in the original storage
coordinates) and its log2-sum-exp; `sq_fast_merge` merges the splits into the output. A small first kernel computes q'' = q @ M (storage basis,
fragment order, scales folded into M, cached per constant tensors). Its variant `sq_fast_query_write` also
stores the decode step's new token (rotate the key by the same basis, quantize, pack: `quantize_write_fast`'s
bytes) before the split kernel reads the cache, so the write costs a decode step no launch of its own
(`sqcompile::decode_attention_fast_write`, which the substitution pass emits).
Selection: `sqcompile::decode_attention_fast` runs this kernel on CUDA when its `kernel` argument is "cuda" (the
backend's `KernelPlan.decode`, `sqcompile.kernels.resolve_kernels`) and `available(...)` says so (the layout is
supported, NVRTC compiles it), else the Triton kernel. It is an opaque custom op
(`sqcompile::decode_attention_fast_cuda`): Inductor calls it as an extern kernel.

Supported layouts (`supports`): head_dim % 16 == 0, G = Hq / Hkv <= 8, every coded group starts and
ends on a multiple of 16 and its n * bits is a multiple of 32 (K) or 64 (V), cache capacity % 8 == 0.
"""
from __future__ import annotations

import ctypes
import logging
import string
import struct
import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from sqcompile.kernels.sink import check_sink
from sqcompile.quant.fast_layout import FastLayout

log = logging.getLogger(__name__)
TN = 32  # tokens per warp tile (two m16 tiles)
STATS = {"calls": 0}  # launches of the CUDA kernel (benchmarks report it, to show which kernel ran)
LOG2E = 1.4426950408889634


def _r16(n: int) -> int:
    return (n + 15) // 16 * 16


def _h(x: float) -> int:
    return struct.unpack("<H", struct.pack("<e", x))[0]


def _slot(bits: int, e: int, exponent: bool) -> tuple[int, int]:
    """(16-bit mask of code slot e [with the 0x64 exponent byte kept], fp16 bits of 1024 + 2^(b e) 2^(b-1)):
    (lane & mask) - sub = 2^(b e) (c - 2^(b-1)), exact in fp16."""
    mask = ((1 << bits) - 1) << (bits * e)
    return (mask | 0x6400) if exponent else mask, _h(1024.0 + 2.0 ** (bits * e) * 2 ** (bits - 1))


def _coded(lay: FastLayout):
    """(index, group, codes per byte, code offset, scale offset, 16-dim chunks, first chunk) of coded groups."""
    cos, sos = lay.code_offsets(), lay.scale_offsets()
    for gi, g in enumerate(lay.groups):
        if g.bits:
            yield gi, g, 8 // g.bits, cos[gi], sos[gi], g.n // 16, g.start // 16


def supports(kl: FastLayout, vl: FastLayout, head_dim: int, group: int, capacity: int) -> Optional[str]:
    """None if the CUDA kernel handles this case, else the reason it does not."""
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    if not 1 <= group <= 8:
        return f"{group} query heads per kv-head (the kernel takes 1..8)"
    if capacity % 8:
        return f"cache capacity {capacity} is not a multiple of 8"
    for name, lay, unit in (("K", kl, 32), ("V", vl, 64)):  # whole bytes for each of 4 (K) / 8 (V) threads
        if lay.bytes_per_token() % 2:
            return f"{name} rows of {lay.bytes_per_token()} bytes are odd"
        for g in lay.groups:
            if g.bits and (g.start % 16 or g.n % 16 or (g.n * g.bits) % unit):
                return f"{name} group [{g.start}:{g.stop}]@{g.bits} is not 16-aligned with n*bits % {unit} == 0"
    return None


def _query_slices(D: int) -> int:
    """The query launch's block is D x QS threads, QS the largest divisor of D with D * QS <= 512."""
    return max(q for q in range(1, max(1, 512 // D) + 1) if D % q == 0)


class _Plan:
    """Source, permutations and constants for one (head_dim, G, K layout, V layout, warps, stages)."""

    def __init__(self, D: int, G: int, kl: FastLayout, vl: FastLayout, warps: int, stages: int):
        self.D, self.G, self.kl, self.vl, self.W, self.S = D, G, kl, vl, warps, stages
        self.krb, self.vrb = kl.bytes_per_token(), vl.bytes_per_token()
        self.kbytes, self.vbytes = _r16(TN * self.krb), _r16(TN * self.vrb)
        self.stage_bytes = self.kbytes + self.vbytes
        self.ngv = len(vl.groups)
        self.qs = _query_slices(D)
        comb = warps * (D * 8 + 8 * (2 + self.ngv)) * 4
        self.smem = max(warps * stages * self.stage_bytes, comb)
        # K: fragment column fc = 16 kk + c -> storage coordinate, and 2^(-b e)
        kmap, kpow = [0] * D, [0.0] * D
        for g in kl.groups:
            if not g.bits:
                for j in range(g.start, g.stop):
                    kmap[j], kpow[j] = j, 0.0
                continue
            E, L = 8 // g.bits, g.n * g.bits // 32
            for kk in range(g.n // 16):
                for c in range(16):
                    tig, hh, lane = (c % 8) // 2, c // 8, c % 2
                    p = 2 * kk + hh
                    if L % 2:  # odd bytes per thread: a pair is slots (2k, 2k+1) of one byte
                        i, k = divmod(p, E // 2)
                        byte, e = tig * L + i, 2 * k + lane
                    else:  # a pair is slot e of bytes 2m, 2m+1
                        m, e = divmod(p, E)
                        byte = tig * L + 2 * m + lane
                    fc = g.start + 16 * kk + c
                    kmap[fc] = g.start + E * byte + e
                    kpow[fc] = 2.0 ** (-g.bits * e)
        # V: kernel output row r = 16 kk + gid + 8 hh -> storage coordinate, 2^(-b e), group
        vmap, vpow, vgrp = [0] * D, [0.0] * D, [0] * D
        for gi, g in enumerate(vl.groups):
            if not g.bits:
                for j in range(g.start, g.stop):
                    vmap[j], vpow[j], vgrp[j] = j, 0.0, gi
                continue
            E, Lp = 8 // g.bits, g.n * g.bits // 64
            for kk in range(g.n // 16):
                for r in range(16):
                    gid, hh = r % 8, r // 8
                    i, e = divmod(2 * kk + hh, E)
                    kr = g.start + 16 * kk + r
                    vmap[kr] = g.start + E * (gid * Lp + i) + e
                    vpow[kr] = 2.0 ** (-g.bits * e)
                    vgrp[kr] = gi
        assert sorted(kmap) == list(range(D)) and sorted(vmap) == list(range(D))
        self.kmap, self.kpow, self.vmap, self.vpow, self.vgrp = kmap, kpow, vmap, vpow, vgrp
        self.source = self._source()
        self._kernels: dict = {}
        self._dev: dict = {}

    # -- code generation ----------------------------------------------------------------------
    def _k_scores(self) -> str:
        out = []
        for gi, g, E, co, so, nch, kk0 in _coded(self.kl):
            L = g.n * g.bits // 32
            out.append(f"    {{ // K group {gi}: [{g.start}:{g.stop}]@{g.bits}")
            out.append(f"      float c[4] = {{0.f, 0.f, 0.f, 0.f}}; u32 a[{nch}][4];")
            out.append(f"      const unsigned char* p0 = k0 + {co} + tig * {L}; const unsigned char* p1 = p0 + 8 * KRB;")
            for i in range(L if L % 2 else 0):  # odd L: one byte per PRMT {b, 0x64, b, 0x64}, pairs of slots
                out.append(f"      {{ u32 t0 = prmt(lds8(p0 + {i}), 0x6400u, 0x5050u), "
                           f"t1 = prmt(lds8(p1 + {i}), 0x6400u, 0x5050u);")
                for k in range(E // 2):
                    kk, hh = divmod(i * (E // 2) + k, 2)
                    (m0, s0), (m1, s1) = _slot(g.bits, 2 * k, True), _slot(g.bits, 2 * k + 1, True)
                    mask2, sub2 = m0 | (m1 << 16), s0 | (s1 << 16)
                    out.append(f"        a[{kk}][{2 * hh}] = hsub2(t0 & {mask2:#010x}u, {sub2:#010x}u); "
                               f"a[{kk}][{2 * hh + 1}] = hsub2(t1 & {mask2:#010x}u, {sub2:#010x}u);")
                out.append("      }")
            for m in range(0 if L % 2 else L // 2):
                out.append(f"      {{ u32 t0 = prmt(lds16(p0 + {2 * m}), 0x6400u, 0x5150u), "
                           f"t1 = prmt(lds16(p1 + {2 * m}), 0x6400u, 0x5150u);")
                for e in range(E):
                    p = m * E + e
                    kk, hh = divmod(p, 2)
                    mask, sub = _slot(g.bits, e, True)
                    mask2, sub2 = mask | (mask << 16), sub | (sub << 16)
                    x0 = "t0" if mask2 == 0x64FF64FF else f"(t0 & {mask2:#010x}u)"
                    x1 = "t1" if mask2 == 0x64FF64FF else f"(t1 & {mask2:#010x}u)"
                    out.append(f"        a[{kk}][{2 * hh}] = hsub2({x0}, {sub2:#010x}u); "
                               f"a[{kk}][{2 * hh + 1}] = hsub2({x1}, {sub2:#010x}u);")
                out.append("      }")
            for kk in range(nch):
                out.append(f"      mma(c, a[{kk}][0], a[{kk}][1], a[{kk}][2], a[{kk}][3], bq[{kk0 + kk}][0], "
                           f"bq[{kk0 + kk}][1]);")
            if g.stores_scale:
                out.append(f"      float z0 = h2f(lds16(k0 + {so})), z1 = h2f(lds16(k0 + 8 * KRB + {so}));")
            else:
                out.append("      const float z0 = 1.f, z1 = 1.f;")
            out.append(f"      s0 += z0 * (c[0] + hq[{gi}][0]); s1 += z0 * (c[1] + hq[{gi}][1]); "
                       f"s2 += z1 * (c[2] + hq[{gi}][0]); s3 += z1 * (c[3] + hq[{gi}][1]);")
            out.append("    }")
        return "\n".join(out)

    def _v_accumulate(self) -> str:
        out = []
        for gi, g, E, co, so, nch, kk0 in _coded(self.vl):
            Lp = g.n * g.bits // 64
            out.append(f"    {{ // V group {gi}: [{g.start}:{g.stop}]@{g.bits}")
            out.append("      float q0 = p[mt][0], q1 = p[mt][1], q2 = p[mt][2], q3 = p[mt][3];")
            if g.stores_scale:
                out.append(f"      float z0 = h2f(lds16(vg + {so})), z1 = h2f(lds16(vg + 8 * VRB + {so}));")
                out.append("      q0 *= z0; q1 *= z0; q2 *= z1; q3 *= z1;")
            out.append(f"      spv[{gi}][0] += q0 + q2; spv[{gi}][1] += q1 + q3;")
            out.append("      u32 b0 = movm(pack_h2(q0, q1)), b1 = movm(pack_h2(q2, q3));")
            out.append(f"      u32 a[{nch}][4];")
            out.append(f"      const unsigned char* pa = vt + {co} + gid * {Lp}; const unsigned char* pb = pa + VRB;")
            out.append("      const unsigned char* pc = pa + 8 * VRB; const unsigned char* pd = pc + VRB;")
            unit = 2 if Lp % 2 == 0 else 1  # odd Lp: gid * Lp is odd, 16-bit loads would be misaligned
            ld = "lds16" if unit == 2 else "lds8"
            for u in range(Lp // unit):
                out.append(f"      {{ u32 xa = {ld}(pa + {unit * u}), xb = {ld}(pb + {unit * u}), "
                           f"xc = {ld}(pc + {unit * u}), xd = {ld}(pd + {unit * u});")
                for k in range(unit):
                    i = unit * u + k
                    sel = "0x5511u" if k else "0x4400u"
                    out.append(f"        {{ u32 y01 = prmt(xa, xb, {sel}), y89 = prmt(xc, xd, {sel});")
                    for e in range(E):
                        kk, hh = divmod(i * E + e, 2)
                        msk, sub = _slot(g.bits, e, False)
                        msk2, sub2 = msk | (msk << 16), sub | (sub << 16)
                        out.append(f"          a[{kk}][{hh}] = hsub2(and_or(y01, {msk2:#010x}u), {sub2:#010x}u); "
                                   f"a[{kk}][{2 + hh}] = hsub2(and_or(y89, {msk2:#010x}u), {sub2:#010x}u);")
                    out.append("        }")
                out.append("      }")
            for kk in range(nch):
                out.append(f"      mma(acc[{kk0 + kk}], a[{kk}][0], a[{kk}][1], a[{kk}][2], a[{kk}][3], b0, b1);")
            out.append("    }")
        return "\n".join(out)

    def _hq(self) -> str:
        """0.5 * sum_j q'_j per K group, for head gid (this lane's B fragment), then for heads 2tig, 2tig+1."""
        out = []
        for gi, g in enumerate(self.kl.groups):
            if not g.bits:
                out.append(f"  hq[{gi}][0] = 0.f; hq[{gi}][1] = 0.f;")
                continue
            E, L = 8 // g.bits, g.n * g.bits // 32
            terms = []
            for kk in range(g.n // 16):
                for hh in range(2):
                    r = f"bq[{g.start // 16 + kk}][{hh}]"
                    if L % 2:  # lanes hold slots 2k and 2k + 1
                        k = (2 * kk + hh) % (E // 2)
                        terms.append(f"{float(2 ** (g.bits * 2 * k))!r}f * h2f({r} & 0xffffu) + "
                                     f"{float(2 ** (g.bits * (2 * k + 1)))!r}f * h2f({r} >> 16)")
                    else:
                        e = (2 * kk + hh) % E
                        terms.append(f"{float(2 ** (g.bits * e))!r}f * h2sum({r})")
            out.append(f"  {{ float s = {' + '.join(terms)};")
            out.append("    s += __shfl_xor_sync(0xffffffffu, s, 1); s += __shfl_xor_sync(0xffffffffu, s, 2);")
            out.append(f"    hq[{gi}][0] = 0.5f * __shfl_sync(0xffffffffu, s, 8 * tig); "
                       f"hq[{gi}][1] = 0.5f * __shfl_sync(0xffffffffu, s, 8 * tig + 4); }}")
        return "\n".join(out)

    def _write_slots(self):
        """(slot, K or V, group, code offset, scale offset, base in wx, first thread) per coded group."""
        out, slot, t0 = [], 0, 0
        for kind, lay, base in (("k", self.kl, 0), ("v", self.vl, self.D)):
            for g, co, so in zip(lay.groups, lay.code_offsets(), lay.scale_offsets()):
                if g.bits:
                    out.append((slot, kind, g, co, so, base, t0))
                    slot, t0 = slot + 1, t0 + g.code_bytes
        return out

    def _write_codes(self) -> str:
        """Thread t0 + i packs code byte i of its group (8 / bits codes, code e at bit bits * e), from the group's
        token scale (its 16-blocks' sums of squares added in a fixed order); thread t0 also stores the scale."""
        out = []
        for slot, kind, g, co, so, base, t0 in self._write_slots():
            E, nb = 8 // g.bits, g.code_bytes
            inv = struct.unpack("<I", struct.pack("<f", 1.0 / g.step))[0]
            half, maxc = float(1 << (g.bits - 1)), float((1 << g.bits) - 1)
            blocks = " + ".join(f"wblk[{(base + j) // 16}]" for j in range(g.start, g.stop, 16))
            out.append(f"  if (ok && tid >= {t0} && tid < {t0 + nb}) {{ // {kind.upper()} [{g.start}:{g.stop}]@{g.bits}")
            out.append(f"    float sc = __fsqrt_rn(__fdiv_rn({blocks}, {float(g.n)!r}f)); sc = sc > 65504.f ? 65504.f : sc;")
            out.append('    unsigned short hs; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hs) : "f"(sc)); '
                       "const float sf = h2f(hs), dv = sf > 0.f ? sf : 1.f;")
            out.append(f"    const int i = tid - {t0}; u32 byte = 0;")
            out.append("#pragma unroll")
            out.append(f"    for (int e = 0; e < {E}; ++e) {{")
            out.append(f"      float cf = floorf(__fmul_rn(__fdiv_rn(wx[{base + g.start} + i * {E} + e], dv), "
                       f"__int_as_float({inv:#010x})) + {half!r}f);")
            out.append(f"      cf = cf != cf ? 0.f : (cf < 0.f ? 0.f : (cf > {maxc!r}f ? {maxc!r}f : cf));")
            out.append(f"      byte |= ((u32)cf) << ({g.bits} * e);")
            out.append("    }")
            out.append(f"    {kind}row[{co} + i] = (unsigned char)byte;")
            out.append(f"    if (i == 0) {{ {kind}row[{so}] = (unsigned char)(hs & 0xffu); "
                       f"{kind}row[{so + 1}] = (unsigned char)(hs >> 8); }}")
            out.append("  }")
        return "\n".join(out)

    def _source(self) -> str:
        D, G = self.D, self.G
        ngk = len(self.kl.groups)
        zero = " ".join(f"*(unsigned short*)(row + {so}) = 0;" for g, so in zip(self.vl.groups, self.vl.scale_offsets())
                        if g.stores_scale)
        return _template().substitute(ZEROV=zero or "(void)row;",
            W=self.W, STAGES=self.S, D=D, G=G, QS=self.qs, KRB=self.krb, VRB=self.vrb, NCH=D // 16, NGK=ngk, NGV=self.ngv,
            KBYTES=self.kbytes, VBYTES=self.vbytes, STAGE_BYTES=self.stage_bytes, TN=TN,
            HQ=self._hq(), KSCORES=self._k_scores(), VACC=self._v_accumulate(),
            KMAP=", ".join(map(str, self.kmap)), WCODES=self._write_codes())

    # -- launch -------------------------------------------------------------------------------
    def compiled(self, name: str):
        """The NVRTC-compiled kernel `name` of this plan's source (one of KERNELS). The first call compiles all
        of them: one NVRTC compile and one module load (`_compile_all`), else one `torch.cuda._compile_kernel`
        per kernel where torch's private NVRTC helpers differ from what `_compile_all` expects."""
        if not self._kernels:
            ks = _compile_all(self.source) or {n: torch.cuda._compile_kernel(self.source, n) for n in KERNELS}
            if self.smem >= 48 * 1024:
                k = ks["sq_fast_decode"]
                if hasattr(k, "set_shared_memory_config"):
                    k.set_shared_memory_config(self.smem)
                else:  # older torch: raise the dynamic shared-memory limit through the driver API
                    lib = torch.cuda._utils._get_gpu_runtime_library()
                    if lib.cuFuncSetAttribute(k.func, 8, self.smem) != 0:  # MAX_DYNAMIC_SHARED_SIZE_BYTES
                        raise RuntimeError(f"cannot give the decode kernel {self.smem} bytes of shared memory")
            self._kernels = ks
        return self._kernels[name]

    def tables(self, device):
        key = str(device)

        def make():
            i32 = dict(dtype=torch.int32, device=device)
            return dict(
                kmap=torch.tensor(self.kmap, dtype=torch.long, device=device),
                kpow=torch.tensor(self.kpow, dtype=torch.float32, device=device),
                vmap=torch.tensor(self.vmap, dtype=torch.long, device=device),
                vmeta=torch.tensor([j + 65536 * gi for j, gi in zip(self.vmap, self.vgrp)], **i32),
                vpow=torch.tensor(self.vpow, dtype=torch.float32, device=device))

        return _cached(self._dev, key, make)


CUDA_SOURCE = Path(__file__).parent / "csrc" / "decode_attention_fast.cu"


@lru_cache(maxsize=1)
def _template() -> string.Template:
    """The kernels' CUDA source (`csrc/decode_attention_fast.cu`), a template `_Plan._source` fills per layout."""
    return string.Template(CUDA_SOURCE.read_text())


KERNELS = ("sq_fast_query", "sq_fast_decode", "sq_fast_merge", "sq_fast_query_write")


def _compile_all(source: str) -> dict:
    """{name: kernel} for KERNELS from one NVRTC compile of `source` and one module load (they are extern "C",
    so the PTX holds all of them under their own names), through torch's private `_nvrtc_compile` and
    `_cuda_load_module`. {} when those helpers do not take these arguments (they are private and have changed
    between torch versions): `_Plan.compiled` then compiles each kernel on its own."""
    try:
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

        ptx = _nvrtc_compile(source, KERNELS[1])[0]
        mods = _cuda_load_module(ptx, list(KERNELS))
        if not isinstance(mods, dict) or any(n not in mods for n in KERNELS):
            raise TypeError(f"_cuda_load_module returned {type(mods).__name__}")
    except (ImportError, TypeError, AttributeError, KeyError, IndexError) as exc:
        log.info("one-compile NVRTC path unavailable (%s: %s); compiling each kernel", type(exc).__name__, exc)
        return {}
    return {n: mods[n] for n in KERNELS}


@lru_cache(maxsize=64)
def plan(D: int, G: int, kspec: str, vspec: str, warps: int, stages: int) -> _Plan:
    return _Plan(D, G, FastLayout.from_spec(D, kspec), FastLayout.from_spec(D, vspec), warps, stages)


_QCACHE: dict = {}
_PINNED: dict = {}  # (id(cache), key) -> the tensors an entry's key names by address, kept alive with the entry


def _cached(cache: dict, key, make, pinned: tuple = ()):
    """cache[key], made by `_persistent(make)` on a miss. A miss inside a stream capture (a graph recorded
    before any eager call with these constants, or cudagraph trees copying a non-static input into the pool)
    returns make() uncached: a graph-owned temporary, recomputed at every replay.

    Keys that name tensors by address (`_tensor_key`) hold those tensors in the entry (`pinned`): while an
    entry lives, its tensors' memory cannot be freed and handed to another tensor (another compile's basis
    at the same address and version would otherwise read this entry)."""
    v = cache.get(key)
    if v is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return make()
        if len(cache) > 256:
            cache.clear()
            for k in [k for k in _PINNED if k[0] == id(cache)]:
                del _PINNED[k]
        v = cache[key] = _persistent(make)
        if pinned:
            _PINNED[id(cache), key] = pinned
    return v


def _tensor_key(t: torch.Tensor) -> tuple:
    """A cache key for a constant tensor's contents: its address, layout and version (bumped by in-place writes).
    Unambiguous only while the tensor is alive: pass it to `_cached(..., pinned=)`."""
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride(), t._version)


def _persistent(make):
    """make() -> tensor(s) that this module keeps across calls, allocated from the default CUDA pool even
    while Inductor's cudagraph trees warm up a graph: that routes every allocation of the calling thread to
    the graph's private pool and then fails on live pool tensors that are not graph outputs ("Detected N
    tensor(s) in the cudagraph pool not tracked as outputs"). So make() runs on a helper thread (one-time
    cost per cache entry), ordered after and before the caller's stream by two synchronizations."""
    if not torch.cuda.is_available():
        return make()
    dev = torch.cuda.current_device()
    torch.cuda.current_stream().synchronize()
    out: list = []

    def run():
        with torch.cuda.device(dev):
            try:
                out.append(("ok", make()))
            except BaseException as exc:  # re-raised on the caller's thread
                out.append(("err", exc))
            torch.cuda.synchronize()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    kind, val = out[0]
    if kind == "err":
        raise val
    return val


def _query_matrix(pl: _Plan, k_basis, k_factor, scale: float):
    """(M [Hkv, d, d] with q'' = q @ M: storage basis, fragment column order, step x channel scale, the
    softmax scale, log2(e) and 2^(-b e) folded in; FAC [Hkv, d], the factor of each column of M), cached per
    constant tensors and scale."""
    key = (id(pl), _tensor_key(k_basis), _tensor_key(k_factor), float(scale))

    def make():
        t = pl.tables(k_basis.device)
        fac = (k_factor.float()[:, t["kmap"]] * t["kpow"] * (float(scale) * LOG2E)).contiguous()  # [Hkv, d]
        return (k_basis.float()[:, t["kmap"], :].transpose(1, 2) * fac[:, None, :]).contiguous(), fac

    return _cached(_QCACHE, key, make, pinned=(k_basis, k_factor))


_LIBCUDA: list = []


class _Args:
    """A kernel's parameter block, built once per launch configuration: each call only stores the new
    pointers and ints into it (torch's `_CudaKernel.__call__` reopens libcuda and rebuilds the block on
    every launch)."""

    def __init__(self, kinds: str):  # "p" pointer, "i" int32 per parameter
        self.vals = [ctypes.c_void_p() if k == "p" else ctypes.c_int() for k in kinds]
        self.arr = (ctypes.c_void_p * len(kinds))(*[ctypes.addressof(v) for v in self.vals])

    def set(self, args) -> "_Args":
        for v, a in zip(self.vals, args):
            v.value = a.data_ptr() if isinstance(a, torch.Tensor) else a
        return self


def _launch(kernel, grid, block, smem: int, params: _Args) -> None:
    """cuLaunchKernel through one cached ctypes handle."""
    if not _LIBCUDA:
        _LIBCUDA.append(ctypes.CDLL("libcuda.so.1").cuLaunchKernel)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    rc = _LIBCUDA[0](kernel.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem, stream, params.arr,
                     None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernel failed with CUDA error {rc}")


def default_splits(rows: int, tiles: int, warps: int, per_sm: int, sms: int) -> int:
    """Splits of the token axis for `rows` (batch, kv-head) pairs: whole waves (at most per_sm CTAs on every SM,
    rounded down: rounding up left a third CTA on some SMs, 12-14% slower on an H100), >= 2 tiles per warp,
    1..256."""
    return max(1, min(max(per_sm, 1) * sms // rows, -(-tiles // (2 * warps)), 256))


_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # the kernels' dtype codes (`ldf`)


class _Launch:
    """Everything about a call that depends only on shapes, layouts and options (cached per such key)."""

    def __init__(self, q, k_packed, k_groups, v_groups, num_splits, warps, stages, per_sm, specs=None):
        B, Hq, D = q.shape
        Hkv, T = k_packed.shape[1], k_packed.shape[2]
        G = Hq // Hkv
        kl = FastLayout.from_flat(D, k_groups, [1.0] * (len(k_groups) // 4))
        vl = FastLayout.from_flat(D, v_groups, [1.0] * (len(v_groups) // 4))
        if specs is not None:  # a write needs the layouts' level steps (the decode kernel takes them in k/v_factor)
            kw, vw = (FastLayout.from_spec(D, sp) for sp in specs)
            if kw.flat_groups() != list(k_groups) or vw.flat_groups() != list(v_groups):
                raise ValueError("the write's layouts must have the groups of k_groups / v_groups")
            kl, vl = kw, vw
            why = write_supported(kl, vl, D, (B, Hkv, 1, D))
            if why is not None:
                raise ValueError(f"decode_attention_fast_cuda write: {why}")
        why = supports(kl, vl, D, G, T)
        if why is not None:
            raise ValueError(f"decode_attention_fast_cuda: {why}")
        self.qdt = _DTYPES.get(q.dtype)
        if self.qdt is None:
            raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
        self.pl = pl = plan(D, G, kl.spec(), vl.spec(), warps, stages)
        self.t = pl.tables(q.device)
        tiles = -(-T // TN)
        if num_splits <= 0:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = default_splits(B * Hkv, tiles, warps, per_sm, sms)
        self.tps = -(-tiles // num_splits)
        self.nsplit = -(-tiles // self.tps)
        self.B, self.Hq, self.D, self.Hkv, self.T, self.warps = B, Hq, D, Hkv, T, warps
        dev = q.device
        self.qf = torch.empty(B, Hq, D, device=dev, dtype=torch.float16)  # scratch, reused by every call
        self.op = torch.empty(B, Hq, self.nsplit, D, device=dev, dtype=torch.float32)
        self.lse = torch.empty(B, Hq, self.nsplit, device=dev, dtype=torch.float32)
        self.qkernel, self.kernel, self.mkernel, self.wkernel = (pl.compiled(n) for n in KERNELS)
        self.qargs, self.args, self.margs = _Args("pppii"), _Args("pppppppppp" + "iiiii" + "pi"), _Args("pppiippi")
        self.wargs = _Args("pppii" + "ppppppp" + "iiiiiiii")


_LAUNCHES: dict = {}


def write_supported(kl: FastLayout, vl: FastLayout, head_dim: int, key_shape) -> Optional[str]:
    """None when `decode_attention_fast_cuda(..., write=...)` can store the new token in its query launch."""
    if len(key_shape) != 4 or key_shape[2] != 1:
        return f"the fused write takes one new token per sequence ([B, Hkv, 1, d]), got {tuple(key_shape)}"
    if any(g.bits and g.scale != "token" for g in kl.groups + vl.groups):
        return "the fused write takes token-scaled groups only"
    if head_dim % 32:
        return f"head_dim {head_dim} is not a multiple of 32 (the write reduces whole warps)"
    if sum(g.code_bytes for g in kl.groups + vl.groups) > head_dim * _query_slices(head_dim):
        return "more code bytes than the query launch has threads"
    return None


def _write_args(st, k_basis, write):
    """The new token's tensors as the write kernel takes them (the layouts were checked with the launch)."""
    key, v_store, positions, w_basis, k_mean = write[:5]
    if w_basis is not k_basis and (w_basis.data_ptr() != k_basis.data_ptr() or w_basis.shape != k_basis.shape):
        raise ValueError("decode_attention_fast_cuda write: the key basis of the write must be k_basis (the "
                         "kernel rotates the key with the query matrix built from it)")
    shape = (st.B, st.Hkv, 1, st.D)
    if tuple(key.shape) != shape or tuple(v_store.shape) != shape:
        raise ValueError(f"decode_attention_fast_cuda write: key and v_store must be {shape}, got "
                         f"{tuple(key.shape)} / {tuple(v_store.shape)}")
    if key.dtype not in _DTYPES or v_store.dtype not in _DTYPES:
        raise ValueError(f"key/v_store must be float16, bfloat16 or float32, got {key.dtype}/{v_store.dtype}")
    if key.stride(-1) != 1:
        key = key.contiguous()
    if v_store.stride(-1) != 1:
        v_store = v_store.contiguous()
    if positions.numel() != 1 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be one int32/int64 position, got {positions.dtype} {tuple(positions.shape)}")
    if tuple(k_mean.shape) != (st.Hkv, st.D) or k_mean.dtype != torch.float32 or not k_mean.is_contiguous():
        k_mean = k_mean.to(torch.float32).reshape(st.Hkv, st.D).contiguous()
    return key, v_store, positions, k_mean


def decode_attention_fast_cuda(
    q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, lengths: torch.Tensor,
    k_basis: torch.Tensor, k_factor: torch.Tensor, v_factor: torch.Tensor,
    k_groups: list[int], v_groups: list[int], scale: float, kv_mask: Optional[torch.Tensor] = None,
    num_splits: int = 0, warps: int = 8, stages: int = 2, per_sm: int = 2, poison: bool = False,
    write: Optional[tuple] = None, sink_score: Optional[torch.Tensor] = None,
    sink_value: Optional[torch.Tensor] = None, sink_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same arguments and result as `decode_attention_fast_reference`; CUDA tensors only. Defaults from
    benchmarks/decode_attention_cuda.py on an H100: 8 warps, 2 stages, and at most `per_sm` = 2
    CTAs per SM, rounded down so that B * kv-heads * splits CTAs fill the SMs evenly (B=8, 8 kv-heads on 132 SMs:
    4 splits, 256 CTAs; rounding up to 5 left a third CTA on some SMs: 4 warps, 4 stages, 5 splits was 14% slower
    at 4K and 12% at 64K). `num_splits` > 0 fixes the count. Three launches: the query
    transform, the split kernel, the merge (merging in the split kernel's last CTA per (batch, kv-head)
    was 10-25% slower on an H200: 64 CTAs do all the merging at the end).

    write = (key, v_store, positions, k_basis, k_mean, k_layout, v_layout) first stores one new token per
    sequence ([B, Hkv, 1, d] key and storage-basis value, positions [1]) into k_packed / v_packed as
    `sqcompile::quantize_write_fast` does, inside the query transform's launch (`write_supported` says when).
    sink_score [B, Hq] / sink_value [B, Hkv or Hq, d] / sink_pos [B] or [B, S]: the exact tokens
    (`sqcompile.kernels.sink`: the sink and the outlier tokens, merged into one split): the split kernel skips
    their packed copies at sink_pos (at most `sink.MAX_SLOTS` per row), the merge launch takes them as one more split."""
    specs = None if write is None else (str(write[5]), str(write[6]))
    key = (tuple(q.shape), q.dtype, q.device, tuple(k_packed.shape), tuple(k_groups), tuple(v_groups), num_splits,
           warps, stages, per_sm, specs)
    st = _cached(_LAUNCHES, key, lambda: _Launch(q, k_packed, k_groups, v_groups, num_splits, warps, stages, per_sm,
                                                 specs))
    pl, t = st.pl, st.t
    if not k_packed.is_contiguous():
        k_packed = k_packed.contiguous()
    if not v_packed.is_contiguous():
        v_packed = v_packed.contiguous()
    if k_packed.data_ptr() % 16 or v_packed.data_ptr() % 16 or v_packed.shape[:3] != k_packed.shape[:3]:
        raise ValueError("packed caches must be 16-byte aligned and of one [B, kv_heads, capacity] shape")
    if not q.is_contiguous():
        q = q.contiguous()
    qm, fac = _query_matrix(pl, k_basis, k_factor, scale)
    if write is None:
        _launch(st.qkernel, (st.B * st.Hkv, 1, 1), (st.D, pl.qs, 1), 0, st.qargs.set((q, qm, st.qf, st.Hkv, st.qdt)))
    else:  # the key is rotated with M (so by k_basis: the write's own basis must be that tensor)
        key, v_store, positions, k_mean = _write_args(st, k_basis, write)
        _launch(st.wkernel, (st.B * st.Hkv, 1, 1), (st.D, pl.qs, 1), 0, st.wargs.set((
            q, qm, st.qf, st.Hkv, st.qdt, key, v_store, k_packed, v_packed, positions, fac, k_mean, st.T,
            _DTYPES[key.dtype], _DTYPES[v_store.dtype], int(positions.dtype == torch.int64),
            key.stride(0), key.stride(1), v_store.stride(0), v_store.stride(1))))
    vkey = ("v", id(pl), _tensor_key(v_factor))
    vf = _cached(_QCACHE, vkey, lambda: v_factor.float()[:, t["vmap"]].contiguous(), pinned=(v_factor,))  # [Hkv, d] factor per kernel row
    out = torch.empty(st.B, st.Hq, st.D, device=q.device, dtype=q.dtype)
    if poison:
        st.op.fill_(float("nan")), st.lse.fill_(float("nan")), out.fill_(float("nan"))
    if kv_mask is not None:
        kv_mask = kv_mask.to(torch.uint8).expand(st.B, st.T).contiguous()
    if lengths.dtype != torch.int32 or lengths.device != q.device or not lengths.is_contiguous():
        lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    sink_score, sink_value, sink_pos = check_sink(q, sink_score, sink_value, sink_pos, st.Hkv)
    STATS["calls"] += 1
    _launch(st.kernel, (st.B * st.Hkv, st.nsplit, 1), (32 * st.warps, 1, 1), pl.smem,
            st.args.set((st.qf, k_packed, v_packed, lengths, kv_mask if kv_mask is not None else lengths, vf,
                         t["vpow"], t["vmeta"], st.op, st.lse, st.T, st.Hkv, st.nsplit, st.tps,
                         int(kv_mask is not None), 0 if sink_pos is None else sink_pos,
                         0 if sink_pos is None else sink_pos.shape[1])))
    _launch(st.mkernel, (st.B * st.Hq, 1, 1), (st.D, 1, 1), 0, st.margs.set((
        st.op, st.lse, out, st.nsplit, st.qdt, 0 if sink_score is None else sink_score,
        0 if sink_value is None else sink_value, 1 if sink_value is None else st.Hq // sink_value.shape[1])))
    return out





# ---------------------------------------------------------------------------------------------
# selection and the opaque op
# ---------------------------------------------------------------------------------------------

_BROKEN: dict = {}


_AVAILABLE: dict = {}


def available(q: torch.Tensor, k_packed: torch.Tensor, k_groups, v_groups, choice: str = "auto") -> Optional[str]:
    """None when `decode_attention_fast` should run the CUDA kernel for these inputs, else why not. choice: "auto"
    (why not, or None), "cuda" (why not is an error), "triton" (never)."""
    key = (choice, q.device.type, tuple(q.shape), tuple(k_packed.shape), tuple(k_groups), tuple(v_groups))
    try:
        hit = key in _AVAILABLE
    except TypeError:  # symbolic shapes while tracing
        hit, key = False, None
    if hit:
        return _AVAILABLE[key]
    why = _available(choice, q, k_packed, k_groups, v_groups)
    if key is not None and not _BROKEN:
        _AVAILABLE[key] = why
    return why


def _available(choice: str, q, k_packed, k_groups, v_groups) -> Optional[str]:
    if choice not in ("auto", "cuda", "triton"):
        raise ValueError(f"the CUDA decode kernel's choice must be auto, cuda or triton, got {choice!r}")
    if choice == "triton":
        return "the Triton kernel was chosen"
    if q.device.type != "cuda" or not hasattr(torch.cuda, "_compile_kernel"):
        why = "needs a CUDA device and torch.cuda._compile_kernel (NVRTC)"
    else:
        D, Hkv = q.shape[-1], k_packed.shape[1]
        kl = FastLayout.from_flat(D, k_groups, [1.0] * (len(k_groups) // 4))
        vl = FastLayout.from_flat(D, v_groups, [1.0] * (len(v_groups) // 4))
        why = supports(kl, vl, D, q.shape[1] // Hkv, k_packed.shape[2]) or _BROKEN.get((kl.spec(), vl.spec()))
    if why is not None and choice == "cuda":
        raise ValueError(f"the CUDA decode kernel was chosen but cannot run: {why}")
    return why


_LIB = torch.library.Library("sqcompile", "FRAGMENT")  # noqa: TOR901  (defines into the shared namespace)
_LIB.define("decode_attention_fast_cuda(Tensor q, Tensor k_packed, Tensor v_packed, Tensor lengths, Tensor k_basis, "
            "Tensor k_factor, Tensor v_factor, int[] k_groups, int[] v_groups, float scale, Tensor? kv_mask=None, "
            "Tensor? sink_score=None, Tensor? sink_value=None, Tensor? sink_pos=None) -> Tensor")


def decode_attention_fast_cuda_op(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups, v_groups,
                                  scale, kv_mask=None, sink_score=None, sink_value=None, sink_pos=None):
    """`decode_attention_fast_cuda` as an opaque op (the kernel launches through ctypes, which tracing cannot
    see into); `decode_attention_fast` calls it when `available` returns None. Registered with
    torch.library.Library rather than `custom_op`: the latter's Python wrappers cost ~0.2 ms of host time per
    call under cProfile on an H200 (2.79 -> 2.41 ms per 2-layer decode step)."""
    try:
        return decode_attention_fast_cuda(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups,
                                          v_groups, scale, kv_mask=kv_mask, sink_score=sink_score,
                                          sink_value=sink_value, sink_pos=sink_pos)
    except RuntimeError as exc:  # NVRTC or the driver refused the kernel: remember, use the Triton kernel
        D = q.shape[-1]
        key = (FastLayout.from_flat(D, k_groups, [1.0] * (len(k_groups) // 4)).spec(),
               FastLayout.from_flat(D, v_groups, [1.0] * (len(v_groups) // 4)).spec())
        _BROKEN[key] = f"the CUDA kernel failed: {exc}"
        _AVAILABLE.clear()
        log.warning("CUDA decode kernel unavailable (%s); using the Triton kernel", exc)
        return torch.ops.sqcompile.decode_attention_fast(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor,
                                                         k_groups, v_groups, scale, kv_mask=kv_mask,
                                                         sink_score=sink_score, sink_value=sink_value,
                                                         sink_pos=sink_pos, impl="triton")


_LIB.impl("decode_attention_fast_cuda", decode_attention_fast_cuda_op, "CUDA")
_LIB.define("decode_attention_fast_cuda_write(Tensor q, Tensor(a!) k_packed, Tensor(b!) v_packed, Tensor lengths, "
            "Tensor k_basis, Tensor k_factor, Tensor v_factor, int[] k_groups, int[] v_groups, float scale, "
            "Tensor key, Tensor v_store, Tensor positions, Tensor k_mean, str k_layout, str v_layout, "
            "Tensor? kv_mask=None, Tensor? sink_score=None, Tensor? sink_value=None, Tensor? sink_pos=None) -> Tensor")


def decode_attention_fast_cuda_write_op(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups,
                                        v_groups, scale, key, v_store, positions, k_mean, k_layout, v_layout,
                                        kv_mask=None, sink_score=None, sink_value=None, sink_pos=None):
    """`decode_attention_fast_cuda` with the decode step's write in its first launch (see
    `sqcompile::decode_attention_fast_write`, which calls this where `write_supported` allows)."""
    try:
        return decode_attention_fast_cuda(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups,
                                          v_groups, scale, kv_mask=kv_mask,
                                          write=(key, v_store, positions, k_basis, k_mean, k_layout, v_layout),
                                          sink_score=sink_score, sink_value=sink_value, sink_pos=sink_pos)
    except RuntimeError as exc:  # NVRTC or the driver refused the kernel (before any launch): write, then attend
        log.warning("CUDA decode kernel with the fused write unavailable (%s); writing and attending apart", exc)
        torch.ops.sqcompile.quantize_write_fast(key, v_store, k_packed, v_packed, positions, k_basis, k_mean,
                                                k_layout, v_layout)
        return decode_attention_fast_cuda_op(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups,
                                             v_groups, scale, kv_mask, sink_score, sink_value, sink_pos)


_LIB.impl("decode_attention_fast_cuda_write", decode_attention_fast_cuda_write_op, "CUDA")


@torch.library.register_fake("sqcompile::decode_attention_fast_cuda")
def _(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups, v_groups, scale, kv_mask=None,
      sink_score=None, sink_value=None, sink_pos=None):
    return torch.empty_like(q)


@torch.library.register_fake("sqcompile::decode_attention_fast_cuda_write")
def _(q, k_packed, v_packed, lengths, k_basis, k_factor, v_factor, k_groups, v_groups, scale, key, v_store,
      positions, k_mean, k_layout, v_layout, kv_mask=None, sink_score=None, sink_value=None, sink_pos=None):
    return torch.empty_like(q)
