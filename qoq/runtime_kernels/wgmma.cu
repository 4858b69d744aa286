// W4A8 GEMM for large M on Hopper: warpgroup MMA (`wgmma.mma_async` s8, sm_90a only; compiled with -arch=sm_90a).
//
// Replaces the three memory passes of the dequant + torch._int_mm + epilogue path with one kernel: the packed W4
// tiles are dequantized in registers (the same byte arithmetic as gemm.cu: q*s2 - z per group, q per channel) and
// stored as int8 into shared memory in the layout wgmma reads, and the epilogue runs on the accumulators.
//
// CTA tile 128 x 128 x 128 (k), 256 threads = two warpgroups, each owning 64 rows x 128 (one m64n128k32 wgmma per
// k32 step; two such CTAs per SM hide each other's load latency better than one 128 x 256 CTA, NOTES.md). Shared
// memory per stage: A [128][128] int8 and B [128][128] int8, both K-major with the 128-byte swizzle
// (16-byte chunk c of row r at chunk c ^ (r & 7); atoms of 8 rows x 128 bytes, 1024-byte aligned), which is what
// the descriptors say (layout SWIZZLE_128B, 1024 bytes between 8-row groups; the k32 step advances the start
// address by 32 bytes inside the atom). A arrives by cp.async; B by 16-byte register loads of the packed tiles
// two stages ahead, dequantized and stored with 4-byte st.shared (the 32 lanes of a store hit 32 banks).
//
// Pipeline over STAGES buffers: at step t the wgmma of stage t is in flight (and t-1 may still be), stage t+S-2
// is written. Stage t-2 is free: every warpgroup waited for its wgmma of t-2 (wait_group 1 at the end of step t-1)
// before the barrier that opens step t. Generic-proxy writes (cp.async, st.shared) are made visible to the async
// proxy that wgmma reads through with fence.proxy.async before that barrier.
// Tiles run in groups of WG_GROUP_M row tiles (every column tile of a group before the next group), so the
// activation rows and weight columns a wave of CTAs reads stay in L2 when M is large (a 16384-token prefill chunk
// is 64 MB of int8 activations at K = 4096). grid = ceil(M/128) * ceil(Np/128) CTAs; M, N and K tails are
// zero-filled; no split-K (large M fills the GPU).

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QOQ_WGMMA 1
// smem matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart (leading offset unused: 1)
QOQ_DEV u64 wg_desc(u32 saddr) {
  return (u64)((saddr & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
QOQ_DEV void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
QOQ_DEV void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> QOQ_DEV void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
QOQ_DEV void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
template <int R> QOQ_DEV void reg_fence(int (&d)[R]) {  // keep accumulator accesses on their side of a wait
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(d[i]) :: "memory");
}
template <int R> QOQ_DEV void reg_fence(u32 (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(d[i]) :: "memory");
}
QOQ_DEV void wgmma_m64n128k32_s8(int (&d)[64], u64 da, u64 db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
      "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
      "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
      "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
      "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
      "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
      "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(da), "l"(db), "r"(1));
}
// m64n256k32 s8: one instruction for the whole 256-channel tile, so the activation tile is read from shared memory
// once per k32 step instead of once per 128 channels
QOQ_DEV void wgmma_m64n256k32_s8(int (&d)[128], u64 da, u64 db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
      "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
      "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
      "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
      "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
      "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
      "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
      "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
      "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
      "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
      "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
      "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
      "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
      "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
      "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(da), "l"(db), "r"(1));
}
#endif

// Epilogue on the accumulators, out dtype fixed at compile time: d[4j + 2hh + e] is row row0 + 8hh, column
// col0 + 8j + e (col0 = n0 + 2l; the m16n8 C fragment, per warp of the warpgroup). Row scales are read once per
// row and channel scales once per column pair; the arithmetic is epi_value's, op for op (bit-equal to ops.py).
template <int DT> QOQ_DEV void st_pair(void* out, i64 idx, float y0, float y1) {
  if (DT == DT_F16) *(u32*)((u16*)out + idx) = (u32)f2h(y0) | ((u32)f2h(y1) << 16);
  else if (DT == DT_BF16) *(u32*)((u16*)out + idx) = (u32)f2bf(y0) | ((u32)f2bf(y1) << 16);
  else *(float2*)((float*)out + idx) = make_float2(y0, y1);
}
template <int DT> QOQ_DEV void st_one(void* out, i64 idx, float y) {
  if (DT == DT_F16) ((u16*)out)[idx] = f2h(y);
  else if (DT == DT_BF16) ((u16*)out)[idx] = f2bf(y);
  else ((float*)out)[idx] = y;
}
template <int BN, int DT>
QOQ_DEV void wgmma_epilogue(const EpiArgs& e, const int (&acc)[BN / 2], int row0, int col0, int M) {
  const bool pc = e.szeros != nullptr;
  float sa_[2], qs_[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + 8 * hh;
    sa_[hh] = row < M ? e.sa[row] : 0.f;
    qs_[hh] = (pc && row < M) ? __int2float_rn(e.qsum[row]) : 0.f;
  }
  const bool pairs = !(e.N & 1);
  // channel parameters: lane L loads the tile's column pairs L, L + 32, ... all at once and each pair's owners
  // take them by shuffle (loaded next to each pair's stores, every pair waited for its own L2 round trip)
  constexpr int T = BN / 64;
  const int lane = threadIdx.x & 31, nb = col0 - 2 * (lane & 3);
  u32 s1p[T], szp[T];
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const int c = nb + 2 * (lane + 32 * t);  // even; c + 1 < Np whenever c < N (Np is a multiple of 32)
    s1p[t] = DT != DT_I32 && c < e.N ? *(const u32*)(e.s1 + c) : 0u;
    szp[t] = DT != DT_I32 && pc && c < e.N ? *(const u32*)(e.szeros + c) : 0u;
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int col = col0 + 8 * j, owner = 4 * (j % 8) + (lane & 3);  // column pair 4j + (lane & 3)
    const u32 s1w = DT != DT_I32 ? __shfl_sync(0xffffffffu, s1p[j / 8], owner) : 0u;
    const u32 szw = DT != DT_I32 && pc ? __shfl_sync(0xffffffffu, szp[j / 8], owner) : 0u;
    if (col >= e.N) continue;
    const bool has1 = col + 1 < e.N;
    float s1a = 0.f, s1b = 0.f, sza = 0.f, szb = 0.f, ba = 0.f, bb = 0.f;
    if (DT != DT_I32) {
      s1a = h2f((u16)(s1w & 0xffffu));
      s1b = h2f((u16)(s1w >> 16));
      if (pc) {
        sza = h2f((u16)(szw & 0xffffu));
        szb = h2f((u16)(szw >> 16));
      }
      if (e.bias) {
        ba = ld_any(e.bias, col, e.bias_dt);
        bb = has1 ? ld_any(e.bias, col + 1, e.bias_dt) : 0.f;
      }
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = row0 + 8 * hh;
      if (row >= M) continue;
      const int a0 = acc[4 * j + 2 * hh], a1 = acc[4 * j + 2 * hh + 1];
      const i64 idx = (i64)row * e.N + col;
      if (DT == DT_I32) {
        if (has1 && pairs) *(int2*)((int*)e.out + idx) = make_int2(a0, a1);
        else {
          ((int*)e.out)[idx] = a0;
          if (has1) ((int*)e.out)[idx + 1] = a1;
        }
        continue;
      }
      float y0 = epi_math(a0, sa_[hh], qs_[hh], s1a, sza, pc), y1 = epi_math(a1, sa_[hh], qs_[hh], s1b, szb, pc);
      if (e.bias) {
        y0 = __fadd_rn(y0, ba);
        y1 = __fadd_rn(y1, bb);
      }
      if (has1 && pairs) st_pair<DT>(e.out, idx, y0, y1);
      else {
        st_one<DT>(e.out, idx, y0);
        if (has1) st_one<DT>(e.out, idx + 1, y1);
      }
    }
  }
}

// packed 16-byte lane chunks (and per-group s2 / -z words) of one stage's B tiles, held in registers
template <int IT> struct WgB {
  uint4 w[IT];
  u32 s[IT], z[IT];
};

constexpr int WG_GROUP_M = 8;

template <int STAGES, bool GROUPED>
QOQ_DEV void wgmma_gemm_body(GEMM_PARAMS) {
#if defined(QOQ_WGMMA)
  constexpr int BM = 128, BN = 128, BK = 128, KTS = BK / 32, THREADS = 256, NACC = BN / 2;
  constexpr int A_BYTES = BM * BK, B_BYTES = BN * BK, STAGE = A_BYTES + B_BYTES;
  constexpr int A_IT = BM * 8 / THREADS, B_IT = (BN / 32) * KTS / 8;  // 16-byte A chunks / packed tiles per warp
  static_assert(STAGES >= 3, "the pipeline writes stage t+S-2 while t-1 and t may be in flight");
  extern __shared__ uint4 dsmem[];
  const u32 sraw = smem_u32(dsmem), sbase = (sraw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  u8* const smem = (u8*)dsmem + (sbase - sraw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = tid >> 7;
  const int c = lane >> 2, l = lane & 3;
  const int mtiles = (M + BM - 1) / BM, ntiles = (Np + BN - 1) / BN;
  const int per_group = WG_GROUP_M * ntiles, first_m = (blockIdx.x / per_group) * WG_GROUP_M;
  const int gm = min(mtiles - first_m, WG_GROUP_M), in_group = blockIdx.x % per_group;
  const int m0 = (first_m + in_group % gm) * BM, n0 = (in_group / gm) * BN;
  const int KT = Kp >> 5, NTILES = Np >> 5;
  const int nst = (KT + KTS - 1) / KTS;

  const int a_row0 = tid >> 3, a_ch = tid & 7;
  const i8* a_base = A + (i64)(m0 + a_row0) * Kp + a_ch * 16;
  const u32 a_dst0 = a_row0 * BK + ((a_ch ^ (a_row0 & 7)) << 4);  // (row & 7) is the same for every it
  auto load_a = [&](int st, int kt0) {
    const bool k_ok = kt0 * 32 + a_ch * 16 < Kp;
#pragma unroll
    for (int it = 0; it < A_IT; ++it) {
      const bool ok = k_ok && m0 + a_row0 + it * (THREADS / 8) < M;
      cp_async16(sbase + st * STAGE + a_dst0 + it * (THREADS / 8) * BK,
                 ok ? a_base + (i64)it * (THREADS / 8) * Kp + kt0 * 32 : A, ok ? 16 : 0);
    }
  };
  // packed tile t = warp + 8 it of a stage: n-tile t / KTS, k-tile t % KTS
  auto load_b = [&](WgB<B_IT>& r, int kt0) {
#pragma unroll
    for (int it = 0; it < B_IT; ++it) {
      const int t = warp + 8 * it, nt = (n0 >> 5) + t / KTS, kt = kt0 + t % KTS;
      const bool ok = nt < NTILES && kt < KT;
      r.w[it] = ok ? ldg_stream16(W + ((i64)nt * KT + kt) * 512 + lane * 16) : make_uint4(0u, 0u, 0u, 0u);
      if (GROUPED) {
        const i64 gi = (i64)((kt << 5) >> log2g) * Np + nt * 32 + 4 * c;
        r.s[it] = ok ? ldg_nc32(s2 + gi) : 0u;
        r.z[it] = ok ? ldg_nc32(z2 + gi) : 0u;
      }
    }
  };
  // dequantize into stage st: word i of a lane's chunk holds k = 16 (i >> 1) + 4 l .. +3 of rows 8 (i & 1) + c
  // (low nibbles) and 16 + 8 (i & 1) + c (high nibbles); zero chunks dequantize to zero (s2 = z = 0)
  auto store_b = [&](const WgB<B_IT>& r, int st) {
    u8* const base = smem + st * STAGE + A_BYTES;
#pragma unroll
    for (int it = 0; it < B_IT; ++it) {
      const int t = warp + 8 * it, ntl = t / KTS, ktl = t % KTS;
      u32 s[4] = {0u, 0u, 0u, 0u}, zb[4] = {0u, 0u, 0u, 0u}, L[4], H[4];
      if (GROUPED) deq_params(r.s[it], r.z[it], s, zb);
      dequant_tile<GROUPED>(r.w[it], s, zb, L, H);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = ntl * 32 + 8 * (i & 1) + c, chunk = ktl * 2 + (i >> 1);
        const int off = row * BK + ((chunk ^ (row & 7)) << 4) + 4 * l;  // row + 16: same (row & 7)
        *(u32*)(base + off) = L[i];
        *(u32*)(base + off + 16 * BK) = H[i];
      }
    }
  };

  int acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0;

  // B registers are double-buffered: the packed tiles of stage t+S are loaded at step t, two steps before their
  // dequantization, so the global-load latency hides behind two steps of wgmma
  WgB<B_IT> b0, b1;
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < nst) {
      load_a(s, s * KTS);
      load_b(b0, s * KTS);
      store_b(b0, s);
    }
    cp_async_commit();
  }
  if (STAGES - 2 < nst) load_b(b0, (STAGES - 2) * KTS);
  if (STAGES - 1 < nst) load_b(b1, (STAGES - 1) * KTS);

  auto step = [&](int t, WgB<B_IT>& br) {  // br holds the packed tiles of stage t+S-2
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();
    __syncthreads();
    const u32 sa_ = sbase + (t % STAGES) * STAGE + wg * 64 * BK, sb_ = sbase + (t % STAGES) * STAGE + A_BYTES;
    reg_fence(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KTS; ++kk) wgmma_m64n128k32_s8(acc, wg_desc(sa_ + kk * 32), wg_desc(sb_ + kk * 32));
    wgmma_commit();
    const int nx = t + STAGES - 2;
    if (nx < nst) {
      load_a(nx % STAGES, nx * KTS);
      store_b(br, nx % STAGES);
    }
    cp_async_commit();
    if (nx + 2 < nst) load_b(br, (nx + 2) * KTS);
    wgmma_wait<1>();
  };
  for (int t = 0; t < nst; t += 2) {
    step(t, b0);
    if (t + 1 < nst) step(t + 1, b1);
  }
  wgmma_wait<0>();
  reg_fence(acc);
  cp_async_wait<0>();

  const int row0 = m0 + wg * 64 + (warp & 3) * 16 + c;
  const EpiArgs e{sa, qsum, s1, szeros, bias, bias_dt, out, out_dt, N};
  if (out_dt == DT_F16) wgmma_epilogue<BN, DT_F16>(e, acc, row0, n0 + 2 * l, M);
  else if (out_dt == DT_BF16) wgmma_epilogue<BN, DT_BF16>(e, acc, row0, n0 + 2 * l, M);
  else if (out_dt == DT_F32) wgmma_epilogue<BN, DT_F32>(e, acc, row0, n0 + 2 * l, M);
  else wgmma_epilogue<BN, DT_I32>(e, acc, row0, n0 + 2 * l, M);
#else
  __trap();  // sm_90a only (gemm.py launches it on compute capability 9.0)
#endif
}


// ---------------------------------------------------------------------------------------------------------------
// Tensor-memory-accelerator copies and mbarriers (sm_90a): a copy into shared memory runs in the async proxy and
// completes on an mbarrier, so what it writes needs no proxy fence before wgmma reads it (a generic-proxy write
// does: fence.proxy.async, which compiles to MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S).
struct __align__(64) TmaMap { u64 v[16]; };  // CUtensorMap: opaque, 128 bytes, 64-byte aligned

#if defined(QOQ_WGMMA)
// mbarriers: init with the arrivals a phase takes; arrive (release; with expect_tx also the bytes the bulk copies
// will complete on it; `_remote`: on the barrier at the same offset in cluster CTA `rank`); wait until the phase
// of a parity has completed (acquire)
QOQ_DEV void mbar_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
QOQ_DEV void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
QOQ_DEV void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
QOQ_DEV void mbar_arrive_remote(u32 bar, u32 rank) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" :: "r"(dsmem_addr(bar, rank)) : "memory");
}
QOQ_DEV void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
QOQ_DEV void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
// 2-D tensor-map box at (c0 = byte column, c1 = row) into this CTA's shared memory (`mask`: into every CTA of the
// cluster in the mask, at the same offset), completing on `bar` (in each destination CTA)
QOQ_DEV void tma_load_2d(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
               :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
QOQ_DEV void tma_load_2d_multicast(u32 dst, const TmaMap* map, int c0, int c1, u32 bar, u16 mask) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
               " [%0], [%1, {%2, %3}], [%4], %5;"
               :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(bar), "h"(mask) : "memory");
}
// every thread of the cluster's CTAs (no .aligned: the producer warp arrives diverged)
QOQ_DEV void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.release;" ::: "memory"); }
QOQ_DEV void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;" ::: "memory"); }
#endif

// ---------------------------------------------------------------------------------------------------------------
// W4A8 GEMM with swapped operands (Hopper, sm_90a): Y^T = W X^T, so the weights are wgmma's A operand, taken from
// registers, and the tokens its N dimension (BT tokens per CTA, 16..128). Each warp of the single warpgroup streams
// one 32-channel n-tile's packed 16-byte lane chunks from global memory straight into registers (PF stages ahead)
// and dequantizes them in registers: in the artifact layout the low nibbles of a lane's four words are exactly the
// m16n8k32 / wgmma A fragment of the tile's rows 0-15 and the high nibbles that of rows 16-31. So per k32 step the
// warpgroup issues two m64nBTk32 wgmmas: the first computes channels 32w + 0..15 of warp w, the second 32w + 16..31.
// The dequantized weights never touch shared memory; only the activations do (cp.async ring of STAGES buffers,
// [BT][128] int8 K-major with the 128-byte swizzle, the same descriptor as above).
// Split-K over a thread-block cluster of CL CTAs along z (sm_90): every CTA writes its int32 accumulators to its
// shared memory; CTA rank r then adds token rows r mod CL of all CL CTAs (DSMEM; integer sums, exact in any
// order) and runs the epilogue for them.
// grid = (ceil(Np/128), ceil(M/BT), CL); tps: k-tiles per split (a multiple of 4; trailing splits may get none).

#if defined(QOQ_WGMMA)
// wgmma m64n{BT}k32 s8 with A (4 registers, the m16n8k32 A fragment of each warp's 16 rows) from registers
QOQ_DEV void wgmma_rs(int (&d)[8], const u32 (&a)[4], u64 db) {  // m64n16k32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7"
      "}, {%8, %9, %10, %11}, %12, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
QOQ_DEV void wgmma_rs(int (&d)[16], const u32 (&a)[4], u64 db) {  // m64n32k32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, {%16, %17, %18, %19}, %20, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
QOQ_DEV void wgmma_rs(int (&d)[24], const u32 (&a)[4], u64 db) {  // m64n48k32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %29, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n48k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23"
      "}, {%24, %25, %26, %27}, %28, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
      "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
QOQ_DEV void wgmma_rs(int (&d)[32], const u32 (&a)[4], u64 db) {  // m64n64k32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
      "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
      "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
QOQ_DEV void wgmma_rs(int (&d)[40], const u32 (&a)[4], u64 db) {  // m64n80k32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n80k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39"
      "}, {%40, %41, %42, %43}, %44, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
      "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
      "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
      "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
QOQ_DEV void wgmma_rs(int (&d)[48], const u32 (&a)[4], u64 db) {  // m64n96k32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
      "}, {%48, %49, %50, %51}, %52, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
      "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
      "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
      "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
      "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
QOQ_DEV void wgmma_rs(int (&d)[56], const u32 (&a)[4], u64 db) {  // m64n112k32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %61, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n112k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55"
      "}, {%56, %57, %58, %59}, %60, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
      "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
      "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
      "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
      "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
      "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
QOQ_DEV void wgmma_rs(int (&d)[64], const u32 (&a)[4], u64 db) {  // m64n128k32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p;\n}\n"
      :
      "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
      "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
      "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
      "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
      "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
      "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
      "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
      "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

#endif

template <int U> struct WgW {  // one stage of a warp's packed weights: U k-tiles (16-byte lane chunks, s2 / -z words)
  uint4 w[U];
  u32 s[U], z[U];
};

template <int U> struct WgFrag {  // wgmma A fragments of U k-tiles: rows 0-15 (lo) and 16-31 (hi) of a warp's n-tile
  u32 lo[U][4], hi[U][4];
};

template <int BT, int STAGES, int PF, int CL, bool GROUPED, bool OV, bool TMA>
QOQ_DEV void wgmma_swap_body(GEMM_PARAMS, const TmaMap* tma_a) {
#if defined(QOQ_WGMMA)
  constexpr int BK = 128, KTS = BK / 32, THREADS = 128, NACC = BT / 2;
  constexpr int STAGE = BT * BK, A_IT = BT * 8 / THREADS;  // activation bytes per stage, 16-byte chunks per thread
  static_assert(BT % 16 == 0 && BT <= 128 && STAGES >= 2 && PF >= 1, "swap kernel shape");
  static_assert(!(TMA && OV), "the TMA-fed swap kernel has no overlapped variant");
  extern __shared__ uint4 dsmem[];
  __shared__ __align__(8) u64 full[STAGES];  // TMA: stage buffer b's activations have landed
  const u32 sraw = smem_u32(dsmem), sbase = (sraw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c = lane >> 2, l = lane & 3;
  const int n0 = blockIdx.x * 128, t0 = blockIdx.y * BT;
  const int KT = Kp >> 5, NTILES = Np >> 5;
  const int kb = blockIdx.z * tps, ke = min(KT, kb + tps);
  const int nst = ke > kb ? (ke - kb + KTS - 1) / KTS : 0;

  const int a_row0 = tid >> 3, a_ch = tid & 7;
  const i8* a_base = A + (i64)(t0 + a_row0) * Kp + a_ch * 16;
  const u32 a_dst0 = a_row0 * BK + ((a_ch ^ (a_row0 & 7)) << 4);  // (row & 7) is the same for every it
  const u32 full0 = smem_u32(&full[0]);
  if (TMA) {
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) mbar_init(full0 + 8 * s, 1);
      mbar_init_fence();
    }
    __syncthreads();
  }
  auto load_a = [&](int buf, int kt0) {
    if (TMA) {  // one thread: the box's rows past M and k past Kp arrive as zeros
      if (tid == 0) {
        mbar_arrive_expect_tx(full0 + 8 * buf, (u32)STAGE);
        tma_load_2d(sbase + buf * STAGE, tma_a, kt0 * 32, t0, full0 + 8 * buf);
      }
      return;
    }
    const bool k_ok = kt0 * 32 + a_ch * 16 < ke * 32;
#pragma unroll
    for (int it = 0; it < A_IT; ++it) {
      const bool ok = k_ok && t0 + a_row0 + it * (THREADS / 8) < M;
      cp_async16(sbase + buf * STAGE + a_dst0 + it * (THREADS / 8) * BK,
                 ok ? a_base + (i64)it * (THREADS / 8) * Kp + kt0 * 32 : A, ok ? 16 : 0);
    }
  };
  const int nt = (n0 >> 5) + warp;
  const u8* w_base = W + (i64)nt * KT * 512 + lane * 16;
  auto load_w = [&](WgW<KTS>& r, int kt0) {
#pragma unroll
    for (int kk = 0; kk < KTS; ++kk) {
      const int kt = kt0 + kk;
      const bool ok = nt < NTILES && kt < ke;
      r.w[kk] = ok ? ldg_stream16(w_base + (i64)kt * 512) : make_uint4(0u, 0u, 0u, 0u);
      if (GROUPED) {
        const i64 gi = (i64)((kt << 5) >> log2g) * Np + nt * 32 + 4 * c;
        r.s[kk] = ok ? ldg_nc32(s2 + gi) : 0u;
        r.z[kk] = ok ? ldg_nc32(z2 + gi) : 0u;
      }
    }
  };

  int acc0[NACC], acc1[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc0[i] = acc1[i] = 0;

  WgW<KTS> wr[PF];
  auto dequant_stage = [&](const WgW<KTS>& r, WgFrag<KTS>& f) {
#pragma unroll
    for (int kk = 0; kk < KTS; ++kk) {
      u32 s[4] = {0u, 0u, 0u, 0u}, zb[4] = {0u, 0u, 0u, 0u};
      if (GROUPED) deq_params(r.s[kk], r.z[kk], s, zb);
      dequant_tile<GROUPED>(r.w[kk], s, zb, f.lo[kk], f.hi[kk]);
    }
  };
  auto issue_mma = [&](WgFrag<KTS>& f, int buf) {
    const u32 sb = sbase + buf * STAGE;
    // every fragment is computed before the fence (else ptxas injects a warpgroup.arrive before each wgmma)
#pragma unroll
    for (int kk = 0; kk < KTS; ++kk) {
      reg_fence(f.lo[kk]);
      reg_fence(f.hi[kk]);
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KTS; ++kk) {
      wgmma_rs(acc0, f.lo[kk], wg_desc(sb + kk * 32));
      wgmma_rs(acc1, f.hi[kk], wg_desc(sb + kk * 32));
    }
    wgmma_commit();
  };
  reg_fence(acc0);
  reg_fence(acc1);
  if (!OV) {
    // step t: stage t's activations are in buffer t % STAGES, its weights in wr[t % PF]; the wgmmas of step
    // t - 1 have completed (wait_group 0), so buffer (t - 1) % STAGES takes stage t + STAGES - 1
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < nst) load_a(s, kb + s * KTS);
      cp_async_commit();
    }
#pragma unroll
    for (int p = 0; p < PF; ++p)
      if (p < nst) load_w(wr[p], kb + p * KTS);
    auto step = [&](int t, WgW<KTS>& r) {
      if (TMA) {
        __syncthreads();  // every warp's wgmmas of step t - 1 completed: their buffer takes stage t + STAGES - 1
        mbar_wait(full0 + 8 * (t % STAGES), (u32)((t / STAGES) & 1));
      } else {
        // the fence compiles to MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S; without it (TMA) 0-7 % faster (NOTES.md)
        cp_async_wait<STAGES - 2>();
        fence_proxy_async();
        __syncthreads();
      }
      WgFrag<KTS> f;
      dequant_stage(r, f);
      if (t + PF < nst) load_w(r, kb + (t + PF) * KTS);
      issue_mma(f, t % STAGES);
      const int na = t + STAGES - 1;
      if (na < nst) load_a(na % STAGES, kb + na * KTS);
      cp_async_commit();
      wgmma_wait<0>();
    };
    for (int t = 0; t < nst; t += PF) {
#pragma unroll
      for (int p = 0; p < PF; ++p)
        if (t + p < nst) step(t + p, wr[p]);
    }
  } else {
    // Overlapped: the wgmmas of step t run while the warp dequantizes stage t + 1 into the other fragment buffer;
    // wait_group 1 after issuing step t frees step t - 1's fragments and (after the next barrier) its activation
    // buffer, so stage t + STAGES - 2 is loaded at step t (into buffer (t - 2) % STAGES).
    static_assert(!OV || (STAGES >= 3 && PF % 2 == 0), "overlapped swap kernel: STAGES >= 3, even PF");
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
      if (s < nst) load_a(s, kb + s * KTS);
      cp_async_commit();
    }
#pragma unroll
    for (int p = 0; p < PF; ++p)
      if (p < nst) load_w(wr[p], kb + p * KTS);
    WgFrag<KTS> fr[2];
    if (nst > 0) {
      dequant_stage(wr[0], fr[0]);
      if (PF < nst) load_w(wr[0], kb + PF * KTS);
    }
    auto step = [&](int t, WgFrag<KTS>& f, WgFrag<KTS>& fnext, WgW<KTS>& rnext) {
      cp_async_wait<STAGES - 3>();
      fence_proxy_async();
      __syncthreads();
      const int na = t + STAGES - 2;
      if (na < nst) load_a(na % STAGES, kb + na * KTS);
      cp_async_commit();
      issue_mma(f, t % STAGES);
      wgmma_wait<1>();
      if (t + 1 < nst) {
        dequant_stage(rnext, fnext);
        if (t + 1 + PF < nst) load_w(rnext, kb + (t + 1 + PF) * KTS);
      }
    };
    for (int t = 0; t < nst; t += PF) {
#pragma unroll
      for (int p = 0; p < PF; ++p)
        if (t + p < nst) step(t + p, fr[p & 1], fr[(p + 1) & 1], wr[(p + 1) % PF]);
    }
    wgmma_wait<0>();
  }
  reg_fence(acc0);
  reg_fence(acc1);
  cp_async_wait<0>();

  // The accumulators go through shared memory as a [BT][128] int32 tile (row pitch 132 words: the four token
  // rows of a store land in different banks), so that thread tid owns output channel n0 + tid: its channel scales
  // are loaded once and every warp stores 32 consecutive channels of a token row. With a cluster, CTA rank r adds
  // token rows r, r + CL, ... of all CL tiles (DSMEM) and stores those.
  constexpr int PITCH = 132;
  __syncthreads();  // every warp is past its last read of the ring, which now holds the tile
  int* tile = (int*)((u8*)dsmem + (sbase - sraw));
#pragma unroll
  for (int i = 0; i < NACC; ++i) {  // register 4j + 2hh + e: token 8j + 2l + e, channel 32 warp + 16h + 8hh + c
    const int row = 8 * (i >> 2) + 2 * l + (i & 1), col = 32 * warp + 8 * ((i >> 1) & 1) + c;
    tile[row * PITCH + col] = acc0[i];
    tile[row * PITCH + col + 16] = acc1[i];
  }
  u32 rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (CL > 1) {
    cluster_sync();
    rank = cluster_rank();
  } else {
    __syncthreads();
  }
#endif
  const EpiArgs e{sa, qsum, s1, szeros, bias, bias_dt, out, out_dt, N};
  const int ch = n0 + tid;
  EpiIn p;
  if (ch < N && out_dt != DT_I32) epi_load_channel(e, p, ch);
  for (int row = (int)rank; row < BT && t0 + row < M; row += CL) {
    const u32 slot = (u32)(row * PITCH + tid);
    int v = 0;
    if (CL == 1) {
      v = tile[slot];
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
      for (int r = 0; r < CL; ++r) v += ld_dsmem_s32(sbase + slot * 4u, (u32)r);
#endif
    }
    if (ch >= N) continue;
    const int tok = t0 + row;
    if (out_dt == DT_I32) {
      ((int*)out)[(i64)tok * N + ch] = v;
    } else {
      epi_load_row(e, p, tok);
      st_any(out, (i64)tok * N + ch, out_dt, epi_apply(e, p, v));
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (CL > 1) cluster_sync();  // the other CTAs keep their shared memory alive until every rank has read it
#endif
#else
  __trap();  // sm_90a only (gemm.py launches it on compute capability 9.0)
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Large M, two passes (sm_90a): the layer's W4 is first dequantized into an int8 [Np, Kp] scratch (gemm.cu's
// qoq_w4_dequant_*, one memory pass at about 2.5 TB/s), then this kernel multiplies int8 activations by int8
// weights with no arithmetic but the MMAs and the epilogue. Both operands arrive by the tensor-memory accelerator
// (cp.async.bulk.tensor, 2-D tensor maps built on the host with the 128-byte swizzle, so the boxes land in exactly
// the layout wg_desc describes; rows and k past the tensor are zero-filled), issued by one producer thread (warp
// 8) into a STAGES-deep ring. Two consumer warpgroups own 64 token rows each of a 128 x BN tile and keep one wgmma
// group in flight; one m64nBNk32 wgmma per k32 step, so a warpgroup reads its activation rows from shared memory
// once per step (two m64n128k32 at BN = 256 read them twice and measured 7-23 % slower).
// Persistent: the grid is at most one wave of CTAs, each looping over units of work; the ring runs on across
// units, so the producer loads the next unit while the consumers run this one's epilogue.
// Clusters of CL CTAs (CL = 2: adjacent row tiles, one column tile) share the weight tile: each CTA loads 1/CL of
// it and multicasts it to every CTA of the cluster, so a CTA pulls A + B/CL bytes from L2 per stage, not A + B.
// `full[s]` completes when a stage's bytes have landed (the local producer's arrival with expect_tx, and the
// bytes of every CTA's copies); `empty[s]` takes one arrival per consumer warp of every CTA of the cluster once its
// wgmmas that read stage s completed (a peer's copies write into this CTA's stage s too).
#define TMA_GEMM_PARAMS                                                                                          \
  const __grid_constant__ TmaMap tma_a, const __grid_constant__ TmaMap tma_w, const float *__restrict__ sa,     \
      const int *__restrict__ qsum, const u16 *__restrict__ s1, const u16 *__restrict__ szeros,                 \
      const void *__restrict__ bias, int bias_dt, void *__restrict__ out, int out_dt, int M, int N, int Np, int Kp
#define TMA_GEMM_ARGS tma_a, tma_w, sa, qsum, s1, szeros, bias, bias_dt, out, out_dt, M, N, Np, Kp
// the body takes the maps by reference: their address stays the kernel parameter's, which the copies read
#define TMA_BODY_PARAMS                                                                                          \
  const TmaMap &tma_a, const TmaMap &tma_w, const float *__restrict__ sa, const int *__restrict__ qsum,         \
      const u16 *__restrict__ s1, const u16 *__restrict__ szeros, const void *__restrict__ bias, int bias_dt,   \
      void *__restrict__ out, int out_dt, int M, int N, int Np, int Kp

template <int BN, int STAGES, int CL>
QOQ_DEV void wgmma_tma_body(TMA_BODY_PARAMS) {
#if defined(QOQ_WGMMA)
  constexpr int BM = 128, BK = 128, KTS = BK / 32;
  constexpr int A_BYTES = BM * BK, STAGE = A_BYTES + BN * BK, W_ROWS = BN / CL;
  static_assert((BN == 128 || BN == 256) && STAGES >= 2 && (CL == 1 || CL == 2), "TMA GEMM tile");
  extern __shared__ uint4 dsmem[];
  __shared__ __align__(8) u64 bars[2 * STAGES];  // full[s] = bars[s], empty[s] = bars[STAGES + s]
  const u32 sraw = smem_u32(dsmem), sbase = (sraw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  const u32 full0 = smem_u32(&bars[0]), empty0 = smem_u32(&bars[STAGES]);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rank = CL > 1 ? (int)cluster_rank() : 0;
  // a unit: CL adjacent row tiles x one column tile, in groups of WG_GROUP_M row-tile groups (L2 reuse)
  const int mgroups = ((M + BM - 1) / BM + CL - 1) / CL, ntiles = (Np + BN - 1) / BN, units = mgroups * ntiles;
  const int per_group = WG_GROUP_M * ntiles;
  auto unit_tile = [&](int u, int& m0, int& n0) {
    const int first = (u / per_group) * WG_GROUP_M, gm = min(mgroups - first, WG_GROUP_M), in = u % per_group;
    m0 = ((first + in % gm) * CL + rank) * BM;
    n0 = (in / gm) * BN;
  };
  const int nst = (Kp + BK - 1) / BK;
  const int unit_step = gridDim.x / CL;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 8 * CL);
    }
    mbar_init_fence();
  }
  if (CL > 1) cluster_sync();  // the peers' barriers are initialized before any copy or arrival reaches them
  else __syncthreads();

  if (warp == 8) {  // ---- producer: one thread issues every copy
    if (lane == 0) {
      int it = 0;  // stages issued so far (the ring runs on across units)
      for (int u = blockIdx.x / CL; u < units; u += unit_step) {
        int m0, n0;
        unit_tile(u, m0, n0);
        for (int t = 0; t < nst; ++t, ++it) {
          const int st = it % STAGES;
          if (it >= STAGES) mbar_wait(empty0 + 8 * st, (u32)((it / STAGES - 1) & 1));
          const u32 dst = sbase + st * STAGE, bar = full0 + 8 * st;
          mbar_arrive_expect_tx(bar, (u32)STAGE);  // out-of-bounds parts of a box count too (zero-filled)
          tma_load_2d(dst, &tma_a, t * BK, m0, bar);
          if (CL == 1) tma_load_2d(dst + A_BYTES, &tma_w, t * BK, n0, bar);
          else tma_load_2d_multicast(dst + A_BYTES + rank * W_ROWS * BK, &tma_w, t * BK, n0 + rank * W_ROWS, bar,
                                     (u16)((1 << CL) - 1));
        }
      }
    }
    __syncwarp();
  } else {  // ---- consumers: warpgroup wg owns token rows m0 + 64 wg .. +63
    const int wg = warp >> 2;
    auto release = [&](int st) {  // this warp's wgmmas that read stage st completed
      if (lane != 0) return;
      if (CL == 1) mbar_arrive(empty0 + 8 * st);
      else
#pragma unroll
        for (int r = 0; r < CL; ++r) mbar_arrive_remote(empty0 + 8 * st, (u32)r);
    };
    const EpiArgs e{sa, qsum, s1, szeros, bias, bias_dt, out, out_dt, N};
    int it = 0;
    for (int u = blockIdx.x / CL; u < units; u += unit_step) {
      int m0, n0;
      unit_tile(u, m0, n0);
      int acc[BN / 2];
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0;
      for (int t = 0; t < nst; ++t, ++it) {
        const int st = it % STAGES;
        mbar_wait(full0 + 8 * st, (u32)((it / STAGES) & 1));
        const u32 sa_ = sbase + st * STAGE + wg * 64 * BK, sb_ = sbase + st * STAGE + A_BYTES;
        reg_fence(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KTS; ++kk) {
          if constexpr (BN == 256) wgmma_m64n256k32_s8(acc, wg_desc(sa_ + kk * 32), wg_desc(sb_ + kk * 32));
          else wgmma_m64n128k32_s8(acc, wg_desc(sa_ + kk * 32), wg_desc(sb_ + kk * 32));
        }
        wgmma_commit();
        wgmma_wait<1>();  // the previous stage's wgmmas completed
        if (t > 0) release((it - 1) % STAGES);
      }
      wgmma_wait<0>();
      reg_fence(acc);
      release((it - 1) % STAGES);

      const int row0 = m0 + wg * 64 + (warp & 3) * 16 + (lane >> 2), col0 = n0 + 2 * (lane & 3);
      if (out_dt == DT_F16) wgmma_epilogue<BN, DT_F16>(e, acc, row0, col0, M);
      else if (out_dt == DT_BF16) wgmma_epilogue<BN, DT_BF16>(e, acc, row0, col0, M);
      else if (out_dt == DT_F32) wgmma_epilogue<BN, DT_F32>(e, acc, row0, col0, M);
      else wgmma_epilogue<BN, DT_I32>(e, acc, row0, col0, M);
    }
  }
  if (CL > 1) {  // no CTA leaves while a peer may still arrive on its barriers
    cluster_arrive_relaxed();
    cluster_wait();
  }
#else
  __trap();  // sm_90a only (gemm.py launches it on compute capability 9.0)
#endif
}
