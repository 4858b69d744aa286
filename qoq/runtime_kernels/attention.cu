// KV4 cache: quantize/append (optionally fused with RoPE) and decode attention over the 4-bit cache.
// Cache layout (ops.KV4Cache): codes uint8 [B, Hkv, Tmax, D/2] (element 2i low nibble, 2i+1 high nibble),
// scale / zero fp16 [B, Hkv, Tmax]; x_hat = (q - zero) * scale.

// ---- append -----------------------------------------------------------------------------------------------------
// One warp per item: items [0, nq) rotate a query row (rope only), then B*Hkv*T key rows, then B*Hkv*T value rows.
// Lane p handles elements {2p, 2p+1, D/2+2p, D/2+2p+1} (rotate-half pairs and the two output bytes p, D/4+p).
// Arithmetic is op for op the torch reference: rope in fp32 rounded to the input dtype, then kv4_quantize.
#define KV_MAXIT 2  // D <= 256
extern "C" __global__ void __launch_bounds__(256) qoq_kv4_append(
    const void* __restrict__ qx, const void* __restrict__ kx, const void* __restrict__ vx, int x_dt,
    i64 qsb, i64 qsh, i64 qst, i64 ksb, i64 ksh, i64 kst, i64 vsb, i64 vsh, i64 vst,
    const void* __restrict__ cosp, const void* __restrict__ sinp, int cs_dt, i64 csb, i64 cst,
    void* __restrict__ q_out, void* __restrict__ k_out,
    u8* __restrict__ kc, u16* __restrict__ ksc, u16* __restrict__ kzc,
    u8* __restrict__ vc, u16* __restrict__ vsc, u16* __restrict__ vzc, const i64* __restrict__ start,
    int B, int Hq, int Hkv, int T, int D, int Tmax, int rope) {
  const int lane = threadIdx.x & 31;
  const i64 item = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const i64 nq = rope ? (i64)B * Hq * T : 0;
  const i64 nkv = (i64)B * Hkv * T;
  if (item >= nq + 2 * nkv) return;
  int kind, b, h, t;  // kind 0 = q, 1 = k, 2 = v
  i64 r;
  if (item < nq) { kind = 0; r = item; }
  else if (item < nq + nkv) { kind = 1; r = item - nq; }
  else { kind = 2; r = item - nq - nkv; }
  const int H = kind == 0 ? Hq : Hkv;
  t = (int)(r % T); r /= T;
  h = (int)(r % H); b = (int)(r / H);
  const void* src = kind == 0 ? qx : (kind == 1 ? kx : vx);
  const i64 off = kind == 0 ? b * qsb + h * qsh + t * qst : (kind == 1 ? b * ksb + h * ksh + t * kst : b * vsb + h * vsh + t * vst);
  const int half = D >> 1, quarter = D >> 2;
  float xv[KV_MAXIT][4];
  float lo = 3.402823466e38f, hi = -3.402823466e38f;
#pragma unroll
  for (int it = 0; it < KV_MAXIT; ++it) {
    const int p = lane + 32 * it;
    if (p < quarter) {
      const int e[4] = {2 * p, 2 * p + 1, half + 2 * p, half + 2 * p + 1};
      float x[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = ld_any(src, off + e[i], x_dt);
      if (rope && kind != 2) {
        const i64 coff = b * csb + t * cst;
        float y[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float cv = ld_any(cosp, coff + e[i], cs_dt), sv = ld_any(sinp, coff + e[i], cs_dt);
          const float rot = i < 2 ? -x[i + 2] : x[i - 2];
          y[i] = __fadd_rn(__fmul_rn(x[i], cv), __fmul_rn(rot, sv));
        }
        void* dst = kind == 0 ? q_out : k_out;
        const i64 doff = (((i64)b * H + h) * T + t) * D;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          // round to the input dtype, as apply_rope's .to(x.dtype)
          const float yr = x_dt == DT_F16 ? h2f(f2h(y[i])) : (x_dt == DT_BF16 ? bf2f(f2bf(y[i])) : y[i]);
          x[i] = yr;
          if (dst) st_any(dst, doff + e[i], x_dt, yr);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xv[it][i] = x[i];
        lo = fminf(lo, x[i]);
        hi = fmaxf(hi, x[i]);
      }
    }
  }
  if (kind == 0) return;
  lo = warp_min(lo);
  hi = warp_max(hi);
  // torch evaluates `(hi - lo) / 15` (division by a Python scalar) on CUDA as (hi - lo) * (1/15)
  const u16 s16 = f2h(hi > lo ? __fmul_rn(__fsub_rn(hi, lo), 1.0f / 15.0f) : 1.0f);
  const float sf = h2f(s16);
  const u16 z16 = f2h(__fdiv_rn(-lo, sf));
  const float zf = h2f(z16);
  const int pos = (int)start[b] + t;
  if (pos < 0 || pos >= Tmax) return;
  const i64 row = ((i64)b * Hkv + h) * Tmax + pos;
  u8* codes = kind == 1 ? kc : vc;
#pragma unroll
  for (int it = 0; it < KV_MAXIT; ++it) {
    const int p = lane + 32 * it;
    if (p < quarter) {
      int qi[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        qi[i] = __float2int_rn(__fadd_rn(__fdiv_rn(xv[it][i], sf), zf));
        qi[i] = min(15, max(0, qi[i]));
      }
      codes[row * half + p] = (u8)(qi[0] | (qi[1] << 4));
      codes[row * half + quarter + p] = (u8)(qi[2] | (qi[3] << 4));
    }
  }
  if (lane == 0) {
    (kind == 1 ? ksc : vsc)[row] = s16;
    (kind == 1 ? kzc : vzc)[row] = z16;
  }
}

// ---- decode attention ----------------------------------------------------------------------------------------------
// CTA = (kv head, batch, split); NW warps take 16-token chunks of the split's range in turn. All G = Hq/Hkv query
// heads of the kv head share each K/V load (GQA), as the M rows (<= 16) of fp16 tensor-core MMAs:
//   S = Q K^T:  dot_t = sum_d q_d c_td on the raw 4-bit codes (exact small integers in fp16), then
//               score = scale_t * (dot_t - zero_t * sum_d q_d)  (the dequant folded out of the inner loop);
//   O = P V:    with p'_t = p_t * vscale_t, O_d = sum_t p'_t c_td - sum_t p'_t vzero_t.
// Codes become fp16 with the 0x6400 magic (no int->float conversions). The head dim is permuted freely inside a
// lane's fragments (the same permutation on both operands): lane (g, l) reads bytes [l*D/8, (l+1)*D/8) of a K row
// and bytes [g*D/16, (g+1)*D/16) of a V row. Each warp streams its chunks (codes, scales, zeros) through its own
// NSTAGE-deep cp.async ring in shared memory, so several chunks are in flight per warp without holding registers.
// Online softmax in the log2 domain, per-warp state merged through shared memory; splits (flash-decoding) are
// merged by qoq_attn_combine.
QOQ_DEV void cvt_k_block(u32 w, int s, u32& b0, u32& b1) {
  const u32 u = prmt(w, 0u, s ? 0x3322u : 0x1100u);  // bytes [B, B, B', B'] of the block's two bytes
  b0 = hadd2((u & 0x000F000Fu) | 0x64006400u, 0xE400E400u);                // (c0, c2) = lo nibbles
  b1 = hfma2((u & 0x00F000F0u) | 0x64006400u, 0x2C002C00u, 0xD400D400u);   // (c1, c3) = hi nibbles
}
QOQ_DEV u32 cvt_v_pair(u32 w0, u32 w1, int byte, int hi) {  // half2(code of token 0, code of token 1)
  const u32 sel = (u32)byte | ((u32)byte << 4) | ((u32)(4 + byte) << 8) | ((u32)(4 + byte) << 12);
  const u32 u = prmt(w0, w1, sel);
  if (hi) return hfma2((u & 0x00F000F0u) | 0x64006400u, 0x2C002C00u, 0xD400D400u);
  return hadd2((u & 0x000F000Fu) | 0x64006400u, 0xE400E400u);
}

template <int NWORDS>
QOQ_DEV void ld_words(const u8* p, u32 w[NWORDS]) {
  if (NWORDS == 4) { const uint4 v = *(const uint4*)p; w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w; }
  else if (NWORDS == 8) {
    const uint4 v = *(const uint4*)p, x = *(const uint4*)(p + 16);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w; w[4] = x.x; w[5] = x.y; w[6] = x.z; w[7] = x.w;
  } else if (NWORDS == 2) { const uint2 v = *(const uint2*)p; w[0] = v.x; w[1] = v.y; }
  else { w[0] = *(const u32*)p; }
}

template <int D>
__host__ __device__ constexpr int attn_slot_bytes() { return 16 * D + 128; }  // K + V codes of 16 tokens, then 4 x 16 fp16 scales/zeros

template <int D, int NW, int NSTAGE>
QOQ_DEV void attn_body(const u16* __restrict__ q, const u8* __restrict__ kc, const u16* __restrict__ ksc,
                       const u16* __restrict__ kzc, const u8* __restrict__ vc, const u16* __restrict__ vsc,
                       const u16* __restrict__ vzc, const i64* __restrict__ lengths, float scale_log2, int Hq,
                       int Hkv, int Tmax, int S, int chunk, void* __restrict__ out, int out_dt,
                       float* __restrict__ part_o, float* __restrict__ part_ml) {
  constexpr int KB = D / 16;        // k16 blocks of the head dim (QK)
  constexpr int KW = D / 32;        // 32-bit words of a lane's K row segment (D/8 bytes)
  constexpr int VW = D / 64;        // 32-bit words of a lane's V row segment (D/16 bytes)
  constexpr int NJ = D / 8;         // n8 tiles of the head dim (PV)
  constexpr int ROWB = D / 2;       // bytes of one token's codes
  constexpr int CPR = ROWB / 16;    // 16-byte chunks per row
  constexpr int CODE = 16 * ROWB;   // codes of one 16-token chunk
  constexpr int SLOT = attn_slot_bytes<D>();
  constexpr int OPAD = D + 4;
  extern __shared__ uint4 attn_dsm[];
  __shared__ float sm_m[NW][16];
  __shared__ float sm_o[16][OPAD];
  __shared__ float sm_l[16];
  const int kvh = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int G = Hq / Hkv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, l = lane & 3;
  const int len = (int)lengths[b];
  const int t_begin = split * chunk, t_end = min(len, t_begin + chunk);
  const i64 rowbase = ((i64)b * Hkv + kvh) * Tmax;
  u8* ring = (u8*)attn_dsm + warp * (NSTAGE * SLOT);
  const bool scales_async = !(Tmax & 1);

  // Q as the A operand: rows = heads g (a0, a2) and g + 8 (a1, a3); k index 2l+j <-> d = l*D/4 + 4kb + {0,2}[j],
  // 8+2l+j <-> d = l*D/4 + 4kb + {1,3}[j]
  u32 qa[KB][4];
  float qs[2] = {0.f, 0.f};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int hl = g + 8 * hh;
    const bool ok = hl < G;
    const u16* qp = q + ((i64)b * Hq + kvh * G + hl) * D + l * (D / 4);
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      u32 x01 = 0u, x23 = 0u;
      if (ok) { x01 = *(const u32*)(qp + 4 * kb); x23 = *(const u32*)(qp + 4 * kb + 2); }
      qa[kb][hh] = (x01 & 0xffffu) | (x23 << 16);          // (d+0, d+2)
      qa[kb][2 + hh] = (x01 >> 16) | (x23 & 0xffff0000u);  // (d+1, d+3)
      qs[hh] += h2f((u16)(x01 & 0xffffu)) + h2f((u16)(x01 >> 16)) + h2f((u16)(x23 & 0xffffu)) + h2f((u16)(x23 >> 16));
    }
    qs[hh] += __shfl_xor_sync(0xffffffffu, qs[hh], 1);
    qs[hh] += __shfl_xor_sync(0xffffffffu, qs[hh], 2);
  }

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, z_run[2] = {0.f, 0.f};
  float acc[NJ][4];
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  const int nchunks = t_end > t_begin ? (t_end - t_begin + 15) / 16 : 0;
  const int mine = nchunks > warp ? (nchunks - warp + NW - 1) / NW : 0;

  // chunk i of this warp -> ring slot i % NSTAGE: K codes [16][ROWB], V codes (16-byte chunks XOR-swizzled by
  // row pair, so the lanes' 8-byte reads of 4 rows hit different banks), then k_scale, k_zero, v_scale, v_zero [16]
  constexpr int C_IT = 16 * CPR / 32, C_ROWS = 32 / CPR;  // copy iterations per lane, rows per iteration
  const int c_row0 = lane / CPR, c_ch = lane % CPR;
  const i64 first = rowbase + t_begin + warp * 16;          // first token row of this warp's chunk 0
  const u8* k_lane = kc + (first + c_row0) * ROWB + c_ch * 16;
  const u8* v_lane = vc + (first + c_row0) * ROWB + c_ch * 16;
  const int s_arr = lane >> 3, s_w = lane & 7;
  const u16* s_lane = (s_arr == 0 ? ksc : (s_arr == 1 ? kzc : (s_arr == 2 ? vsc : vzc))) + first + 2 * s_w;
  constexpr int CHUNK_STEP = NW * 16;  // tokens between a warp's consecutive chunks
  auto issue = [&](int i) {
    const int t0 = t_begin + (warp + i * NW) * 16;
    const int nvalid = t_end - t0;  // >= 1
    const u32 sK = smem_u32(ring + (i % NSTAGE) * SLOT), sV = sK + CODE, sS = sV + CODE;
    const int off = i * CHUNK_STEP * ROWB;
#pragma unroll
    for (int it = 0; it < C_IT; ++it) {
      const int row = c_row0 + it * C_ROWS;
      const bool ok = row < nvalid;
      const int o = off + it * C_ROWS * ROWB;
      cp_async16(sK + row * ROWB + c_ch * 16, ok ? k_lane + o : kc, ok ? 16 : 0);
      cp_async16(sV + row * ROWB + ((c_ch ^ ((row >> 1) & (CPR - 1))) << 4), ok ? v_lane + o : vc, ok ? 16 : 0);
    }
    const bool ok = 2 * s_w < nvalid;
    const u16* src = s_lane + i * CHUNK_STEP;
    if (scales_async) {  // 2 tokens per 4-byte copy (Tmax even: aligned, never past the row's end)
      cp_async4(sS + s_arr * 32 + s_w * 4, ok ? (const void*)src : (const void*)ksc, ok ? 4 : 0);
    } else {
      const u16 v0 = ok ? src[0] : (u16)0;
      const u16 v1 = 2 * s_w + 1 < nvalid ? src[1] : (u16)0;
      *(u32*)(ring + (i % NSTAGE) * SLOT + 2 * CODE + s_arr * 32 + s_w * 4) = (u32)v0 | ((u32)v1 << 16);
    }
  };

  // FULL: all 16 tokens of the chunk are < t_end (every chunk but the last): no masking
  auto compute = [&](int i, const bool FULL) {  // inlined at two call sites: FULL is a constant in each
    const int t0 = t_begin + (warp + i * NW) * 16;
    const u8* sK = ring + (i % NSTAGE) * SLOT;
    const u8* sV = sK + CODE;
    const u32* sS = (const u32*)(sV + CODE);  // half2 words: [array][8 token pairs]
    // S = Q K^T on codes
    float sc[2][4];
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      u32 kw[KW];
      ld_words<KW>(sK + (8 * tile + g) * ROWB + l * (D / 8), kw);
      sc[tile][0] = sc[tile][1] = sc[tile][2] = sc[tile][3] = 0.f;
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) {
        u32 b0, b1;
        cvt_k_block(kw[kb >> 1], kb & 1, b0, b1);
        mma_f16(sc[tile], qa[kb], b0, b1);
      }
    }
    // token pair (2l, 2l+1) of tile t: word 4t + l of each scale array
    float ks[4], kz[4], vs[4], vz[4];
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      const u32 wks = sS[4 * tile + l], wkz = sS[8 + 4 * tile + l], wvs = sS[16 + 4 * tile + l], wvz = sS[24 + 4 * tile + l];
      ks[2 * tile] = h2f((u16)wks); ks[2 * tile + 1] = h2f((u16)(wks >> 16));
      kz[2 * tile] = h2f((u16)wkz); kz[2 * tile + 1] = h2f((u16)(wkz >> 16));
      vs[2 * tile] = h2f((u16)wvs); vs[2 * tile + 1] = h2f((u16)(wvs >> 16));
      vz[2 * tile] = h2f((u16)wvz); vz[2 * tile + 1] = h2f((u16)(wvz >> 16));
    }
    bool valid[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      valid[r] = FULL || (t0 + 8 * (r >> 1) + 2 * l + (r & 1) < t_end);
      if (!FULL && !valid[r]) vs[r] = vz[r] = 0.f;
    }
    // scores (log2 domain) and online softmax; element (tile, e): head g + 8*(e>>1), token r = 2*tile + (e&1)
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int tile = 0; tile < 2; ++tile)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 2 * tile + (e & 1), hh = e >> 1;
        float sv = (sc[tile][e] - kz[r] * qs[hh]) * (ks[r] * scale_log2);
        if (!FULL && !valid[r]) sv = -INFINITY;
        sc[tile][e] = sv;
        mx[hh] = fmaxf(mx[hh], sv);
      }
    float alpha[2], muse[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
      const float mnew = fmaxf(m_run[hh], mx[hh]);
      muse[hh] = mnew == -INFINITY ? 0.f : mnew;
      alpha[hh] = ex2(m_run[hh] - muse[hh]);
      m_run[hh] = mnew;
    }
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {  // the running max moved
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        l_run[hh] *= alpha[hh];
        z_run[hh] *= alpha[hh];
      }
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        acc[j][0] *= alpha[0]; acc[j][1] *= alpha[0];
        acc[j][2] *= alpha[1]; acc[j][3] *= alpha[1];
      }
    }
    u32 pa[4];
#pragma unroll
    for (int tile = 0; tile < 2; ++tile)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r0 = 2 * tile;
        const float p0 = ex2(sc[tile][2 * hh] - muse[hh]), p1 = ex2(sc[tile][2 * hh + 1] - muse[hh]);
        l_run[hh] += p0 + p1;
        const u32 h = pack_h2(p0 * vs[r0], p1 * vs[r0 + 1]);  // p' = p * v_scale, rounded to fp16 once
        z_run[hh] += h2f((u16)h) * vz[r0] + h2f((u16)(h >> 16)) * vz[r0 + 1];
        pa[2 * tile + hh] = h;
      }
    // V words of tokens r (8*(r>>1) + 2l + (r&1)), bytes [g*D/16, (g+1)*D/16) of the row, un-swizzled
    u32 vw[4][VW];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = 8 * (r >> 1) + 2 * l + (r & 1);
      const int byte = g * (D / 16);
      const int ch = (byte >> 4) ^ ((row >> 1) & (CPR - 1));
      ld_words<VW>(sV + row * ROWB + (ch << 4) + (byte & 15), vw[r]);
    }
    // O += P' Vcodes; n8 tile j <-> lane byte j>>1, nibble j&1; column n <-> d = (D/8)*n + j
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int byte = j >> 1, wi = byte >> 2, bi = byte & 3;
      const u32 b0 = cvt_v_pair(vw[0][wi], vw[1][wi], bi, j & 1);
      const u32 b1 = cvt_v_pair(vw[2][wi], vw[3][wi], bi, j & 1);
      mma_f16(acc[j], pa, b0, b1);
    }
  };

#pragma unroll
  for (int s = 0; s < NSTAGE - 1; ++s) {
    if (s < mine) issue(s);
    cp_async_commit();
  }
  for (int i = 0; i < mine; ++i) {
    cp_async_wait<NSTAGE - 2>();
    __syncwarp();
    if (i + NSTAGE - 1 < mine) issue(i + NSTAGE - 1);
    cp_async_commit();
    if (t_begin + (warp + i * NW) * 16 + 16 <= t_end) compute(i, true);
    else compute(i, false);
  }
  cp_async_wait<0>();

  // per-warp state -> CTA: global max, then warps add their rescaled partials in turn (deterministic)
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_run[hh] += __shfl_xor_sync(0xffffffffu, l_run[hh], 1);
    l_run[hh] += __shfl_xor_sync(0xffffffffu, l_run[hh], 2);
    z_run[hh] += __shfl_xor_sync(0xffffffffu, z_run[hh], 1);
    z_run[hh] += __shfl_xor_sync(0xffffffffu, z_run[hh], 2);
  }
  if (l == 0) { sm_m[warp][g] = m_run[0]; sm_m[warp][g + 8] = m_run[1]; }
  __syncthreads();
  float wsc[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) mm = fmaxf(mm, sm_m[w][g + 8 * hh]);
    wsc[hh] = m_run[hh] == -INFINITY ? 0.f : exp2f(m_run[hh] - mm);
  }
  for (int w = 0; w < NW; ++w) {
    if (warp == w) {
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e >> 1, hl = g + 8 * hh;
          const int d = (D / 8) * (2 * l + (e & 1)) + j;
          const float v = (acc[j][e] - z_run[hh]) * wsc[hh];
          sm_o[hl][d] = w == 0 ? v : sm_o[hl][d] + v;
        }
      if (l == 0) {
        sm_l[g] = w == 0 ? l_run[0] * wsc[0] : sm_l[g] + l_run[0] * wsc[0];
        sm_l[g + 8] = w == 0 ? l_run[1] * wsc[1] : sm_l[g + 8] + l_run[1] * wsc[1];
      }
    }
    __syncthreads();
  }
  for (int i = tid; i < G * D; i += NW * 32) {
    const int hl = i / D, d = i % D;
    const int hq = kvh * G + hl;
    const float o = sm_o[hl][d], lsum = sm_l[hl];
    if (S == 1) {
      st_any(out, ((i64)b * Hq + hq) * D + d, out_dt, lsum > 0.f ? o / lsum : 0.f);
    } else {
      const i64 pi = ((i64)b * Hq + hq) * S + split;
      part_o[pi * D + d] = o;
      if (d == 0) {
        float mm = -INFINITY;
        for (int w = 0; w < NW; ++w) mm = fmaxf(mm, sm_m[w][hl]);
        part_ml[2 * pi] = mm;
        part_ml[2 * pi + 1] = lsum;
      }
    }
  }
}

// merge the S splits (S <= ATTN_MAX_SPLITS) of each (batch, head): grid B*Hq, block of a multiple of 32 threads
// (<= 256). The threads share the splits' weights (max and sum reduced across the block in a fixed order), then
// thread d sums its column over the splits with independent loads.
#define ATTN_MAX_SPLITS 1024
template <typename Op>
QOQ_DEV float attn_block_reduce(float v, float* sh, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float r = sh[0];
  for (int w = 1; w < nw; ++w) r = op(r, sh[w]);
  return r;
}
struct AttnMax { QOQ_DEV float operator()(float a, float b) const { return fmaxf(a, b); } };
struct AttnAdd { QOQ_DEV float operator()(float a, float b) const { return a + b; } };

extern "C" __global__ void __launch_bounds__(256) qoq_attn_combine(const float* __restrict__ part_o,
                                                                   const float* __restrict__ part_ml, int S, int D,
                                                                   void* __restrict__ out, int out_dt) {
  __shared__ float wsplit[ATTN_MAX_SPLITS];
  __shared__ float red[8];
  const i64 bh = blockIdx.x;
  const float* ml = part_ml + 2 * bh * S;
  float mm = -INFINITY;
  for (int s = threadIdx.x; s < S; s += blockDim.x) mm = fmaxf(mm, ml[2 * s]);
  mm = attn_block_reduce(mm, red, AttnMax());
  float lsum = 0.f;
  for (int s = threadIdx.x; s < S; s += blockDim.x) {
    const float ms = ml[2 * s];
    const float w = ms == -INFINITY ? 0.f : exp2f(ms - mm);
    wsplit[s] = w;
    lsum += w * ml[2 * s + 1];
  }
  lsum = attn_block_reduce(lsum, red, AttnAdd());  // (its barriers also publish wsplit)
  const float* po = part_o + bh * S * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
#pragma unroll 8
    for (int s = 0; s < S; ++s) {
      const float w = wsplit[s], v = po[(i64)s * D + d];
      o += w != 0.f ? w * v : 0.f;  // an empty split's weight is 0
    }
    st_any(out, bh * D + d, out_dt, lsum > 0.f ? o / lsum : 0.f);
  }
}

#define ATTN_PARAMS                                                                                        \
  const u16 *__restrict__ q, const u8 *__restrict__ kc, const u16 *__restrict__ ksc, const u16 *__restrict__ kzc, \
      const u8 *__restrict__ vc, const u16 *__restrict__ vsc, const u16 *__restrict__ vzc,                 \
      const i64 *__restrict__ lengths, float scale_log2, int Hq, int Hkv, int Tmax, int S, int chunk,       \
      void *__restrict__ out, int out_dt, float *__restrict__ part_o, float *__restrict__ part_ml
#define ATTN_ARGS q, kc, ksc, kzc, vc, vsc, vzc, lengths, scale_log2, Hq, Hkv, Tmax, S, chunk, out, out_dt, part_o, part_ml
