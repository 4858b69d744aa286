// Per-token symmetric INT8 activation quantization, fused with RMSNorm, residual add + RMSNorm or SiLU(gate)*up
// (ops.py twins). A row is one CTA, or (CL > 1, sm_90) CL CTAs of a thread-block cluster that each take a slice of
// it and exchange their partial reductions through distributed shared memory, folded in rank order.
// One CTA per row; the row is held in registers (CH chunks of 8 elements per thread) for a single pass over
// global memory. Every fp32 step is the same IEEE op as the torch reference (explicit _rn intrinsics: no FMA
// contraction), division x / s_a is IEEE, rounding half-to-even (__float2int_rn). Writes q [M, Kp] (zero-padded),
// scale fp32 [M] and optionally qsum int32 [M].

#define MODE_QUANT 0
#define MODE_RMSNORM 1
#define MODE_SILU_MUL 2
#define MODE_ADD_RMSNORM 3  // x += res (rounded to x's dtype, written back through x_out), then MODE_RMSNORM

// Block-wide reduction of one value per thread: butterfly within each warp, then every thread folds the warps'
// results in the same order (so every thread gets the same bits). `sh`: THREADS / 32 slots.
struct AddOp { template <typename T> QOQ_DEV T operator()(T a, T b) const { return a + b; } };
struct MaxOp { QOQ_DEV float operator()(float a, float b) const { return fmaxf(a, b); } };

template <int THREADS, typename T, typename Op>
QOQ_DEV T block_reduce(T v, T* sh, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  T r = sh[0];
#pragma unroll
  for (int w = 1; w < THREADS / 32; ++w) r = op(r, sh[w]);
  return r;
}

// 8 consecutive elements [base, base+8) of a row of dtype DT as fp32; elements >= K read as 0
template <int DT>
QOQ_DEV void load8(const void* p, i64 row_off, int base, int K, bool vec, float v[8]) {
  if (vec && base + 8 <= K) {
    if (DT == DT_F32) {
      const float4 a = *(const float4*)((const float*)p + row_off + base);
      const float4 b = *(const float4*)((const float*)p + row_off + base + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 a = *(const uint4*)((const u16*)p + row_off + base);
      const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const u16 lo = (u16)(w[i] & 0xffffu), hi = (u16)(w[i] >> 16);
        v[2 * i] = DT == DT_F16 ? h2f(lo) : bf2f(lo);
        v[2 * i + 1] = DT == DT_F16 ? h2f(hi) : bf2f(hi);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = base + i < K ? ld_any(p, row_off + base + i, DT) : 0.f;
  }
}

// v rounded to dtype DT (the element type of a torch op's result), back in fp32
template <int DT>
QOQ_DEV float round_to(float v) {
  if (DT == DT_F16) return h2f(f2h(v));
  if (DT == DT_BF16) return bf2f(f2bf(v));
  return v;
}

// stores 8 consecutive elements [base, base+8) of a row of dtype DT (elements >= K are not written)
template <int DT>
QOQ_DEV void store8(void* p, i64 row_off, int base, int K, bool vec, const float v[8]) {
  if (vec && base + 8 <= K) {
    if (DT == DT_F32) {
      float4* o = (float4*)((float*)p + row_off + base);
      o[0] = make_float4(v[0], v[1], v[2], v[3]);
      o[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      u32 w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w[i] = DT == DT_F16 ? pack_h2(v[2 * i], v[2 * i + 1])
                            : ((u32)f2bf(v[2 * i]) | ((u32)f2bf(v[2 * i + 1]) << 16));
      *(uint4*)((u16*)p + row_off + base) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (base + i < K) st_any(p, row_off + base + i, DT, v[i]);
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
QOQ_DEV double dsmem_load(u32 a, u32 r, double) { return ld_dsmem_f64(a, r); }
QOQ_DEV float dsmem_load(u32 a, u32 r, float) { return ld_dsmem_f32(a, r); }
QOQ_DEV int dsmem_load(u32 a, u32 r, int) { return ld_dsmem_s32(a, r); }
#endif

// the cluster-wide fold of a value every thread of each CTA holds (its block reduction): CTA ranks in order, so
// every CTA gets the same bits; `slot` is this reduction's own shared word
template <int CL, typename T, typename Op>
QOQ_DEV T cluster_fold(T v, T* slot, Op op) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (CL > 1) {
    if (threadIdx.x == 0) *slot = v;
    cluster_sync();
    const u32 a = smem_u32(slot);
    T r = dsmem_load(a, 0u, v);
#pragma unroll
    for (int c = 1; c < CL; ++c) r = op(r, dsmem_load(a, (u32)c, v));
    return r;
  }
#endif
  return v;
}

template <int DT, int MODE, int CH, int THREADS, int CL>
QOQ_DEV void rowquant_body(const void* __restrict__ x, const void* __restrict__ x2, int dt2, float eps,
                           i8* __restrict__ q, float* __restrict__ scale, int* __restrict__ qsum, int K, int Kp,
                           i64 ldx, i64 ldx2, int vec, const void* __restrict__ res, i64 ldres,
                           void* __restrict__ x_out) {
  pdl_trigger();  // a GEMV launched after this kernel with PDL may start streaming its weights
  __shared__ double shd[32];
  __shared__ float shf[32];
  __shared__ int shi[32];
  __shared__ double xss;
  __shared__ float xamax;
  __shared__ int xqsum;
  const int row = blockIdx.x / CL, rank = CL > 1 ? blockIdx.x % CL : 0, tid = threadIdx.x;
  const int nchunk = Kp >> 3;
  const int j0 = rank * (CH * THREADS);  // this CTA's first chunk of 8 elements
  float v[CH][8];
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int j = j0 + tid + i * THREADS;
    if (j < nchunk) {
      load8<DT>(x, (i64)row * ldx, 8 * j, K, vec != 0, v[i]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[i][e] = 0.f;
    }
  }
  if (MODE == MODE_ADD_RMSNORM) {
    // the residual stream's `x + res` in x's dtype (torch adds in fp32 and rounds once), stored in place
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int j = j0 + tid + i * THREADS;
      if (j < nchunk) {
        float u[8];
        load8<DT>(res, (i64)row * ldres, 8 * j, K, vec != 0, u);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[i][e] = round_to<DT>(__fadd_rn(v[i][e], u[e]));
        store8<DT>(x_out, (i64)row * ldx, 8 * j, K, vec != 0, v[i]);
      }
    }
  }
  if (MODE == MODE_RMSNORM || MODE == MODE_ADD_RMSNORM) {
    // ops.rmsnorm: the sum of squares in fp64 (each square exact, the sum within 1e-16 in any order, so its
    // fp32 rounding is the reference's), then IEEE fp32 sqrt and division: the same bits as the reference
    double ss = 0.0;
#pragma unroll
    for (int i = 0; i < CH; ++i)
#pragma unroll
      for (int e = 0; e < 8; ++e) ss += (double)v[i][e] * (double)v[i][e];
    ss = cluster_fold<CL>(block_reduce<THREADS>(ss, shd, AddOp()), &xss, AddOp());
    const float ms = __double2float_rn(ss / (double)K);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int base = 8 * (j0 + tid + i * THREADS);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float w = base + e < K ? ld_any(x2, base + e, dt2) : 0.f;
        v[i][e] = __fmul_rn(__fmul_rn(v[i][e], r), w);
      }
    }
  } else if (MODE == MODE_SILU_MUL) {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int j = j0 + tid + i * THREADS;
      float u[8];
      if (j < nchunk) {
        load8<DT>(x2, (i64)row * ldx2, 8 * j, K, vec != 0, u);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) u[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float gt = v[i][e];
        const float sig = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-gt)));
        v[i][e] = __fmul_rn(__fmul_rn(gt, sig), u[e]);
      }
    }
  }
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < CH; ++i)
#pragma unroll
    for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(v[i][e]));
  amax = cluster_fold<CL>(block_reduce<THREADS>(amax, shf, MaxOp()), &xamax, MaxOp());
  // torch evaluates `amax / 127` (division by a Python scalar) on CUDA as amax * (1/127)
  const float s = amax > 0.f ? __fmul_rn(amax, 1.0f / 127.0f) : 1.0f;
  int lsum = 0;
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int j = j0 + tid + i * THREADS;
    if (j < nchunk) {
      u32 packed[2] = {0u, 0u};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        int qi = __float2int_rn(__fdiv_rn(v[i][e], s));
        qi = min(127, max(-127, qi));
        lsum += qi;
        packed[e >> 2] |= ((u32)(qi & 0xff)) << (8 * (e & 3));
      }
      *(uint2*)(q + (i64)row * Kp + 8 * j) = make_uint2(packed[0], packed[1]);
    }
  }
  if (qsum) lsum = cluster_fold<CL>(block_reduce<THREADS>(lsum, shi, AddOp()), &xqsum, AddOp());
  if (tid == 0 && rank == 0) {
    scale[row] = s;
    if (qsum) qsum[row] = lsum;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (CL > 1) cluster_sync();  // every CTA keeps its shared memory alive until the others have read it
#endif
}

#define ROWQUANT_PARAMS                                                                                     \
  const void *__restrict__ x, const void *__restrict__ x2, int dt2, float eps, i8 *__restrict__ q, \
      float *__restrict__ scale, int *__restrict__ qsum, int K, int Kp, i64 ldx, i64 ldx2, int vec,         \
      const void *__restrict__ res, i64 ldres, void *__restrict__ x_out
#define ROWQUANT_ARGS x, x2, dt2, eps, q, scale, qsum, K, Kp, ldx, ldx2, vec, res, ldres, x_out
