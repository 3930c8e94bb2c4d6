// Decode attention over the FAST packed cache (sqcompile.kernels.decode_attention_cuda): the CUDA source.
//
// A Python string.Template: its placeholders (a dollar sign and a name in braces) are filled per (head_dim, query
// heads per kv-head, K layout, V layout, warps, stages) by `_Plan._source` in decode_attention_cuda.py: the layout
// constants of the #defines below, and the code that unpacks each coded group (HQ, KSCORES, VACC, WCODES, ZEROV,
// KMAP), generated from the layouts. NVRTC compiles the result; decode_attention_cuda.py's docstring describes the
// kernels.
#define W ${W}
#define STAGES ${STAGES}
#define D ${D}
#define G ${G}
#define QS ${QS}
#define KRB ${KRB}
#define VRB ${VRB}
#define NCH ${NCH}
#define NGK ${NGK}
#define NGV ${NGV}
#define TN ${TN}
#define KBYTES ${KBYTES}
#define VBYTES ${VBYTES}
#define STAGE_BYTES ${STAGE_BYTES}
#define SQ_NINF (-__int_as_float(0x7f800000))
typedef unsigned int u32;

__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r; asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p)); return r; }
__device__ __forceinline__ void cp16(u32 dst, const void* src, int n) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(n)); }
// the first iteration >= from of this warp's tile loop (tiles t_lo + (warp + i * W) * TN) whose tile holds one of the
// nskip positions sk[], or INT_MAX
__device__ __forceinline__ int next_skip(const int* sk, int nskip, int from, int t_lo, int t_hi, int warp) {
  int best = 0x7fffffff;
  for (int j = 0; j < nskip; ++j) {
    const int p = sk[j];
    if (p < t_lo || p >= t_hi) continue;
    const int r = (p - t_lo) / TN - warp;
    if (r < 0 || r % W) continue;
    const int it = r / W;
    if (it >= from && it < best) best = it;
  }
  return best;
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }
__device__ __forceinline__ u32 lds16(const unsigned char* p) { return *(const unsigned short*)p; }
__device__ __forceinline__ u32 lds8(const unsigned char* p) { return *p; }
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
  u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s)); return r; }
__device__ __forceinline__ u32 and_or(u32 a, u32 m) {
  u32 r; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(m), "r"(0x64006400u)); return r; }
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
  u32 r; asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
__device__ __forceinline__ float h2f(u32 h) {
  float f; unsigned short s = (unsigned short)h; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s)); return f; }
__device__ __forceinline__ float h2sum(u32 h) { return h2f(h & 0xffffu) + h2f(h >> 16); }
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
  u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
__device__ __forceinline__ u32 movm(u32 a) {
  u32 r; asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(a)); return r; }
__device__ __forceinline__ float ex2(float x) { float r; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1)); }

// masked tokens: their V scales read as 0 so that p * s stays 0 whatever bytes the slot held
__device__ __forceinline__ void zero_v_scales(unsigned char* row) { ${ZEROV} }
#define KCH (KBYTES / 16)
#define VCH (VBYTES / 16)
// copy one tile (TN rows of K, then of V) into this warp's stage; chunks past the cache capacity read as 0
__device__ __forceinline__ void issue_tile(u32 dst, const unsigned char* ks, const unsigned char* vs, int lane, int t0, int T,
                                           const unsigned char* kplane, const unsigned char* vplane) {
  if (t0 + TN <= T) {
#pragma unroll
    for (int it = 0; it < (KCH + 31) / 32; ++it)
      if (32 * (it + 1) <= KCH || lane + 32 * it < KCH) cp16(dst + 512 * it, ks + 512 * it, 16);
#pragma unroll
    for (int it = 0; it < (VCH + 31) / 32; ++it)
      if (32 * (it + 1) <= VCH || lane + 32 * it < VCH) cp16(dst + KBYTES + 512 * it, vs + 512 * it, 16);
  } else {
    const long long krem = (long long)(T - t0) * KRB - 16 * lane, vrem = (long long)(T - t0) * VRB - 16 * lane;
#pragma unroll
    for (int it = 0; it < (KCH + 31) / 32; ++it)
      if (32 * (it + 1) <= KCH || lane + 32 * it < KCH) {
        const bool ok = 512 * it + 16 <= krem; cp16(dst + 512 * it, ok ? ks + 512 * it : kplane, ok ? 16 : 0); }
#pragma unroll
    for (int it = 0; it < (VCH + 31) / 32; ++it)
      if (32 * (it + 1) <= VCH || lane + 32 * it < VCH) {
        const bool ok = 512 * it + 16 <= vrem; cp16(dst + KBYTES + 512 * it, ok ? vs + 512 * it : vplane, ok ? 16 : 0); }
  }
}

// element `at` of a float16 (dtype 0), bfloat16 (1) or float32 (2) tensor, as float
__device__ __forceinline__ float ldf(const void* p, long long at, int dtype) {
  if (dtype == 0) { float v; unsigned short x = ((const unsigned short*)p)[at]; asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(x)); return v; }
  if (dtype == 1) return __uint_as_float(((u32)((const unsigned short*)p)[at]) << 16);
  return ((const float*)p)[at];
}

// q'' = q @ M (the storage basis, fragment column order and every scale folded into M), fp16 out.
// One CTA per (batch, kv-head), D x QS threads: thread (c, s) sums rows [s D/QS, (s+1) D/QS) of column c for
// the G heads with all its loads of M in flight at once (one column per thread over all D rows was a chain of
// D dependent-latency loads: 7-13 us on an H100), then slice s = 0 adds the QS partial sums.
// WRITE: also wpart[s][c] = slice s of (k - mu) @ M[:, c] for the new key in wk (the same registers of M: the
// write's rotation reads no basis of its own).
struct NewToken { const void* KN; const void* VN; const float* KM; int kdt, vdt, skb, skh, svb, svh; };

template <bool WRITE>
__device__ __forceinline__ void query_transform(const void* __restrict__ Q, const float* __restrict__ M,
    unsigned short* __restrict__ QF, int Hkv, int qdtype, float* wk, float* wx, float* wpart, NewToken nt) {
  __shared__ float qs[G * D];
  __shared__ float part[QS * G * D];
  const int bh = blockIdx.x, h = bh % Hkv, c = threadIdx.x, s = threadIdx.y, tid = s * D + c;
  constexpr int R = D / QS;
  float m[R];
  const float* mh = M + (long long)h * D * D + (long long)(s * R) * D + c;
#pragma unroll
  for (int k = 0; k < R; ++k) m[k] = __ldg(mh + (long long)k * D);
  for (int i = tid; i < G * D; i += D * QS) qs[i] = ldf(Q, (long long)bh * G * D + i, qdtype);
  if (WRITE && tid < D) {  // the new token, loaded after M's loads are in flight
    const int b = bh / Hkv;
    wk[tid] = ldf(nt.KN, (long long)b * nt.skb + (long long)h * nt.skh + tid, nt.kdt) - nt.KM[h * D + tid];
    wx[D + tid] = ldf(nt.VN, (long long)b * nt.svb + (long long)h * nt.svh + tid, nt.vdt);
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < R; ++k) acc += qs[g * D + s * R + k] * m[k];
    part[(s * G + g) * D + c] = acc;
  }
  if (WRITE) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < R; ++k) acc += wk[s * R + k] * m[k];
    wpart[s * D + c] = acc;
  }
  __syncthreads();
  if (s == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int t = 0; t < QS; ++t) acc += part[(t * G + g) * D + c];
      unsigned short r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(acc));
      QF[((long long)bh * G + g) * D + c] = r;
    }
  }
}

extern "C" __global__ void __launch_bounds__(D * QS) sq_fast_query(const void* __restrict__ Q,
    const float* __restrict__ M, unsigned short* __restrict__ QF, int Hkv, int qdtype) {
  query_transform<false>(Q, M, QF, Hkv, qdtype, nullptr, nullptr, nullptr, NewToken{});
}

// fragment column -> storage coordinate of the keys (`_Plan.kmap`)
__device__ const short SQ_KMAP[D] = { ${KMAP} };

// The query transform and, in the same launch, the decode step's cache write: this CTA's (batch, kv-head) row
// of the new token at POS[0] (one token per sequence), what `sqcompile::quantize_write_fast` stores:
// keys (k - mu) @ B^T, from the query matrix M (column c of M is basis row KMAP[c] times FAC[h][c], so
// x[KMAP[c]] = ((k - mu) @ M)[c] / FAC[h][c]), values as they come (already in their storage basis); per
// token-scaled group s = fp16(min(sqrt(mean(x^2)), 65504)), code = clamp(floor(fl(x / s) * fl(1/step)
// + 2^(b-1)), 0, 2^b - 1), NaN -> 0 (IEEE division and square root, a product never fused into an FMA, as the
// Triton write does; the rotation sums in another order, so a code may move one level at a decision boundary).
// Positions outside [0, T) write nothing (the graph's assert reports them).
extern "C" __global__ void __launch_bounds__(D * QS) sq_fast_query_write(const void* __restrict__ Q,
    const float* __restrict__ M, unsigned short* __restrict__ QF, int Hkv, int qdtype,
    const void* __restrict__ KN, const void* __restrict__ VN, unsigned char* __restrict__ KP,
    unsigned char* __restrict__ VP, const void* __restrict__ POS, const float* __restrict__ FAC,
    const float* __restrict__ KM, int T, int kdt, int vdt, int pos64, int skb, int skh, int svb, int svh) {
  __shared__ float wk[D];
  __shared__ float wx[2 * D];
  __shared__ float wpart[QS * D];
  __shared__ float wblk[D / 8];  // sums of squares of 16-coordinate blocks: keys, then values
  const int bh = blockIdx.x, h = bh % Hkv, c = threadIdx.x, s = threadIdx.y, tid = s * D + c;
  const long long pos = pos64 ? ((const long long*)POS)[0] : (long long)((const int*)POS)[0];  // loads issued early
  const float f = s == 0 ? FAC[h * D + c] : 0.f;
  // its first __syncthreads publishes wk and wx, its second wpart (read below by the threads that last wrote QF)
  query_transform<true>(Q, M, QF, Hkv, qdtype, wk, wx, wpart, NewToken{KN, VN, KM, kdt, vdt, skb, skh, svb, svh});
  if (s == 0) {  // thread c: key coordinate KMAP[c], value coordinate c, and the sums of squares of 16-blocks
    float x = 0.f;
#pragma unroll
    for (int t = 0; t < QS; ++t) x += wpart[t * D + c];
    x = f != 0.f ? __fdiv_rn(x, f) : 0.f;  // KMAP keeps every coordinate in its group: blocks of 16 c are one group
    wx[SQ_KMAP[c]] = x;
    const float v = wx[D + c];
    float kk = __fmul_rn(x, x), vv = __fmul_rn(v, v);
#pragma unroll
    for (int o = 8; o; o >>= 1) {
      kk += __shfl_xor_sync(0xffffffffu, kk, o); vv += __shfl_xor_sync(0xffffffffu, vv, o); }
    if ((c & 15) == 0) { wblk[c >> 4] = kk; wblk[D / 16 + (c >> 4)] = vv; }
  }
  __syncthreads();
  const bool ok = pos >= 0 && pos < T;
  unsigned char* krow = KP + ((long long)bh * T + (ok ? pos : 0)) * KRB;
  unsigned char* vrow = VP + ((long long)bh * T + (ok ? pos : 0)) * VRB;
${WCODES}
}

extern "C" __global__ void __launch_bounds__(W * 32) sq_fast_decode(
    const unsigned short* __restrict__ QF, const unsigned char* __restrict__ KP, const unsigned char* __restrict__ VP,
    const int* __restrict__ LEN, const unsigned char* __restrict__ KVM, const float* __restrict__ VF,
    const float* __restrict__ VPOW, const int* __restrict__ VMETA, float* __restrict__ OP, float* __restrict__ LSE,
    int T, int Hkv, int nsplit, int tps, int has_mask, const int* __restrict__ SKIP, int nskip) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int bh = blockIdx.x, b = bh / Hkv, h = bh - b * Hkv, split = blockIdx.y;
  int len = LEN[b]; len = len < T ? len : T; len = len > 0 ? len : 0;
  // the exact tokens' packed copies (sqcompile.kernels.sink: the sink and the outlier tokens; -1: none), read from
  // global memory only in the tiles that hold one: per tile, one compare with the warp's next such tile
  if (!SKIP) nskip = 0;
  const int* skp = SKIP ? SKIP + (long long)b * nskip : SKIP;
  const int t_lo = split * tps * TN;
  int t_hi = t_lo + tps * TN; t_hi = t_hi < len ? t_hi : len;
  const int ntiles = t_hi > t_lo ? (t_hi - t_lo + TN - 1) / TN : 0;
  const int my_n = ntiles > warp ? (ntiles - warp + W - 1) / W : 0;
  int nxt = next_skip(skp, nskip, 0, t_lo, t_hi, warp);
  unsigned char* wsm = smem + warp * (STAGES * STAGE_BYTES);
  const unsigned char* kplane = KP + (long long)bh * T * KRB;
  const unsigned char* vplane = VP + (long long)bh * T * VRB;
  const long long kcap = (long long)T * KRB, vcap = (long long)T * VRB;

  // this lane's first 16-byte chunk of the warp's first tile; a warp's tiles are W * TN tokens apart
  const unsigned char* ksrc = kplane + (long long)(t_lo + warp * TN) * KRB + 16 * lane;
  const unsigned char* vsrc = vplane + (long long)(t_lo + warp * TN) * VRB + 16 * lane;
  const u32 wdst = smem_u32(wsm) + 16 * lane;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < my_n) issue_tile(wdst + s * STAGE_BYTES, ksrc + (long long)s * (W * TN * KRB), vsrc + (long long)s * (W * TN * VRB),
                             lane, t_lo + (warp + s * W) * TN, T, kplane, vplane);
    cp_commit();
  }

  // q'' B fragments (head gid; rows >= G are zero)
  u32 bq[NCH][2];
  {
    const unsigned short* qh = QF + ((long long)(b * Hkv + h) * G + (gid < G ? gid : 0)) * D + 2 * tig;
#pragma unroll
    for (int kk = 0; kk < NCH; ++kk) {
      bq[kk][0] = gid < G ? *(const u32*)(qh + 16 * kk) : 0u;
      bq[kk][1] = gid < G ? *(const u32*)(qh + 16 * kk + 8) : 0u;
    }
  }
  float hq[NGK][2];
${HQ}

  float m0 = SQ_NINF, m1 = SQ_NINF, l0 = 0.f, l1 = 0.f;
  float acc[NCH][4];
#pragma unroll
  for (int kk = 0; kk < NCH; ++kk) { acc[kk][0] = 0.f; acc[kk][1] = 0.f; acc[kk][2] = 0.f; acc[kk][3] = 0.f; }
  float spv[NGV][2];
#pragma unroll
  for (int g = 0; g < NGV; ++g) { spv[g][0] = 0.f; spv[g][1] = 0.f; }

  for (int i = 0; i < my_n; ++i) {
    {
      const int s = i + STAGES - 1;
      if (s < my_n) issue_tile(wdst + (s % STAGES) * STAGE_BYTES, ksrc + (long long)s * (W * TN * KRB),
                               vsrc + (long long)s * (W * TN * VRB), lane, t_lo + (warp + s * W) * TN, T, kplane, vplane);
      cp_commit();
    }
    cp_wait<STAGES - 1>();
    __syncwarp();
    const unsigned char* sk = wsm + (i % STAGES) * STAGE_BYTES;
    const unsigned char* sv = sk + KBYTES;
    const int t0 = t_lo + (warp + i * W) * TN;

    float sc[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const unsigned char* k0 = sk + (mt * 16 + gid) * KRB;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
${KSCORES}
      sc[mt][0] = s0; sc[mt][1] = s1; sc[mt][2] = s2; sc[mt][3] = s3;
    }
    const bool hit = i == nxt;
    if (has_mask || t0 + TN > t_hi || hit) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int tok = t0 + mt * 16 + gid + 8 * r;
          bool ok = tok < t_hi;
          if (hit)
            for (int j = 0; j < nskip; ++j) ok = ok && tok != skp[j];
          if (ok && has_mask) ok = KVM[(long long)b * T + tok] != 0;
          if (!ok) {
            sc[mt][2 * r] = SQ_NINF; sc[mt][2 * r + 1] = SQ_NINF;
            if (tig == 0) zero_v_scales((unsigned char*)sv + (mt * 16 + gid + 8 * r) * VRB);
          }
        }
      }
      __syncwarp();
      if (hit) nxt = next_skip(skp, nskip, i + 1, t_lo, t_hi, warp);
    }
    float x0 = fmaxf(fmaxf(sc[0][0], sc[0][2]), fmaxf(sc[1][0], sc[1][2]));
    float x1 = fmaxf(fmaxf(sc[0][1], sc[0][3]), fmaxf(sc[1][1], sc[1][3]));
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, o)); x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, o)); }
    const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
    const float z0 = n0 == SQ_NINF ? 0.f : n0, z1 = n1 == SQ_NINF ? 0.f : n1;
    const float al0 = ex2(m0 - z0), al1 = ex2(m1 - z1);
    m0 = n0; m1 = n1;
    float p[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      p[mt][0] = ex2(sc[mt][0] - z0); p[mt][1] = ex2(sc[mt][1] - z1);
      p[mt][2] = ex2(sc[mt][2] - z0); p[mt][3] = ex2(sc[mt][3] - z1);
    }
    l0 = l0 * al0 + (p[0][0] + p[0][2]) + (p[1][0] + p[1][2]);
    l1 = l1 * al1 + (p[0][1] + p[0][3]) + (p[1][1] + p[1][3]);
    if (__any_sync(0xffffffffu, (al0 != 1.f) | (al1 != 1.f))) {  // the running max moved (rare after the first tiles)
#pragma unroll
      for (int kk = 0; kk < NCH; ++kk) { acc[kk][0] *= al0; acc[kk][1] *= al1; acc[kk][2] *= al0; acc[kk][3] *= al1; }
#pragma unroll
      for (int g = 0; g < NGV; ++g) { spv[g][0] *= al0; spv[g][1] *= al1; }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const unsigned char* vg = sv + (mt * 16 + gid) * VRB;
      const unsigned char* vt = sv + (mt * 16 + 2 * tig) * VRB;
${VACC}
    }
    __syncwarp();
  }
  cp_wait<0>();

#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o); l1 += __shfl_xor_sync(0xffffffffu, l1, o);
#pragma unroll
    for (int g = 0; g < NGV; ++g) {
      spv[g][0] += __shfl_xor_sync(0xffffffffu, spv[g][0], o); spv[g][1] += __shfl_xor_sync(0xffffffffu, spv[g][1], o); }
  }
  __syncthreads();  // every warp is done with its pipeline buffers
  float* cs = (float*)smem + warp * (D * 8 + 8 * (2 + NGV));
#pragma unroll
  for (int kk = 0; kk < NCH; ++kk) {
    const int r0 = kk * 16 + gid;
    cs[r0 * 8 + 2 * tig] = acc[kk][0]; cs[r0 * 8 + 2 * tig + 1] = acc[kk][1];
    cs[(r0 + 8) * 8 + 2 * tig] = acc[kk][2]; cs[(r0 + 8) * 8 + 2 * tig + 1] = acc[kk][3];
  }
  if (gid == 0) {
    cs[D * 8 + 2 * tig] = m0; cs[D * 8 + 2 * tig + 1] = m1;
    cs[D * 8 + 8 + 2 * tig] = l0; cs[D * 8 + 8 + 2 * tig + 1] = l1;
#pragma unroll
    for (int g = 0; g < NGV; ++g) { cs[D * 8 + 16 + 8 * g + 2 * tig] = spv[g][0]; cs[D * 8 + 16 + 8 * g + 2 * tig + 1] = spv[g][1]; }
  }
  __syncthreads();
  const float* c0 = (const float*)smem;
  const int CW = D * 8 + 8 * (2 + NGV);
  for (int idx = threadIdx.x; idx < G * D; idx += W * 32) {
    const int hd = idx / D, r = idx - hd * D;
    float M = SQ_NINF;
#pragma unroll
    for (int w = 0; w < W; ++w) M = fmaxf(M, c0[w * CW + D * 8 + hd]);
    const int meta = VMETA[r], j = meta & 0xffff, grp = meta >> 16;
    float L = 0.f, A = 0.f, SP = 0.f;
    if (M != SQ_NINF) {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float mw = c0[w * CW + D * 8 + hd];
        const float f = mw == SQ_NINF ? 0.f : ex2(mw - M);
        L += f * c0[w * CW + D * 8 + 8 + hd];
        A += f * c0[w * CW + r * 8 + hd];
        SP += f * c0[w * CW + D * 8 + 16 + 8 * grp + hd];
      }
    }
    const size_t row = ((long long)(b * Hkv + h) * G + hd) * nsplit + split;
    const float o = L > 0.f ? VF[h * D + r] * (VPOW[r] * A + 0.5f * SP) / L : 0.f;
    OP[row * D + j] = o;
    if (r == 0) LSE[row] = L > 0.f ? M + log2f(L) : SQ_NINF;
  }
}

// out[row] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), one CTA per (batch, query head), D threads;
// SINK_S (or null): the exact sink token as one more split, lse SINK_S[row], o SINK_V[row / g] (sqcompile.kernels.sink)
extern "C" __global__ void sq_fast_merge(const float* __restrict__ OP, const float* __restrict__ LSE,
                                         void* __restrict__ OUT, int nsplit, int qdtype,
                                         const float* __restrict__ SINK_S, const float* __restrict__ SINK_V, int g) {
  const int row = blockIdx.x, j = threadIdx.x;
  const float* ls = LSE + (long long)row * nsplit;
  const float ss = SINK_S ? SINK_S[row] : SQ_NINF;
  float M = ss;
  for (int sp = 0; sp < nsplit; ++sp) M = fmaxf(M, ls[sp]);
  float den = 0.f, num = 0.f;
  if (M != SQ_NINF) {
    for (int sp = 0; sp < nsplit; ++sp) {
      if (ls[sp] == SQ_NINF) continue;
      const float w = ex2(ls[sp] - M);
      den += w; num += w * OP[((long long)row * nsplit + sp) * D + j];
    }
    if (ss != SQ_NINF) {
      const float w = ex2(ss - M);
      den += w; num += w * SINK_V[(long long)(row / g) * D + j];
    }
  }
  const float o = den > 0.f ? num / den : 0.f;
  const long long at = (long long)row * D + j;
  if (qdtype == 0) { unsigned short x; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(o)); ((unsigned short*)OUT)[at] = x; }
  else if (qdtype == 1) { unsigned short x; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(o)); ((unsigned short*)OUT)[at] = x; }
  else { ((float*)OUT)[at] = o; }
}
