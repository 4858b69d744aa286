// W4A8 GEMM on INT8 tensor cores (mma.sync.m16n8k32.s8), weights in layout "qserve-mma-m16n8k32-v1".
//
// A: int8 activations [M, Kp] row-major; W: packed uint4 weights, 32x32 (n x k) tiles of 512 contiguous bytes,
// tile (nt, kt) at byte offset (nt * Kp/32 + kt) * 512, lane t owns bytes 16t..16t+15. Word i of a lane's
// 16 bytes holds (p = i >> 1, b = i & 1): low nibbles = rows 8b + c, high nibbles = rows 16 + 8b + c
// (c = lane / 4), k = 32kt + 16p + 4(lane % 4) + r for byte r. So the low nibbles of words {0,2} are the B
// fragment of n8 sub-tile 0, {1,3} of sub-tile 1, the high nibbles sub-tiles 2 and 3; read as an A fragment
// (weights as the M dimension) the low nibbles of words 0..3 are rows 0-15 and the high nibbles rows 16-31.
//
// Per-group dequant (ARCHITECTURE.md, "The integer scheme"): w8 = q*s2 - z. The s2 and -z bytes of channels c, c+8,
// c+16, c+24 are one 32-bit word each (interleaved storage). Four weights at once:
// (nib * s2 + (128 - z)) ^ 0x80808080; each byte q*s2 + 128 - z lies in [0, 255] (the protective range keeps
// q*s2 - z in int8), so the 32-bit multiply-add never carries between bytes and the xor turns the biased byte into
// the signed int8 q*s2 - z. One IMAD + one LOP per 4 weights (the byte-wise add of -z is folded into the
// multiply-add as a biased constant).
// Per-channel: the nibbles 0..15 go straight into the MMA; the zero point is applied in the epilogue.

QOQ_DEV void deq_params(u32 s2w, u32 zw, u32 s[4], u32 zb[4]) {
  const u32 zx = zw ^ 0x80808080u;  // byte j: (128 - z_j) mod 256
  s[0] = s2w & 0xffu;
  s[1] = (s2w >> 8) & 0xffu;
  s[2] = (s2w >> 16) & 0xffu;
  s[3] = s2w >> 24;
  zb[0] = prmt(zx, 0u, 0x0000u);
  zb[1] = prmt(zx, 0u, 0x1111u);
  zb[2] = prmt(zx, 0u, 0x2222u);
  zb[3] = prmt(zx, 0u, 0x3333u);
}

// L[i]: int8x4 from the low nibbles of word i (channel byte i&1), H[i]: high nibbles (channel byte 2 + (i&1))
template <bool GROUPED>
QOQ_DEV void dequant_tile(const uint4 w, const u32 s[4], const u32 zb[4], u32 L[4], u32 H[4]) {
  const u32 ww[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 lo = ww[i] & 0x0F0F0F0Fu;
    const u32 hi = (ww[i] >> 4) & 0x0F0F0F0Fu;
    if (GROUPED) {
      L[i] = (lo * s[i & 1] + zb[i & 1]) ^ 0x80808080u;
      H[i] = (hi * s[2 + (i & 1)] + zb[2 + (i & 1)]) ^ 0x80808080u;
    } else {
      L[i] = lo;
      H[i] = hi;
    }
  }
}

struct EpiArgs {
  const float* sa;     // fp32 [M] activation scales
  const int* qsum;     // int32 [M] (per-channel only)
  const u16* s1;       // fp16 [Np]
  const u16* szeros;   // fp16 [Np] (per-channel only, else null)
  const void* bias;    // [N] or null
  int bias_dt;
  void* out;           // [M, N]
  int out_dt;
  int N;
};

// ops.w4a8_epilogue, op for op in fp32 (no contraction): exact twin of the torch reference (qs: the row's qsum and
// sz the channel's s1_szeros, per-channel weights only)
QOQ_DEV float epi_math(int acc, float sa, float qs, float s1, float sz, bool per_channel) {
  if (per_channel) return __fmul_rn(sa, __fsub_rn(__fmul_rn(__int2float_rn(acc), s1), __fmul_rn(sz, qs)));
  return __fmul_rn(__fmul_rn(__int2float_rn(acc), sa), s1);
}
// The epilogue's inputs of output (m, n). The GEMV loads them into registers before its main loop (their
// global-memory latency is then off the kernel's tail); the other paths load them where they store.
struct EpiIn {
  float s1, sz, bias, sa, qs;
};
QOQ_DEV void epi_load_channel(const EpiArgs& e, EpiIn& p, int n) {
  p.s1 = h2f(e.s1[n]);
  p.sz = e.szeros ? h2f(e.szeros[n]) : 0.f;
  p.bias = e.bias ? ld_any(e.bias, n, e.bias_dt) : 0.f;
}
QOQ_DEV void epi_load_row(const EpiArgs& e, EpiIn& p, int m) {
  p.sa = e.sa[m];
  p.qs = e.szeros && e.qsum ? __int2float_rn(e.qsum[m]) : 0.f;  // (no qsum: int32 output, the value is unused)
}
QOQ_DEV float epi_apply(const EpiArgs& e, const EpiIn& p, int acc) {
  float y = epi_math(acc, p.sa, p.qs, p.s1, p.sz, e.szeros != nullptr);
  if (e.bias) y = __fadd_rn(y, p.bias);
  return y;
}
QOQ_DEV float epi_value(const EpiArgs& e, int acc, int m, int n) {
  EpiIn p;
  epi_load_channel(e, p, n);
  epi_load_row(e, p, m);
  return epi_apply(e, p, acc);
}
// epi_store1 with the inputs already loaded
QOQ_DEV void epi_store_in(const EpiArgs& e, const EpiIn& p, int acc, int m, int n) {
  const i64 idx = (i64)m * e.N + n;
  if (e.out_dt == DT_I32) { ((int*)e.out)[idx] = acc; return; }
  st_any(e.out, idx, e.out_dt, epi_apply(e, p, acc));
}
QOQ_DEV void epi_store1(const EpiArgs& e, int acc, int m, int n) {
  const i64 idx = (i64)m * e.N + n;
  if (e.out_dt == DT_I32) { ((int*)e.out)[idx] = acc; return; }
  st_any(e.out, idx, e.out_dt, epi_value(e, acc, m, n));
}
// two adjacent columns n, n+1 of row m (n even)
QOQ_DEV void epi_store2(const EpiArgs& e, int a0, int a1, int m, int n) {
  if (n + 1 < e.N && !(e.N & 1)) {
    const i64 idx = (i64)m * e.N + n;
    if (e.out_dt == DT_I32) { *(int2*)((int*)e.out + idx) = make_int2(a0, a1); return; }
    const float y0 = epi_value(e, a0, m, n), y1 = epi_value(e, a1, m, n + 1);
    if (e.out_dt == DT_F16) *(u32*)((u16*)e.out + idx) = (u32)f2h(y0) | ((u32)f2h(y1) << 16);
    else if (e.out_dt == DT_BF16) *(u32*)((u16*)e.out + idx) = (u32)f2bf(y0) | ((u32)f2bf(y1) << 16);
    else *(float2*)((float*)e.out + idx) = make_float2(y0, y1);
  } else {
    if (n < e.N) epi_store1(e, a0, m, n);
    if (n + 1 < e.N) epi_store1(e, a1, m, n + 1);
  }
}

#define GEMM_PARAMS                                                                                        \
  const i8 *__restrict__ A, const float *__restrict__ sa, const int *__restrict__ qsum,                    \
      const u8 *__restrict__ W, const u8 *__restrict__ s2, const u8 *__restrict__ z2,                      \
      const u16 *__restrict__ s1, const u16 *__restrict__ szeros, const void *__restrict__ bias, int bias_dt, \
      void *__restrict__ out, int out_dt, int *__restrict__ ws, int *__restrict__ counters, int M, int N,    \
      int Np, int Kp, int log2g, int S, int tps
#define GEMM_ARGS A, sa, qsum, W, s2, z2, s1, szeros, bias, bias_dt, out, out_dt, ws, counters, M, N, Np, Kp, log2g, S, tps

// ---------------------------------------------------------------------------------------------------------------
// Small M (1..8*TB tokens): weight-streaming kernel. Weights are the MMA's A operand (16 channels x 32 k), the
// tokens its N dimension (8 per MMA), so M <= 8 wastes nothing. Each warp streams the 16-byte fragments of NT
// n-tiles x U k-tiles per batch straight from global memory into registers (no shared memory), with the next batch
// already in flight while the current one is dequantized and multiplied (register double buffering). The CTA's
// warps split its k range and add their int32 sums with shared-memory atomics (exact in any order). Split-K
// over CTAs (S > 1, only when there are too few n-groups to fill the GPU) writes int32 partials to a workspace; the
// last CTA of each n-group (atomic counter) sums them and runs the epilogue. On sm_90 the GEMV is launched with
// programmatic dependent launch: it lets the next kernel start at once (pdl_trigger) and reads its first weights
// and its epilogue's channel scales before waiting for the previous kernel (pdl_wait), so back-to-back calls
// overlap one call's tail with the next one's first DRAM round trip.
// grid = (ceil(Np/32 / NT), S)
template <int TB, int NT, bool GROUPED, int U>
struct GemvBatch {
  uint4 w[U][NT];
  u32 a[U][TB][2];
  u32 s[U][NT], z[U][NT];
};

// weights (and per-group s2 / z words) of one batch: read-only parameters, safe before pdl_wait
template <int TB, int NT, bool GROUPED, int U>
QOQ_DEV void gemv_load_w(GemvBatch<TB, NT, GROUPED, U>& bt, const u8* __restrict__ W, const u8* __restrict__ s2,
                         const u8* __restrict__ z2, int kb, int k1, int nt0, int NTILES, int KT, int Np, int log2g,
                         int lane) {
  const int c = lane >> 2;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int kt = kb + u;
    const bool kv = kt < k1;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const bool ok = kv && (nt0 + t < NTILES);
      bt.w[u][t] = ok ? ldg_stream16(W + ((i64)(nt0 + t) * KT + kt) * 512 + lane * 16) : make_uint4(0, 0, 0, 0);
      if (GROUPED) {
        const int grp = (kt << 5) >> log2g;
        if (u > 0 && grp == (((kt - 1) << 5) >> log2g)) {  // same group as the previous k-tile: no second load
          bt.s[u][t] = ok ? bt.s[u - 1][t] : 0u;
          bt.z[u][t] = ok ? bt.z[u - 1][t] : 0u;
        } else {
          const i64 gi = (i64)grp * Np + (nt0 + t) * 32 + 4 * c;
          bt.s[u][t] = ok ? ldg_nc32(s2 + gi) : 0u;
          bt.z[u][t] = ok ? ldg_nc32(z2 + gi) : 0u;
        }
      }
    }
  }
}

// activations of one batch (written by the previous kernel: after pdl_wait)
template <int TB, int NT, bool GROUPED, int U>
QOQ_DEV void gemv_load_a(GemvBatch<TB, NT, GROUPED, U>& bt, const i8* __restrict__ A, int kb, int k1, int Kp, int M,
                         int lane) {
  const int c = lane >> 2, l = lane & 3;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int kt = kb + u;
#pragma unroll
    for (int tb = 0; tb < TB; ++tb) {
      const int tok = tb * 8 + c;
      if (kt < k1 && tok < M) {
        const i8* ap = A + (i64)tok * Kp + kt * 32 + 4 * l;
        bt.a[u][tb][0] = ldg_nc32(ap);
        bt.a[u][tb][1] = ldg_nc32(ap + 16);
      } else {
        bt.a[u][tb][0] = 0u;
        bt.a[u][tb][1] = 0u;
      }
    }
  }
}

template <int TB, int NT, bool GROUPED, int U>
QOQ_DEV void gemv_compute(const GemvBatch<TB, NT, GROUPED, U>& bt, int (&acc)[NT][2][TB][4], int kb, int k1) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (kb + u < k1) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        u32 s[4], zb[4], L[4], H[4];
        if (GROUPED) deq_params(bt.s[u][t], bt.z[u][t], s, zb);
        dequant_tile<GROUPED>(bt.w[u][t], s, zb, L, H);
#pragma unroll
        for (int tb = 0; tb < TB; ++tb) {
          mma_s8(acc[t][0][tb], L, bt.a[u][tb][0], bt.a[u][tb][1]);
          mma_s8(acc[t][1][tb], H, bt.a[u][tb][0], bt.a[u][tb][1]);
        }
      }
    }
  }
}

// Cross-warp reduction of the int32 C fragments. RED = 1: every warp stores its fragments to its own slice of
// shared memory (token-major rows padded to NT*32 + 4 words: the 32 lanes of one store hit 32 banks), then each
// thread adds one output over the warps; RED = 0: shared-memory atomics into one [NT*32][TB*8] table (the only
// choice when the per-warp slices exceed 40 KB). C fragment: r=0: (row c, token 2l), r=1: (c, 2l+1),
// r=2: (c+8, 2l), r=3: (c+8, 2l+1).
template <int TB, int NT, int WARPS>
struct GemvRed {
  static constexpr int PITCH = NT * 32 + 4;
  static constexpr bool PARTIALS = WARPS * TB * 8 * PITCH * 4 <= 40960;
  static constexpr int WORDS = PARTIALS ? WARPS * TB * 8 * PITCH : NT * 32 * TB * 8;
};

// CL > 1 (sm_90 thread-block clusters of CL CTAs along y, S == CL): the CL split-K CTAs of one n-group form a
// cluster and CTA rank 0 adds the others' folded sums straight from their shared memory (DSMEM) instead of the
// global-memory round trip of the generic split-K path.
template <int TB, int NT, bool GROUPED, int WARPS, int U, int RED, int CL = 1, bool EARLY = true>
QOQ_DEV void gemv_body(GEMM_PARAMS) {
  typedef GemvRed<TB, NT, WARPS> R;
  constexpr bool PARTIALS = RED == 1 && R::PARTIALS;
  __shared__ int red[PARTIALS ? R::WORDS : NT * 32 * TB * 8];
  __shared__ int s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c = lane >> 2, l = lane & 3;
  const int KT = Kp >> 5, NTILES = Np >> 5;
  const int nt0 = blockIdx.x * NT, split = blockIdx.y;
  const int k0 = split * tps, k1 = min(KT, k0 + tps);
  if (EARLY) pdl_trigger();  // the next GEMV may start streaming its weights while this one runs
  if (!PARTIALS)
    for (int i = tid; i < NT * 32 * TB * 8; i += WARPS * 32) red[i] = 0;

  int acc[NT][2][TB][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int tb = 0; tb < TB; ++tb)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[t][h][tb][r] = 0;

  // the first two batches of weights and the epilogue's channel parameters are read before pdl_wait (they
  // overlap the previous kernel's tail when launched with programmatic dependent launch), the rest after it
  const int total = NT * 32 * M;
  const EpiArgs e{sa, qsum, s1, szeros, bias, bias_dt, out, out_dt, N};
  constexpr int STRIDE = WARPS * U;
  int kb = k0 + warp * U;
  GemvBatch<TB, NT, GROUPED, U> b0, b1;
  if (kb < k1) gemv_load_w(b0, W, s2, z2, kb, k1, nt0, NTILES, KT, Np, log2g, lane);
  if (kb + STRIDE < k1) gemv_load_w(b1, W, s2, z2, kb + STRIDE, k1, nt0, NTILES, KT, Np, log2g, lane);
  // output i = tok * NT*32 + ch; with at most one output per thread, thread tid's inputs are loaded now
  const bool pre_ok = total <= WARPS * 32 && tid < total && nt0 * 32 + tid % (NT * 32) < N;
  EpiIn pre;
  if (pre_ok) epi_load_channel(e, pre, nt0 * 32 + tid % (NT * 32));
  pdl_wait();
  if (pre_ok) epi_load_row(e, pre, tid / (NT * 32));
  if (kb < k1) gemv_load_a(b0, A, kb, k1, Kp, M, lane);
  if (kb + STRIDE < k1) gemv_load_a(b1, A, kb + STRIDE, k1, Kp, M, lane);
  for (; kb < k1; kb += 2 * STRIDE) {
    gemv_compute(b0, acc, kb, k1);
    if (kb + 2 * STRIDE < k1) {
      gemv_load_w(b0, W, s2, z2, kb + 2 * STRIDE, k1, nt0, NTILES, KT, Np, log2g, lane);
      gemv_load_a(b0, A, kb + 2 * STRIDE, k1, Kp, M, lane);
    }
    if (kb + STRIDE >= k1) break;
    gemv_compute(b1, acc, kb + STRIDE, k1);
    if (kb + 3 * STRIDE < k1) {
      gemv_load_w(b1, W, s2, z2, kb + 3 * STRIDE, k1, nt0, NTILES, KT, Np, log2g, lane);
      gemv_load_a(b1, A, kb + 3 * STRIDE, k1, Kp, M, lane);
    }
  }
  if (!EARLY) pdl_trigger();  // only once its weights are read: the next GEMV's CTAs fill the SMs as they free
  if (PARTIALS) {
    int* mine = red + warp * (TB * 8 * R::PITCH);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int tb = 0; tb < TB; ++tb)
#pragma unroll
          for (int r = 0; r < 4; ++r)
            mine[(tb * 8 + 2 * l + (r & 1)) * R::PITCH + t * 32 + h * 16 + c + 8 * (r >> 1)] = acc[t][h][tb][r];
    __syncthreads();
    // fold the warps' slices into slice 0, one output per thread at a time (read by the epilogue below)
    for (int i = tid; i < NT * 32 * M; i += WARPS * 32) {
      const int ch = i % (NT * 32), tok = i / (NT * 32);
      int v = 0;
#pragma unroll 4
      for (int w = 0; w < WARPS; ++w) v += red[w * (TB * 8 * R::PITCH) + tok * R::PITCH + ch];
      red[tok * R::PITCH + ch] = v;  // slot of warp 0: only this thread reads or writes it from here on
    }
  } else {
    __syncthreads();  // red[] zeroed
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int tb = 0; tb < TB; ++tb)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int tok = tb * 8 + 2 * l + (r & 1);
            if (tok < M) atomicAdd(&red[(t * 32 + h * 16 + c + 8 * (r >> 1)) * (TB * 8) + tok], acc[t][h][tb][r]);
          }
  }
  __syncthreads();
#define GEMV_RED(ch, tok) (PARTIALS ? red[(tok) * R::PITCH + (ch)] : red[(ch) * (TB * 8) + (tok)])

  auto store = [&](int v, int i, int tok, int n) {
    if (pre_ok && i == tid) epi_store_in(e, pre, v, tok, n);
    else epi_store1(e, v, tok, n);
  };
  if (CL > 1) {
    static_assert(CL == 1 || PARTIALS, "cluster split-K needs the per-warp slices (fold into slot 0)");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cluster_sync();  // every CTA of the cluster has folded its sums into its slot 0
    if (cluster_rank() == 0) {
      for (int i = tid; i < total; i += WARPS * 32) {
        const int ch = i % (NT * 32), tok = i / (NT * 32);
        const int n = nt0 * 32 + ch;
        int v = GEMV_RED(ch, tok);
        const u32 local = smem_u32(&red[tok * R::PITCH + ch]);
#pragma unroll
        for (int r = 1; r < CL; ++r) v += ld_dsmem_s32(local, r);
        if (n < N) store(v, i, tok, n);
      }
    }
    cluster_sync();  // the other CTAs keep their shared memory alive until rank 0 has read it
#else
    __trap();  // cluster variants are launched on sm_90+ only (gemm.py)
#endif
    return;
  }
  if (S == 1) {
    for (int i = tid; i < total; i += WARPS * 32) {
      const int ch = i % (NT * 32), tok = i / (NT * 32);
      const int n = nt0 * 32 + ch;
      if (n < N) store(GEMV_RED(ch, tok), i, tok, n);
    }
    return;
  }
  for (int i = tid; i < total; i += WARPS * 32) {
    const int ch = i % (NT * 32), tok = i / (NT * 32);
    const int n = nt0 * 32 + ch;
    if (n < Np) ws[((i64)split * M + tok) * Np + n] = GEMV_RED(ch, tok);
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(counters + blockIdx.x, 1) == S - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int i = tid; i < total; i += WARPS * 32) {
    const int ch = i % (NT * 32), tok = i / (NT * 32);
    const int n = nt0 * 32 + ch;
    if (n >= N) continue;
    int v = 0;
    for (int s = 0; s < S; ++s) v += ld_cg_s32(ws + ((i64)s * M + tok) * Np + n);
    store(v, i, tok, n);
  }
  if (tid == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}
#undef GEMV_RED

// ---------------------------------------------------------------------------------------------------------------
// Large M: CTA tile BM x BN x 128 (k), WM x WN warps, STAGES-deep cp.async pipeline for A (XOR-swizzled 16-byte
// chunks, ldmatrix.x4), B (the packed 512-byte tiles copied verbatim; one LDS.128 per lane per 32x32 tile gives all
// four n8 B fragments) and, per-group, the s2 / -z rows of each k32 step. M, N and K tails are zero-filled.
// grid = (ceil(M/BM), ceil(Np/BN), S); split-K partials as in gemv_body.
template <int BM, int BN, int WM, int WN, int STAGES, bool GROUPED>
QOQ_DEV void gemm_body(GEMM_PARAMS) {
  constexpr int BK = 128, KTS = BK / 32, THREADS = WM * WN * 32;
  constexpr int TM = BM / WM, TN = BN / WN, MI = TM / 16, NI = TN / 32;
  constexpr int A_BYTES = BM * BK, B_BYTES = BN * BK / 2, S_BYTES = GROUPED ? 2 * KTS * BN : 0;
  constexpr int STAGE = A_BYTES + B_BYTES + S_BYTES;
  static_assert(TM % 16 == 0 && TN % 32 == 0, "warp tile");
  extern __shared__ uint4 dsmem[];
  __shared__ int s_last;
  u8* smem = (u8*)dsmem;
  const u32 sbase = smem_u32(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, l = lane & 3;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, split = blockIdx.z;
  const int KT = Kp >> 5, NTILES = Np >> 5;
  const int kt_begin = split * tps, kt_end = min(KT, kt_begin + tps);
  const int nst = (kt_end - kt_begin + KTS - 1) / KTS;

  // per-thread copy assignments, fixed for the whole k loop (compile-time trip counts, hoisted addresses)
  constexpr int A_IT = BM * 8 / THREADS, B_IT = BN * KTS / THREADS, CPR = BN / 16, S_CH = 2 * KTS * CPR;
  static_assert(BM * 8 % THREADS == 0 && THREADS % (KTS * 32) == 0 && BN * KTS % THREADS == 0, "copy split");
  static_assert(!GROUPED || S_CH <= THREADS, "scale copy split");
  const int a_row0 = tid >> 3, a_ch = tid & 7;
  const i8* a_base = A + (i64)(m0 + a_row0) * Kp + a_ch * 16;
  const int a_step = (THREADS / 8) * Kp;  // < 2^31 for any real K
  const u32 a_dst0 = a_row0 * BK + ((a_ch ^ (a_row0 & 7)) << 4);  // (row & 7) is the same for every it
  u32 a_rows_ok = 0;
#pragma unroll
  for (int it = 0; it < A_IT; ++it) a_rows_ok |= (u32)(m0 + a_row0 + it * (THREADS / 8) < M) << it;
  const int b_ntl0 = tid / (KTS * 32), b_ktl = (tid >> 5) % KTS, b_ch = tid & 31;
  const u8* b_base = W + ((i64)((n0 >> 5) + b_ntl0) * KT + b_ktl) * 512 + b_ch * 16;
  const int b_step = (THREADS / (KTS * 32)) * KT * 512;
  const u32 b_dst0 = A_BYTES + (b_ntl0 * KTS + b_ktl) * 512 + b_ch * 16;
  u32 b_tiles_ok = 0;
#pragma unroll
  for (int it = 0; it < B_IT; ++it) b_tiles_ok |= (u32)((n0 >> 5) + b_ntl0 + it * (THREADS / (KTS * 32)) < NTILES) << it;
  const int s_which = tid / (KTS * CPR), s_ktl = (tid / CPR) % KTS, s_ch = tid % CPR;
  const bool s_ok = GROUPED && tid < S_CH && n0 + s_ch * 16 < Np;
  const u8* s_base = (s_which ? z2 : s2) + n0 + s_ch * 16;
  const u32 s_dst0 = A_BYTES + B_BYTES + (s_which * KTS + s_ktl) * BN + s_ch * 16;

  auto load_stage = [&](int st, int kt0) {
    const u32 base = sbase + st * STAGE;
    const bool a_k_ok = kt0 * 32 + a_ch * 16 < kt_end * 32;
#pragma unroll
    for (int it = 0; it < A_IT; ++it) {
      const bool ok = a_k_ok && ((a_rows_ok >> it) & 1u);
      cp_async16(base + a_dst0 + it * (THREADS / 8) * BK, ok ? a_base + it * a_step + kt0 * 32 : A, ok ? 16 : 0);
    }
    const bool b_k_ok = kt0 + b_ktl < kt_end;
#pragma unroll
    for (int it = 0; it < B_IT; ++it) {
      const bool ok = b_k_ok && ((b_tiles_ok >> it) & 1u);
      cp_async16(base + b_dst0 + it * (THREADS / (KTS * 32)) * KTS * 512, ok ? b_base + it * b_step + kt0 * 512 : W,
                 ok ? 16 : 0);
    }
    if (GROUPED && tid < S_CH) {
      const int kt = min(kt0 + s_ktl, KT - 1);
      const int grp = (kt << 5) >> log2g;
      cp_async16(base + s_dst0, s_ok ? s_base + (i64)grp * Np : s2, s_ok ? 16 : 0);
    }
  };

  int acc[MI][NI * 4][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int j = 0; j < NI * 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][j][r] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nst) load_stage(s, kt_begin + s * KTS);
    cp_async_commit();
  }
  for (int it = 0; it < nst; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nx = it + STAGES - 1;
      if (nx < nst) load_stage(nx % STAGES, kt_begin + nx * KTS);
      cp_async_commit();
    }
    const int st = it % STAGES;
    const u32 sA = sbase + st * STAGE;
    const u8* pB = smem + st * STAGE + A_BYTES;
    const u8* pS = pB + B_BYTES;
    // fragments of k32 step kk+1 are read from shared memory while step kk is dequantized and multiplied
    u32 a[2][MI][4];
    uint4 bw[2][NI];
    u32 sw[2][NI], zw[2][NI];
    auto load_frags = [&](int kk, int buf) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int row = wm * TM + mi * 16 + (lane & 15);
        const int ch = 2 * kk + (lane >> 4);
        ldmatrix_x4(a[buf][mi], sA + row * BK + ((ch ^ (row & 7)) << 4));
      }
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int ntl = wn * NI + ni;
        bw[buf][ni] = *(const uint4*)(pB + (ntl * KTS + kk) * 512 + lane * 16);
        if (GROUPED) {
          sw[buf][ni] = *(const u32*)(pS + kk * BN + ntl * 32 + 4 * g);
          zw[buf][ni] = *(const u32*)(pS + (KTS + kk) * BN + ntl * 32 + 4 * g);
        }
      }
    };
    load_frags(0, 0);
#pragma unroll
    for (int kk = 0; kk < KTS; ++kk) {
      const int cur = kk & 1;
      if (kk + 1 < KTS) load_frags(kk + 1, cur ^ 1);
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        u32 gs[4], gz[4], L[4], H[4];
        if (GROUPED) deq_params(sw[cur][ni], zw[cur][ni], gs, gz);
        dequant_tile<GROUPED>(bw[cur][ni], gs, gz, L, H);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma_s8(acc[mi][ni * 4 + 0], a[cur][mi], L[0], L[2]);
          mma_s8(acc[mi][ni * 4 + 1], a[cur][mi], L[1], L[3]);
          mma_s8(acc[mi][ni * 4 + 2], a[cur][mi], H[0], H[2]);
          mma_s8(acc[mi][ni * 4 + 3], a[cur][mi], H[1], H[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  EpiArgs e{sa, qsum, s1, szeros, bias, bias_dt, out, out_dt, N};
  // output row / first column of accumulator pair acc[mi][j][2hh..2hh+1] (C fragment of the n8 MMA)
  auto frag_row = [&](int mi, int hh) { return m0 + wm * TM + mi * 16 + g + 8 * hh; };
  auto frag_col = [&](int j) { return n0 + wn * TN + (j >> 2) * 32 + (j & 3) * 8 + 2 * l; };
  if (S > 1) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int j = 0; j < NI * 4; ++j)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int row = frag_row(mi, hh), col = frag_col(j);
          if (row < M && col < Np)
            *(int2*)(ws + ((i64)split * M + row) * Np + col) = make_int2(acc[mi][j][2 * hh], acc[mi][j][2 * hh + 1]);
        }
    __threadfence();
    __syncthreads();
    const int tile = blockIdx.x * gridDim.y + blockIdx.y;
    if (tid == 0) s_last = atomicAdd(counters + tile, 1) == S - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int j = 0; j < NI * 4; ++j)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int row = frag_row(mi, hh), col = frag_col(j);
          int v0 = 0, v1 = 0;
          if (row < M && col < Np) {
            for (int s = 0; s < S; ++s) {
              const int* p = ws + ((i64)s * M + row) * Np + col;
              v0 += ld_cg_s32(p);
              v1 += ld_cg_s32(p + 1);
            }
          }
          acc[mi][j][2 * hh] = v0;
          acc[mi][j][2 * hh + 1] = v1;
        }
    if (tid == 0) counters[tile] = 0;
  }
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int j = 0; j < NI * 4; ++j)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = frag_row(mi, hh), col = frag_col(j);
        if (row < M) epi_store2(e, acc[mi][j][2 * hh], acc[mi][j][2 * hh + 1], row, col);
      }
}

// ---------------------------------------------------------------------------------------------------------------
// Large M (IntMMConfig): the packed W4 linear is dequantized into a natural row-major int8 [Np, Kp] scratch (the
// same byte arithmetic as the tensor-core kernels: q*s2 - z per group, q per channel), torch._int_mm (cuBLAS
// IMMA/wgmma) gives the int32 accumulators [M, Np], and `qoq_w4a8_epilogue` applies ops.w4a8_epilogue.
// Dequant: grid = (ceil(KT/8), Np/32), 256 threads; warp w dequantizes tile (nt, kt0 + w) from its 16-byte lane
// chunks into a 32 x 256 shared tile, then the CTA writes 32 rows x 256 bytes with coalesced 16-byte stores.
#define DQ_PITCH 272
template <bool GROUPED>
QOQ_DEV void w4_dequant_body(const u8* __restrict__ W, const u8* __restrict__ s2, const u8* __restrict__ z2,
                             i8* __restrict__ out, int sld, int Kp, int log2g) {
  __shared__ __align__(16) u8 tile[32 * DQ_PITCH];
  const int KT = Kp >> 5;
  const int nt = blockIdx.y, kt0 = blockIdx.x * 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = lane >> 2, l = lane & 3;
  const int kt = kt0 + warp;
  if (kt < KT) {
    const uint4 w = ldg_stream16(W + ((i64)nt * KT + kt) * 512 + lane * 16);
    u32 s[4] = {0u, 0u, 0u, 0u}, zb[4] = {0u, 0u, 0u, 0u};
    if (GROUPED) {
      const i64 off = (i64)((kt * 32) >> log2g) * sld + nt * 32 + 4 * c;
      deq_params(*(const u32*)(s2 + off), *(const u32*)(z2 + off), s, zb);
    }
    u32 L[4], H[4];
    dequant_tile<GROUPED>(w, s, zb, L, H);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 8 * (i & 1) + c, col = 32 * warp + 16 * (i >> 1) + 4 * l;
      *(u32*)(tile + row * DQ_PITCH + col) = L[i];
      *(u32*)(tile + (row + 16) * DQ_PITCH + col) = H[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int idx = threadIdx.x + 256 * j;
    const int row = idx >> 4, chunk = idx & 15;
    const int col = kt0 * 32 + chunk * 16;
    if (col < Kp)
      *(uint4*)(out + (i64)(nt * 32 + row) * Kp + col) = *(const uint4*)(tile + row * DQ_PITCH + chunk * 16);
  }
}

// sld: row stride of s2 / z2 (the layer's Np); W, s2, z2 may point at a 32-aligned block of channels
#define DEQUANT_PARAMS \
  const u8 *__restrict__ W, const u8 *__restrict__ s2, const u8 *__restrict__ z2, i8 *__restrict__ out, int sld, int Kp, int log2g
extern "C" __global__ void __launch_bounds__(256) qoq_w4_dequant_g(DEQUANT_PARAMS) {
  w4_dequant_body<true>(W, s2, z2, out, sld, Kp, log2g);
}
extern "C" __global__ void __launch_bounds__(256) qoq_w4_dequant_c(DEQUANT_PARAMS) {
  w4_dequant_body<false>(W, s2, z2, out, sld, Kp, log2g);
}

// int32 acc [M, Np] (row stride Np) -> out [M, N] (row stride out_ld; fp16 / bf16 / fp32), 8 columns per thread:
// two 16-byte acc loads, one 16-byte (fp16/bf16) or two (fp32) stores when N and out_ld are multiples of 8.
// grid = (ceil(N/8 / 128), min(M, 65535)), 128 threads.
extern "C" __global__ void __launch_bounds__(128)
qoq_w4a8_epilogue(const int* __restrict__ acc, const float* __restrict__ sa, const int* __restrict__ qsum,
                  const u16* __restrict__ s1, const u16* __restrict__ szeros, const void* __restrict__ bias,
                  int bias_dt, void* __restrict__ out, int out_dt, int M, int N, int Np, int out_ld) {
  const EpiArgs e{sa, qsum, s1, szeros, bias, bias_dt, out, out_dt, N};
  const int n0 = 8 * (blockIdx.x * 128 + threadIdx.x);
  if (n0 >= N) return;
  for (int m = blockIdx.y; m < M; m += gridDim.y) {
    const int4* src = (const int4*)(acc + (i64)m * Np + n0);
    const int4 v0 = src[0], v1 = src[1];
    const int a[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
    const i64 idx = (i64)m * out_ld + n0;
    if (n0 + 8 <= N && !(N & 7) && !(out_ld & 7)) {
      float y[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) y[j] = epi_value(e, a[j], m, n0 + j);
      if (out_dt == DT_F32) {
        ((float4*)((float*)out + idx))[0] = make_float4(y[0], y[1], y[2], y[3]);
        ((float4*)((float*)out + idx))[1] = make_float4(y[4], y[5], y[6], y[7]);
      } else {
        u32 p[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          p[j] = out_dt == DT_F16 ? ((u32)f2h(y[2 * j]) | ((u32)f2h(y[2 * j + 1]) << 16))
                                  : ((u32)f2bf(y[2 * j]) | ((u32)f2bf(y[2 * j + 1]) << 16));
        *(uint4*)((u16*)out + idx) = make_uint4(p[0], p[1], p[2], p[3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (n0 + j < N) st_any(out, idx + j, out_dt, epi_value(e, a[j], m, n0 + j));
    }
  }
}
