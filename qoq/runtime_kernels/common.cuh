// qoq runtime kernels: shared helpers. No #include: every source compiles with NVRTC and with nvcc.
// All inline PTX targets sm_80+ (mma.sync m16n8k32 s8, m16n8k16 f16, cp.async, ldmatrix).
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef signed char i8;
typedef long long i64;
typedef unsigned long long u64;

#define QOQ_DEV __device__ __forceinline__
#ifndef INFINITY  // NVRTC has no math.h
#define INFINITY __int_as_float(0x7f800000)
#endif

// dtype codes shared with the Python launchers
#define DT_F16 0
#define DT_BF16 1
#define DT_F32 2
#define DT_I32 3

QOQ_DEV float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
QOQ_DEV u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
QOQ_DEV float bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }
QOQ_DEV u16 f2bf(float f) {  // round-to-nearest-even, NaN -> canonical quiet NaN (as torch)
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}
// load element i of a tensor of runtime dtype as fp32
QOQ_DEV float ld_any(const void* p, i64 i, int dt) {
  if (dt == DT_F16) return h2f(((const u16*)p)[i]);
  if (dt == DT_BF16) return bf2f(((const u16*)p)[i]);
  return ((const float*)p)[i];
}
QOQ_DEV void st_any(void* p, i64 i, int dt, float v) {
  if (dt == DT_F16) ((u16*)p)[i] = f2h(v);
  else if (dt == DT_BF16) ((u16*)p)[i] = f2bf(v);
  else ((float*)p)[i] = v;
}

QOQ_DEV u32 smem_u32(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}
// 16-byte async copy global->shared; src_bytes = 0 zero-fills the destination
QOQ_DEV void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// 4-byte async copy (L1-allocating .ca form, the only one for sizes < 16)
QOQ_DEV void cp_async4(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
QOQ_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> QOQ_DEV void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

QOQ_DEV void ldmatrix_x4(u32 r[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// streaming 16-byte global load that does not pollute L1 (weights are read once)
QOQ_DEV uint4 ldg_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
QOQ_DEV u32 ldg_nc32(const void* p) {
  u32 v;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
QOQ_DEV uint2 ldg_nc64(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
QOQ_DEV int ld_cg_s32(const int* p) {
  int v;
  asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// D += A(16x32 s8, row) * B(32x8 s8, col), int32 accumulate
QOQ_DEV void mma_s8(int c[4], const u32 a[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// D += A(16x16 f16, row) * B(16x8 f16, col), fp32 accumulate
QOQ_DEV void mma_f16(float c[4], const u32 a[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
QOQ_DEV u32 pack_h2(float lo, float hi) { return (u32)f2h(lo) | ((u32)f2h(hi) << 16); }
QOQ_DEV u32 hadd2(u32 a, u32 b) { u32 r; asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
QOQ_DEV u32 hfma2(u32 a, u32 b, u32 c) { u32 r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r; }
QOQ_DEV u32 prmt(u32 a, u32 b, u32 sel) { u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel)); return r; }

// sm_90 thread-block clusters: barrier over the cluster (release/acquire: shared-memory writes before it are
// visible to every CTA of the cluster after it), this CTA's rank, the address in CTA `rank`'s shared memory of
// what is at `local` in this CTA, and loads from there
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
QOQ_DEV void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
QOQ_DEV u32 cluster_rank() { u32 r; asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r)); return r; }
QOQ_DEV u32 dsmem_addr(u32 local, u32 rank) {
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  return remote;
}
QOQ_DEV int ld_dsmem_s32(u32 local, u32 rank) {
  int v;
  asm volatile("ld.shared::cluster.s32 %0, [%1];" : "=r"(v) : "r"(dsmem_addr(local, rank)) : "memory");
  return v;
}
QOQ_DEV float ld_dsmem_f32(u32 local, u32 rank) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(dsmem_addr(local, rank)) : "memory");
  return v;
}
QOQ_DEV double ld_dsmem_f64(u32 local, u32 rank) {
  double v;
  asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(dsmem_addr(local, rank)) : "memory");
  return v;
}
#endif

// Programmatic dependent launch (sm_90+; no-ops below and when the grid was launched without the attribute):
// `pdl_trigger` lets the next kernel in the stream, if it was launched with programmatic stream serialization,
// start its CTAs now (they run up to their `pdl_wait`); `pdl_wait` blocks until every prerequisite grid has
// completed and its memory writes are visible. Before `pdl_wait` a kernel may only read data no earlier kernel
// writes (weights, scales).
QOQ_DEV void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
QOQ_DEV void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

QOQ_DEV float ex2(float x) { float y; asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }

QOQ_DEV float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
QOQ_DEV float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
