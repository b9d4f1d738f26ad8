// common.cuh: helpers shared by every moe-kernels .cu file.
//
// Conventions for all kernels in this crate:
//  - Activations are f32, bf16 or f16 (`T`); every reduction accumulates in f32.
//  - Each op family is one .cu file with a templated `__device__` body and thin
//    `extern "C"` entry points named `<op>_<dtype>` (dtype in f32/bf16/f16), the
//    names the Rust launchers ask for.
//  - Sizes that index memory are computed in size_t (T*H easily exceeds 2^31).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ceil(a / b) for positive integers.
template <typename I>
__host__ __device__ __forceinline__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// ---- scalar load/store: every dtype goes through f32 ------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even, like `half::{f16,bf16}::from_f32` in the CPU references.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- 16-byte vectors --------------------------------------------------------
// One 128-bit access moves Vec16<T>::N elements (4 x f32, 8 x bf16/f16). Callers
// must check alignment first (row length % N == 0 and 16-byte aligned bases,
// see is_aligned16); otherwise they take their scalar path.

template <typename T> struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Read-only (non-coherent) 128-bit load: for inputs that no thread of this kernel writes.
template <typename T> __device__ __forceinline__ Vec16<T> load_vec16_ro(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Vec16<T> out;
  static_assert(sizeof(out) == sizeof(raw), "Vec16 must be 16 bytes");
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename T> __device__ __forceinline__ void store_vec16(T* p, const Vec16<T>& x) {
  uint4 raw;
  memcpy(&raw, &x, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}

// ---- warp reductions (all 32 lanes must participate) ------------------------

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// ---- MoE dispatch helpers ---------------------------------------------------

// The (expert, first row within the expert) of row tile y when every expert's rows are cut into tiles of BM.
__device__ __forceinline__ int nth_row_tile(const uint32_t* __restrict__ counts, uint32_t E, uint32_t y, uint32_t BM,
                                            uint32_t* m0) {
  uint32_t seen = 0;
  for (uint32_t e = 0; e < E; ++e) {
    const uint32_t tiles = (counts[e] + BM - 1) / BM;
    if (y < seen + tiles) {
      *m0 = (y - seen) * BM;
      return static_cast<int>(e);
    }
    seen += tiles;
  }
  return -1;
}

// ---- tiled GEMM microkernel --------------------------------------------------

// One K-step of a 64 x 64 output tile held as 4 x 4 per thread (256 threads: ty = tid / 16, tx = tid % 16):
// acc[i][j] += sum_k a[ty*4 + i][k] * b[tx*4 + j][k] over the KT staged columns, f32 FMA.
template <uint32_t KT>
__device__ __forceinline__ void fma_tile_4x4(const float (*a)[KT + 1], const float (*b)[KT + 1], uint32_t ty,
                                             uint32_t tx, float (&acc)[4][4]) {
#pragma unroll 8
  for (uint32_t k = 0; k < KT; ++k) {
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = a[ty * 4 + i][k];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[tx * 4 + j][k];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  }
}

// ---- tensor cores: one mma.sync m16n8k16 from registers ----------------------

// d += A B for one 16 x 16 (A, row major) by 16 x 8 (B, column major) tile of T = __nv_bfloat16 or __half, f32
// accumulate: `mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32` (sm_80+). The fragments are PTX ISA's ("Matrix
// Fragments for mma.m16n8k16 with floating point type"), with g = lane / 4 and t = lane % 4, the lower 16 bits of
// each register holding the lower index:
//   a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]  b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]                      d[2], d[3] = D[g+8][2t, 2t+1]
// Warp-synchronous: every lane of the warp must call it with the same T. In the emulator (emu.h) it is a warp
// collective that computes the product in f32, k in order.
template <typename T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> { static constexpr bool bf16 = true; };
template <> struct MmaType<__half> { static constexpr bool bf16 = false; };

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  if constexpr (MmaType<T>::bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
#elif defined(MOE_EMU_SITE)
  ::moe_emu::MmaLane m{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {d[0], d[1], d[2], d[3]}, {}};
  ::moe_emu::mma_m16n8k16(MOE_EMU_SITE, MmaType<T>::bf16, &m);
#pragma unroll
  for (int i = 0; i < 4; ++i) d[i] = m.d[i];
#endif
}
