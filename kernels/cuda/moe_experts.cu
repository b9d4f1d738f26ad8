// moe_experts.cu: MoE stage 3, "experts" - each expert's SwiGLU MLP over its dispatched rows, all experts in
// one launch per projection.
//
// NOT YET RUN ON A GPU: written and compiled (nvcc -ptx) on a machine without one; `moe-run selftest --device
// cuda --filter experts` is its first real check. The prefill GEMM runs on tensor cores (WMMA, f32 accumulate)
// for bf16/f16 and as plain f32 FMA for f32; neither is tuned (no async copies, no double buffering).
//
// Legend: N tokens, E experts, H hidden, F expert ffn width, R dispatched rows (S = N*K, plus padding).
//   x         [N, H]      act dtype T (f32/bf16/f16)
//   row_token [R]         u32 token of each dispatched row (from moe_dispatch)
//   counts    [E]         u32 live rows of each expert; expert e owns rows offsets[e] .. offsets[e] + counts[e]
//   offsets   [E+1]       u32
//   gate_up   [E, 2F, H]  T, rows 0..F gate, F..2F up (canonical layout)
//   down      [E, H, F]   T
//   act       [R, F]      T scratch: act = T(silu(x Wg^T) * (x Wu^T)), the f32 products rounded once
//   out       [R, H]      T: out = T(act Wd^T). Padding rows of act/out are never written.
// Every dot product accumulates in f32. silu(g) = g / (1 + exp(-g)).
//
// Which experts run is data (counts) that the host does not know without a sync, so grid.y = min(E, S) "active
// expert" slots (GEMV) or S/BM + min(E, S) "row tiles" (GEMM): block y finds its expert by scanning counts
// (E <= a few hundred loads from L1), and blocks beyond the active work exit at once.
//
// Path choice (kernels/src/experts.rs `expert_path`): GEMV for decode (a few rows per expert: each warp streams
// one weight row with 16-byte loads and dots it with up to GEMV_ROWS token rows, so each weight byte is read
// once per chunk of GEMV_ROWS rows), tiled GEMM otherwise (64-row tiles staged through shared memory).
#include "common.cuh"

#include <mma.h>

#define GEMV_WARPS 8
#define GEMV_ROWS 4
#define GEMV_LOADS 4  // 16-byte weight loads per lane in flight (warp_dot_rows)

// The expert of the y-th expert with at least one row (in expert order), or -1.
__device__ __forceinline__ int nth_active_expert(const uint32_t* __restrict__ counts, uint32_t E, uint32_t y) {
  uint32_t seen = 0;
  for (uint32_t e = 0; e < E; ++e) {
    if (counts[e] > 0) {
      if (seen == y) return static_cast<int>(e);
      ++seen;
    }
  }
  return -1;
}

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

// ---- decode: GEMV ------------------------------------------------------------------------------------------
// Dot products of one weight row w[0..len) with up to GEMV_ROWS activation rows a_r[0..len), reduced over the
// warp; every lane returns the full sums. VEC: 16-byte loads (len % Vec16<T>::N == 0, 16-byte aligned bases).
template <typename T, bool VEC>
__device__ __forceinline__ void warp_dot_rows(const T* __restrict__ w, const T* const* a, uint32_t nrows,
                                              uint32_t len, float* acc) {
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; ++r) acc[r] = 0.f;
  const uint32_t lane = threadIdx.x % 32;
  if (VEC) {
    constexpr int V = Vec16<T>::N;
    const uint32_t nv = len / V;
    // GEMV_LOADS weight vectors per lane issued before any is used (a warp keeps 2 KiB of the row in flight
    // rather than 512 bytes), then the remainder one at a time.
    auto step = [&](const Vec16<T>& wv, uint32_t v) {
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; ++r) {
        if (r < nrows) {
          const Vec16<T> av = load_vec16_ro(a[r] + static_cast<size_t>(v) * V);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[r] = fmaf(to_float(wv.v[i]), to_float(av.v[i]), acc[r]);
        }
      }
    };
    uint32_t v = lane;
    for (; v + 32 * (GEMV_LOADS - 1) < nv; v += 32 * GEMV_LOADS) {
      Vec16<T> wv[GEMV_LOADS];
#pragma unroll
      for (int u = 0; u < GEMV_LOADS; ++u) wv[u] = load_vec16_ro(w + static_cast<size_t>(v + 32 * u) * V);
#pragma unroll
      for (int u = 0; u < GEMV_LOADS; ++u) step(wv[u], v + 32 * u);
    }
    for (; v < nv; v += 32) step(load_vec16_ro(w + static_cast<size_t>(v) * V), v);
  } else {
    for (uint32_t k = lane; k < len; k += 32) {
      const float wk = to_float(w[k]);
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; ++r)
        if (r < nrows) acc[r] = fmaf(wk, to_float(a[r][k]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; ++r) acc[r] = warp_sum(acc[r]);
}

// grid = (ceil(F / GEMV_WARPS), min(E, S)), block = 32 * GEMV_WARPS. Warp w of block (bx, y) computes act[:, f]
// for f = bx * GEMV_WARPS + w over all rows of the y-th active expert.
template <typename T>
__device__ void gate_up_gemv_impl(const T* __restrict__ x, const uint32_t* __restrict__ row_token,
                                  const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets,
                                  const T* __restrict__ gate_up, T* __restrict__ act, uint32_t E, uint32_t H,
                                  uint32_t F) {
  const int e = nth_active_expert(counts, E, blockIdx.y);
  const uint32_t f = blockIdx.x * GEMV_WARPS + threadIdx.x / 32;
  if (e < 0 || f >= F) return;  // uniform per warp
  const uint32_t lo = offsets[e], cnt = counts[e];
  const T* wg = gate_up + (static_cast<size_t>(e) * 2 * F + f) * H;
  const T* wu = gate_up + (static_cast<size_t>(e) * 2 * F + F + f) * H;
  constexpr int V = Vec16<T>::N;
  const bool vec = H % V == 0 && is_aligned16(x) && is_aligned16(gate_up);
  for (uint32_t c = 0; c < cnt; c += GEMV_ROWS) {
    const uint32_t nrows = min(cnt - c, static_cast<uint32_t>(GEMV_ROWS));
    const T* a[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
      a[r] = x + static_cast<size_t>(row_token[lo + c + (r < nrows ? r : 0)]) * H;
    float g[GEMV_ROWS], u[GEMV_ROWS];
    if (vec) {
      warp_dot_rows<T, true>(wg, a, nrows, H, g);
      warp_dot_rows<T, true>(wu, a, nrows, H, u);
    } else {
      warp_dot_rows<T, false>(wg, a, nrows, H, g);
      warp_dot_rows<T, false>(wu, a, nrows, H, u);
    }
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; ++r)
        if (r < nrows) act[static_cast<size_t>(lo + c + r) * F + f] = from_float<T>(silu_mul(g[r], u[r]));
    }
  }
}

// grid = (ceil(H / GEMV_WARPS), min(E, S)), block = 32 * GEMV_WARPS. Warp w computes out[:, h] for
// h = bx * GEMV_WARPS + w over all rows of the y-th active expert.
template <typename T>
__device__ void down_gemv_impl(const T* __restrict__ act, const uint32_t* __restrict__ counts,
                               const uint32_t* __restrict__ offsets, const T* __restrict__ down, T* __restrict__ out,
                               uint32_t E, uint32_t H, uint32_t F) {
  const int e = nth_active_expert(counts, E, blockIdx.y);
  const uint32_t h = blockIdx.x * GEMV_WARPS + threadIdx.x / 32;
  if (e < 0 || h >= H) return;
  const uint32_t lo = offsets[e], cnt = counts[e];
  const T* wd = down + (static_cast<size_t>(e) * H + h) * F;
  constexpr int V = Vec16<T>::N;
  const bool vec = F % V == 0 && is_aligned16(act) && is_aligned16(down);
  for (uint32_t c = 0; c < cnt; c += GEMV_ROWS) {
    const uint32_t nrows = min(cnt - c, static_cast<uint32_t>(GEMV_ROWS));
    const T* a[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) a[r] = act + static_cast<size_t>(lo + c + (r < nrows ? r : 0)) * F;
    float y[GEMV_ROWS];
    if (vec) {
      warp_dot_rows<T, true>(wd, a, nrows, F, y);
    } else {
      warp_dot_rows<T, false>(wd, a, nrows, F, y);
    }
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; ++r)
        if (r < nrows) out[static_cast<size_t>(lo + c + r) * H + h] = from_float<T>(y[r]);
    }
  }
}

// ---- prefill: tiled GEMM (shared memory, f32 FMA, 256 threads) ---------------------------------------------
#define TILE_M 64
#define TILE_K 32
#define GU_TILE_F 32  // gate_up: 32 f columns of gate AND of up per block -> fused silu(gate) * up
#define DN_TILE_H 64

// grid = (ceil(F / GU_TILE_F), ceil(S / TILE_M) + min(E, S)), block = 256.
// Thread (ty = tid / 16, tx = tid % 16) owns rows ty*4 .. +4 and f columns tx*2 .. +2 of the tile.
template <typename T>
__device__ void gate_up_gemm_impl(const T* __restrict__ x, const uint32_t* __restrict__ row_token,
                                  const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets,
                                  const T* __restrict__ gate_up, T* __restrict__ act, uint32_t E, uint32_t H,
                                  uint32_t F) {
  __shared__ float xs[TILE_M][TILE_K + 1];  // +1: rows start in different banks
  __shared__ float gs[GU_TILE_F][TILE_K + 1];
  __shared__ float us[GU_TILE_F][TILE_K + 1];
  uint32_t m0 = 0;
  const int e = nth_row_tile(counts, E, blockIdx.y, TILE_M, &m0);
  if (e < 0) return;  // uniform per block, before any barrier
  const uint32_t lo = offsets[e], cnt = counts[e];
  const uint32_t f0 = blockIdx.x * GU_TILE_F;
  const uint32_t tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const T* wg = gate_up + static_cast<size_t>(e) * 2 * F * H;
  const T* wu = wg + static_cast<size_t>(F) * H;
  float acc_g[4][2] = {}, acc_u[4][2] = {};

  for (uint32_t k0 = 0; k0 < H; k0 += TILE_K) {
    for (uint32_t i = tid; i < TILE_M * TILE_K; i += 256) {
      const uint32_t m = i / TILE_K, k = i % TILE_K;
      float v = 0.f;
      if (m0 + m < cnt && k0 + k < H) v = to_float(x[static_cast<size_t>(row_token[lo + m0 + m]) * H + k0 + k]);
      xs[m][k] = v;
    }
    for (uint32_t i = tid; i < GU_TILE_F * TILE_K; i += 256) {
      const uint32_t f = i / TILE_K, k = i % TILE_K;
      float g = 0.f, u = 0.f;
      if (f0 + f < F && k0 + k < H) {
        g = to_float(wg[static_cast<size_t>(f0 + f) * H + k0 + k]);
        u = to_float(wu[static_cast<size_t>(f0 + f) * H + k0 + k]);
      }
      gs[f][k] = g;
      us[f][k] = u;
    }
    __syncthreads();
#pragma unroll 8
    for (uint32_t k = 0; k < TILE_K; ++k) {
      float a[4], bg[2], bu[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[ty * 4 + i][k];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        bg[j] = gs[tx * 2 + j][k];
        bu[j] = us[tx * 2 + j][k];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          acc_g[i][j] = fmaf(a[i], bg[j], acc_g[i][j]);
          acc_u[i][j] = fmaf(a[i], bu[j], acc_u[i][j]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t m = m0 + ty * 4 + i, f = f0 + tx * 2 + j;
      if (m < cnt && f < F) act[static_cast<size_t>(lo + m) * F + f] = from_float<T>(silu_mul(acc_g[i][j], acc_u[i][j]));
    }
}

// grid = (ceil(H / DN_TILE_H), ceil(S / TILE_M) + min(E, S)), block = 256.
// Thread (ty = tid / 16, tx = tid % 16) owns rows ty*4 .. +4 and h columns tx*4 .. +4 of the tile.
template <typename T>
__device__ void down_gemm_impl(const T* __restrict__ act, const uint32_t* __restrict__ counts,
                               const uint32_t* __restrict__ offsets, const T* __restrict__ down, T* __restrict__ out,
                               uint32_t E, uint32_t H, uint32_t F) {
  __shared__ float as[TILE_M][TILE_K + 1];
  __shared__ float bs[DN_TILE_H][TILE_K + 1];
  uint32_t m0 = 0;
  const int e = nth_row_tile(counts, E, blockIdx.y, TILE_M, &m0);
  if (e < 0) return;
  const uint32_t lo = offsets[e], cnt = counts[e];
  const uint32_t h0 = blockIdx.x * DN_TILE_H;
  const uint32_t tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const T* wd = down + static_cast<size_t>(e) * H * F;
  float acc[4][4] = {};

  for (uint32_t k0 = 0; k0 < F; k0 += TILE_K) {
    for (uint32_t i = tid; i < TILE_M * TILE_K; i += 256) {
      const uint32_t m = i / TILE_K, k = i % TILE_K;
      as[m][k] = (m0 + m < cnt && k0 + k < F) ? to_float(act[static_cast<size_t>(lo + m0 + m) * F + k0 + k]) : 0.f;
    }
    for (uint32_t i = tid; i < DN_TILE_H * TILE_K; i += 256) {
      const uint32_t h = i / TILE_K, k = i % TILE_K;
      bs[h][k] = (h0 + h < H && k0 + k < F) ? to_float(wd[static_cast<size_t>(h0 + h) * F + k0 + k]) : 0.f;
    }
    __syncthreads();
    fma_tile_4x4<TILE_K>(as, bs, ty, tx, acc);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t m = m0 + ty * 4 + i, h = h0 + tx * 4 + j;
      if (m < cnt && h < H) out[static_cast<size_t>(lo + m) * H + h] = from_float<T>(acc[i][j]);
    }
}

// ---- prefill on tensor cores (bf16 / f16): WMMA 16x16x16, f32 accumulate ----------------------------------
// The same tiles as the FMA GEMM above (64 rows x 32 f columns of gate and of up; 64 rows x 64 h columns for
// down; K steps of 32) and the same grids, but 4 warps per block, each owning 16 rows of the tile: per K step
// the block stages the activation tile and the weight tiles in shared memory in T, and each warp issues
// bf16/f16 x bf16/f16 -> f32 mma.sync through nvcuda::wmma. Products of 16-bit values are exact in f32, so
// the results differ from the reference only by summation order (plus the one final rounding of act/out).
// The f32 accumulators go through shared memory for the epilogue (silu(g) * u, rounding to T, live rows only).
// Needs sm_80+ for bf16 and sm_70+ for f16: on older targets those entries are not compiled, and the launcher
// (experts.rs `mma_entry`) keeps the FMA GEMM for them.
#define MMA_WARPS 4
#define MMA_LD (TILE_K + 8)  // shared row stride in elements: a multiple of 8 (wmma); 16-row blocks start 32-byte aligned
#define MMA_LDC_GU (GU_TILE_F + 4)
#define MMA_LDC_DN (DN_TILE_H + 4)

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700

template <typename T>
__device__ void gate_up_mma_impl(const T* __restrict__ x, const uint32_t* __restrict__ row_token,
                                 const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets,
                                 const T* __restrict__ gate_up, T* __restrict__ act, uint32_t E, uint32_t H,
                                 uint32_t F) {
  using namespace nvcuda;
  __shared__ __align__(32) T xs[TILE_M][MMA_LD];
  __shared__ __align__(32) T gs[GU_TILE_F][MMA_LD];
  __shared__ __align__(32) T us[GU_TILE_F][MMA_LD];
  __shared__ __align__(32) float cg[TILE_M][MMA_LDC_GU];
  __shared__ __align__(32) float cu[TILE_M][MMA_LDC_GU];
  __shared__ uint32_t src[TILE_M];
  uint32_t m0 = 0;
  const int e = nth_row_tile(counts, E, blockIdx.y, TILE_M, &m0);
  if (e < 0) return;  // uniform per block, before any barrier
  const uint32_t lo = offsets[e], cnt = counts[e];
  const uint32_t f0 = blockIdx.x * GU_TILE_F;
  const uint32_t tid = threadIdx.x, warp = tid / 32;
  const uint32_t nthreads = 32 * MMA_WARPS;
  const T* wg = gate_up + static_cast<size_t>(e) * 2 * F * H;
  const T* wu = wg + static_cast<size_t>(F) * H;
  const T zero = from_float<T>(0.f);
  for (uint32_t m = tid; m < TILE_M; m += nthreads) src[m] = (m0 + m < cnt) ? row_token[lo + m0 + m] : 0u;
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_g[GU_TILE_F / 16], acc_u[GU_TILE_F / 16];
#pragma unroll
  for (int j = 0; j < GU_TILE_F / 16; ++j) {
    wmma::fill_fragment(acc_g[j], 0.f);
    wmma::fill_fragment(acc_u[j], 0.f);
  }
  for (uint32_t k0 = 0; k0 < H; k0 += TILE_K) {
    for (uint32_t i = tid; i < TILE_M * TILE_K; i += nthreads) {
      const uint32_t m = i / TILE_K, k = i % TILE_K;
      xs[m][k] = (m0 + m < cnt && k0 + k < H) ? x[static_cast<size_t>(src[m]) * H + k0 + k] : zero;
    }
    for (uint32_t i = tid; i < GU_TILE_F * TILE_K; i += nthreads) {
      const uint32_t f = i / TILE_K, k = i % TILE_K;
      const bool ok = f0 + f < F && k0 + k < H;
      gs[f][k] = ok ? wg[static_cast<size_t>(f0 + f) * H + k0 + k] : zero;
      us[f][k] = ok ? wu[static_cast<size_t>(f0 + f) * H + k0 + k] : zero;
    }
    __syncthreads();
#pragma unroll
    for (uint32_t kk = 0; kk < TILE_K; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, &xs[warp * 16][kk], MMA_LD);
#pragma unroll
      for (int j = 0; j < GU_TILE_F / 16; ++j) {
        // W is [f][k] row-major, i.e. the K x 16 operand B = W^T in column-major order.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, &gs[j * 16][kk], MMA_LD);
        wmma::mma_sync(acc_g[j], a, b, acc_g[j]);
        wmma::load_matrix_sync(b, &us[j * 16][kk], MMA_LD);
        wmma::mma_sync(acc_u[j], a, b, acc_u[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < GU_TILE_F / 16; ++j) {
    wmma::store_matrix_sync(&cg[warp * 16][j * 16], acc_g[j], MMA_LDC_GU, wmma::mem_row_major);
    wmma::store_matrix_sync(&cu[warp * 16][j * 16], acc_u[j], MMA_LDC_GU, wmma::mem_row_major);
  }
  __syncthreads();
  for (uint32_t i = tid; i < TILE_M * GU_TILE_F; i += nthreads) {
    const uint32_t m = i / GU_TILE_F, f = i % GU_TILE_F;
    if (m0 + m < cnt && f0 + f < F)
      act[static_cast<size_t>(lo + m0 + m) * F + f0 + f] = from_float<T>(silu_mul(cg[m][f], cu[m][f]));
  }
}

template <typename T>
__device__ void down_mma_impl(const T* __restrict__ act, const uint32_t* __restrict__ counts,
                              const uint32_t* __restrict__ offsets, const T* __restrict__ down, T* __restrict__ out,
                              uint32_t E, uint32_t H, uint32_t F) {
  using namespace nvcuda;
  __shared__ __align__(32) T as[TILE_M][MMA_LD];
  __shared__ __align__(32) T bs[DN_TILE_H][MMA_LD];
  __shared__ __align__(32) float c[TILE_M][MMA_LDC_DN];
  uint32_t m0 = 0;
  const int e = nth_row_tile(counts, E, blockIdx.y, TILE_M, &m0);
  if (e < 0) return;
  const uint32_t lo = offsets[e], cnt = counts[e];
  const uint32_t h0 = blockIdx.x * DN_TILE_H;
  const uint32_t tid = threadIdx.x, warp = tid / 32;
  const uint32_t nthreads = 32 * MMA_WARPS;
  const T* wd = down + static_cast<size_t>(e) * H * F;
  const T zero = from_float<T>(0.f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[DN_TILE_H / 16];
#pragma unroll
  for (int j = 0; j < DN_TILE_H / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
  for (uint32_t k0 = 0; k0 < F; k0 += TILE_K) {
    for (uint32_t i = tid; i < TILE_M * TILE_K; i += nthreads) {
      const uint32_t m = i / TILE_K, k = i % TILE_K;
      as[m][k] = (m0 + m < cnt && k0 + k < F) ? act[static_cast<size_t>(lo + m0 + m) * F + k0 + k] : zero;
    }
    for (uint32_t i = tid; i < DN_TILE_H * TILE_K; i += nthreads) {
      const uint32_t h = i / TILE_K, k = i % TILE_K;
      bs[h][k] = (h0 + h < H && k0 + k < F) ? wd[static_cast<size_t>(h0 + h) * F + k0 + k] : zero;
    }
    __syncthreads();
#pragma unroll
    for (uint32_t kk = 0; kk < TILE_K; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, &as[warp * 16][kk], MMA_LD);
#pragma unroll
      for (int j = 0; j < DN_TILE_H / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, &bs[j * 16][kk], MMA_LD);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < DN_TILE_H / 16; ++j)
    wmma::store_matrix_sync(&c[warp * 16][j * 16], acc[j], MMA_LDC_DN, wmma::mem_row_major);
  __syncthreads();
  for (uint32_t i = tid; i < TILE_M * DN_TILE_H; i += nthreads) {
    const uint32_t m = i / DN_TILE_H, h = i % DN_TILE_H;
    if (m0 + m < cnt && h0 + h < H) out[static_cast<size_t>(lo + m0 + m) * H + h0 + h] = from_float<T>(c[m][h]);
  }
}

// Entries: block = 32 * MMA_WARPS threads; grids as the FMA GEMM entries.
#define MMA_ENTRIES(SUFFIX, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS) moe_gate_up_mma_##SUFFIX(                       \
      const T* __restrict__ x, const uint32_t* __restrict__ row_token, const uint32_t* __restrict__ counts,     \
      const uint32_t* __restrict__ offsets, const T* __restrict__ gate_up, T* __restrict__ act, uint32_t E,     \
      uint32_t H, uint32_t F) {                                                                                 \
    gate_up_mma_impl<T>(x, row_token, counts, offsets, gate_up, act, E, H, F);                                  \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS) moe_down_mma_##SUFFIX(                          \
      const T* __restrict__ act, const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets,     \
      const T* __restrict__ down, T* __restrict__ out, uint32_t E, uint32_t H, uint32_t F) {                    \
    down_mma_impl<T>(act, counts, offsets, down, out, E, H, F);                                                 \
  }

MMA_ENTRIES(f16, __half)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
MMA_ENTRIES(bf16, __nv_bfloat16)
#endif
#endif  // __CUDA_ARCH__ >= 700

#define EXPERTS_ENTRIES(SUFFIX, T, ...)                                                                              \
  extern "C" __global__ void __launch_bounds__(__VA_ARGS__) moe_gate_up_gemv_##SUFFIX(                         \
      const T* __restrict__ x, const uint32_t* __restrict__ row_token, const uint32_t* __restrict__ counts,       \
      const uint32_t* __restrict__ offsets, const T* __restrict__ gate_up, T* __restrict__ act, uint32_t E,       \
      uint32_t H, uint32_t F) {                                                                                   \
    gate_up_gemv_impl<T>(x, row_token, counts, offsets, gate_up, act, E, H, F);                                   \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) moe_down_gemv_##SUFFIX(                            \
      const T* __restrict__ act, const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets,       \
      const T* __restrict__ down, T* __restrict__ out, uint32_t E, uint32_t H, uint32_t F) {                      \
    down_gemv_impl<T>(act, counts, offsets, down, out, E, H, F);                                                  \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(256, 4) moe_gate_up_gemm_##SUFFIX(                                    \
      const T* __restrict__ x, const uint32_t* __restrict__ row_token, const uint32_t* __restrict__ counts,       \
      const uint32_t* __restrict__ offsets, const T* __restrict__ gate_up, T* __restrict__ act, uint32_t E,       \
      uint32_t H, uint32_t F) {                                                                                   \
    gate_up_gemm_impl<T>(x, row_token, counts, offsets, gate_up, act, E, H, F);                                   \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(256) moe_down_gemm_##SUFFIX(                                       \
      const T* __restrict__ act, const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets,       \
      const T* __restrict__ down, T* __restrict__ out, uint32_t E, uint32_t H, uint32_t F) {                      \
    down_gemm_impl<T>(act, counts, offsets, down, out, E, H, F);                                                  \
  }

// The trailing arguments are gate_up_gemv's __launch_bounds__. Register budgets (ptxas -v, sm_90 and sm_89, see
// kernels/tools/resource-usage.sh): without a minimum-blocks hint ptxas squeezes the bf16/f16 GEMV and the gate_up
// GEMM into 48 registers and spills a few bytes to local memory; 4 resident blocks (<= 64 registers) fits them
// without spilling. The f32 GEMV keeps ptxas' own choice (80 registers, no spill).
EXPERTS_ENTRIES(f32, float, 32 * GEMV_WARPS)
EXPERTS_ENTRIES(bf16, __nv_bfloat16, 32 * GEMV_WARPS, 4)
EXPERTS_ENTRIES(f16, __half, 32 * GEMV_WARPS, 4)
