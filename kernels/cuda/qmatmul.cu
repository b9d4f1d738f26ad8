// qmatmul.cu: weight-only quantized matmuls, y = x W^T with W dequantized in registers (W8A16, W4A16,
// MXFP4-A16).
// The formats and the matmul semantics are specified in src/qmatmul.rs (module docs + reference()).
//
// WRITTEN AND COMPILED WITHOUT A GPU: this kernel has not yet run on one. `moe-run selftest --device cuda
// --filter qmatmul` is its first check.
//
// Legend: M activation rows, K input features, N output features, E experts (1 for a dense linear),
//         Kb bytes per packed row (K for int8, ceil(K/2) for int4 and mxfp4), G = ceil(K / group) (group = 32
//         for mxfp4).
//   x       [M, K]        act dtype (f32 / bf16 / f16)
//   qweight [E, N, Kb]    u8
//   params  [E, N]        f16 scale (int8)      | [E, N, G, 2] f16 (scale, zero) (int4)
//                         | [E, N, G] u8 E8M0 exponent (mxfp4)
//   chunks  [C, 3]        u32 (expert, first row, rows <= QMM_ROWS): built on the host from the op's offsets;
//                         every row of x is in exactly one chunk, and a chunk's rows all use one expert
//   out     [M, N]        act dtype
//
// GEMV-style: one warp per output feature n and chunk of up to QMM_ROWS (8) activation rows, so each packed
// weight row is read once per chunk and reused for every row of it. The lanes of a warp walk K in 16-byte
// loads of the packed row (16 int8 or 32 int4 weights per lane per step), dequantize in registers
// (w = s * q, or w = s * (q - z) exactly as the reference) and accumulate in f32 per activation row; a warp
// sum then gives the outputs. Larger M runs more chunks (grid y); the host sends many-row launches to the
// tiled GEMM at the end of this file instead (no tensor cores yet).
//
// Vector path (uniform per launch, decided on the device): int8 needs K % 16 == 0, int4 K % 32 == 0 and
// group % 32 == 0 (one (scale, zero) per 16-byte load), mxfp4 K % 32 == 0 (one exponent per 16-byte load),
// plus 16-byte aligned qweight.
//
// MXFP4 decode, exactly as the reference: w = (2 fp4(q)) * 2^(e - 128). The doubled E2M1 magnitudes
// {0, 1, 2, 3, 4, 6, 8, 12} are bytes, so the LUT lives in two registers and one __byte_perm looks up four
// nibbles at once (selector = their low 3 bits); the sign (nibble bit 3) is OR-ed into the float's bit 31,
// and the scale 2^(e - 128) is built from its exponent bits (2^-128 and 2^-127 as subnormals). Every
// product is exact (or overflows to inf, as ldexp does for e = 255). Otherwise a scalar
// path walks K one weight per lane step. Activations are read with 16-byte loads when x is aligned (K is a
// multiple of 16 on the vector path, so every row stays aligned).
//
// Launch: grid = (ceil(N / QMM_WARPS), min(C, 65535)), block = QMM_WARPS * 32; grid y strides over chunks.
//
// MoE mode (entries qmatmul_moe_*, the engine's device-resident expert path): no host chunk table. The chunks
// come from a dispatch on the device (moe_dispatch: counts [E], offsets [E+1], row_token [R]): chunk c is the
// c-th 8-row tile of the experts' live rows (nth_row_tile over counts), so the host never learns which
// experts run. C = ceil(R / QMM_ROWS) + min(E, R) is an upper bound; tiles past the live work exit at once.
// With `row_token` non-null, activation row of dispatched row r is x[row_token[r]] (the gather of the
// gate/up projection); with it null, x is already in dispatched row order (the down projection). Output
// rows are dispatched rows: out [R, N]; rows that belong to no expert are not written.
//
// SwiGLU epilogue (entries qmatmul_moe_swiglu_*, decode's gate/up projection): qweight holds 2N rows per
// expert (gate rows 0..N, up rows N..2N); each warp computes feature n of both, and writes
// out [R, N] = silu(gate) * up from the f32 sums, rounded once: the [R, 2N] intermediate, its two strided
// views and the two elementwise kernels of the unfused form are gone.
#include "common.cuh"

#define QMM_ROWS 8
#define QMM_WARPS 4

// The weight formats (template argument F) and the element type of their params.
#define QF_INT8 0
#define QF_INT4 1
#define QF_MXFP4 2
template <int F> struct QParamT { using type = __half; };
template <> struct QParamT<QF_MXFP4> { using type = uint8_t; };

// 2^(e - 128) for an E8M0 byte e, exactly (see the MXFP4 notes above).
__device__ __forceinline__ float mx_half_scale(uint32_t e) {
  return e >= 2u ? __uint_as_float((e - 1u) << 23) : __uint_as_float(0x00400000u >> (1u - e));
}

// The doubled E2M1 magnitudes as bytes: nibble codes 0..3 in MX_LUT_LO, 4..7 in MX_LUT_HI.
#define MX_LUT_LO 0x03020100u
#define MX_LUT_HI 0x0C080604u

// Four doubled E2M1 values from the four nibbles of `q16` (low nibble first), unscaled.
__device__ __forceinline__ void mx_decode4(uint32_t q16, float (&w)[4]) {
  const uint32_t mags = __byte_perm(MX_LUT_LO, MX_LUT_HI, q16 & 0x7777u);
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const float m = static_cast<float>((mags >> (8 * t)) & 0xffu);
    w[t] = __uint_as_float(__float_as_uint(m) | (((q16 >> (4 * t + 3)) & 1u) << 31));
  }
}

// One doubled E2M1 value of nibble `nib`, unscaled.
__device__ __forceinline__ float mx_decode1(uint32_t nib) {
  float w[4];
  mx_decode4(nib & 0xfu, w);
  return w[0];
}

__device__ __forceinline__ float f16_at(const __half* p, size_t i) { return __half2float(p[i]); }

// Integer codes to f32 without an int-to-float conversion (I2F issues at a fraction of FADD's rate): OR the
// code into the mantissa of 2^23 and subtract 2^23. Exact for any code below 2^23, so the products equal the
// reference's. `nib`: an unsigned 4-bit code; `i8`: a two's-complement byte (biased by 128 first).
__device__ __forceinline__ float u4_to_f32(uint32_t nib) { return __uint_as_float(0x4B000000u | nib) - 8388608.f; }
__device__ __forceinline__ float i8_to_f32(uint32_t byte) {
  return __uint_as_float(0x4B000000u | (byte ^ 0x80u)) - 8388736.f;  // 2^23 + 128
}

// 16 consecutive activations of row `xr` starting at k into f32 (vector loads when `xvec`).
template <typename T>
__device__ __forceinline__ void load_x16(const T* __restrict__ xr, uint32_t k, bool xvec, float (&xv)[16]) {
  if (xvec) {
    constexpr int N = Vec16<T>::N;
#pragma unroll
    for (int v = 0; v < 16 / N; ++v) {
      const Vec16<T> a = load_vec16_ro(xr + k + v * N);
#pragma unroll
      for (int j = 0; j < N; ++j) xv[v * N + j] = to_float(a.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) xv[j] = to_float(xr[k + j]);
  }
}

// F = QF_INT8: int8 weights, params [E, N]. QF_INT4: packed nibbles, params [E, N, G, 2]. QF_MXFP4: packed
// E2M1 nibbles, params [E, N, K/32] u8.
// MOE = false: chunks from the host table. MOE = true: chunks from (counts, offsets, row_token), see above.
template <typename T, int F, bool MOE, bool SWIGLU = false>
__device__ __forceinline__ void qmatmul_impl(const T* __restrict__ x, const uint8_t* __restrict__ qweight,
                                             const typename QParamT<F>::type* __restrict__ params,
                                             const uint32_t* __restrict__ chunks,
                                             const uint32_t* __restrict__ row_token,
                                             const uint32_t* __restrict__ counts,
                                             const uint32_t* __restrict__ offsets, uint32_t E,
                                             T* __restrict__ out, uint32_t C, uint32_t N, uint32_t K,
                                             uint32_t group) {
  const uint32_t lane = threadIdx.x & 31u;
  const uint32_t n = blockIdx.x * QMM_WARPS + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warps exit together: the warp sums below stay full-warp
  constexpr bool INT4 = F == QF_INT4, NIB = F != QF_INT8;
  const size_t Kb = NIB ? (K + 1) / 2 : K;
  const uint32_t G = NIB ? (K + group - 1) / group : 1;
  const bool vec = (F == QF_INT4   ? (K % 32u == 0 && group % 32u == 0)
                    : F == QF_MXFP4 ? (K % 32u == 0)
                                    : (K % 16u == 0)) &&
                   is_aligned16(qweight);
  const bool xvec = vec && is_aligned16(x);

  for (uint32_t c = blockIdx.y; c < C; c += gridDim.y) {
    uint32_t e, r0, cnt;
    if constexpr (MOE) {
      uint32_t m0 = 0;
      const int ee = nth_row_tile(counts, E, c, QMM_ROWS, &m0);
      if (ee < 0) break;  // c is block-uniform, and every later tile is past the live work too
      e = static_cast<uint32_t>(ee);
      r0 = offsets[e] + m0;
      cnt = min(static_cast<uint32_t>(QMM_ROWS), counts[e] - m0);
    } else {
      e = __ldg(chunks + 3 * c);
      r0 = __ldg(chunks + 3 * c + 1);
      cnt = __ldg(chunks + 3 * c + 2);
    }
    // The activation row of each of the chunk's rows (gathered through row_token in MoE mode).
    const T* xrow[QMM_ROWS];
#pragma unroll
    for (int i = 0; i < QMM_ROWS; ++i) {
      uint32_t src = r0 + static_cast<uint32_t>(i);
      if (MOE && row_token != nullptr && static_cast<uint32_t>(i) < cnt) src = row_token[src];
      xrow[i] = x + static_cast<size_t>(static_cast<uint32_t>(i) < cnt ? src : r0) * K;
    }

    // acc[i] += x[i] . W[row] for the chunk's rows: the weight row read once for all of them.
    auto accumulate = [&](size_t row, float (&acc)[QMM_ROWS]) {
    const uint8_t* wrow = qweight + row * Kb;
    const auto* prow = params + row * (INT4 ? 2 * static_cast<size_t>(G) : NIB ? static_cast<size_t>(G) : 1);
#pragma unroll
    for (int i = 0; i < QMM_ROWS; ++i) acc[i] = 0.f;

    if (vec) {
      constexpr uint32_t PER = NIB ? 32 : 16;  // weights per 16-byte load
      float s8 = 0.f;
      if constexpr (F == QF_INT8) s8 = f16_at(prow, 0);
      for (uint32_t k0 = lane * PER; k0 < K; k0 += 32 * PER) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(wrow + (NIB ? k0 / 2 : k0)));
        uint8_t b[16];
        memcpy(b, &raw, 16);
        float w[PER];
        if constexpr (F == QF_MXFP4) {
          // One group of 32 per load: its scale, then 4 nibbles (2 bytes) per LUT lookup.
          const float s = mx_half_scale(prow[k0 / 32]);
#pragma unroll
          for (int j = 0; j < 16; j += 2) {
            float v[4];
            mx_decode4(static_cast<uint32_t>(b[j]) | (static_cast<uint32_t>(b[j + 1]) << 8), v);
#pragma unroll
            for (int t = 0; t < 4; ++t) w[2 * j + t] = v[t] * s;
          }
        } else if constexpr (INT4) {
          const uint32_t g = k0 / group;
          const float s = f16_at(prow, 2 * g), z = f16_at(prow, 2 * g + 1);
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            w[2 * j] = s * (u4_to_f32(b[j] & 0xfu) - z);
            w[2 * j + 1] = s * (u4_to_f32(b[j] >> 4) - z);
          }
        } else {
#pragma unroll
          for (int j = 0; j < 16; ++j) w[j] = s8 * i8_to_f32(b[j]);
        }
#pragma unroll
        for (int i = 0; i < QMM_ROWS; ++i) {
          if (static_cast<uint32_t>(i) < cnt) {
            const T* xr = xrow[i];
#pragma unroll
            for (uint32_t h = 0; h < PER; h += 16) {
              float xv[16];
              load_x16(xr, k0 + h, xvec, xv);
#pragma unroll
              for (int j = 0; j < 16; ++j) acc[i] = fmaf(xv[j], w[h + j], acc[i]);
            }
          }
        }
      }
    } else {
      float s8 = 0.f;
      if constexpr (F == QF_INT8) s8 = f16_at(prow, 0);
      for (uint32_t k = lane; k < K; k += 32) {
        float w;
        if constexpr (F == QF_MXFP4) {
          const uint8_t byte = wrow[k / 2];
          w = mx_decode1((k & 1u) ? (byte >> 4) : (byte & 0xf)) * mx_half_scale(prow[k / 32]);
        } else if constexpr (INT4) {
          const uint32_t g = k / group;
          const uint8_t byte = wrow[k / 2];
          const float q = static_cast<float>((k & 1u) ? (byte >> 4) : (byte & 0xf));
          w = f16_at(prow, 2 * g) * (q - f16_at(prow, 2 * g + 1));
        } else {
          w = s8 * static_cast<float>(static_cast<int8_t>(wrow[k]));
        }
#pragma unroll
        for (int i = 0; i < QMM_ROWS; ++i)
          if (static_cast<uint32_t>(i) < cnt) acc[i] = fmaf(to_float(xrow[i][k]), w, acc[i]);
      }
    }
    };

    float acc[QMM_ROWS];
    if constexpr (SWIGLU) {
      // Gate row n and up row N + n of expert e's 2N rows.
      float up[QMM_ROWS];
      accumulate(static_cast<size_t>(e) * 2 * N + n, acc);
      accumulate(static_cast<size_t>(e) * 2 * N + N + n, up);
#pragma unroll
      for (int i = 0; i < QMM_ROWS; ++i) {
        if (static_cast<uint32_t>(i) < cnt) {  // cnt is warp-uniform: every lane joins the shuffles
          const float g = warp_sum(acc[i]), u = warp_sum(up[i]);
          if (lane == 0) out[static_cast<size_t>(r0 + i) * N + n] = from_float<T>(g / (1.f + expf(-g)) * u);
        }
      }
    } else {
      accumulate(static_cast<size_t>(e) * N + n, acc);
#pragma unroll
      for (int i = 0; i < QMM_ROWS; ++i) {
        if (static_cast<uint32_t>(i) < cnt) {  // cnt is warp-uniform: every lane joins the shuffle
          const float sum = warp_sum(acc[i]);
          if (lane == 0) out[static_cast<size_t>(r0 + i) * N + n] = from_float<T>(sum);
        }
      }
    }
  }
}

#define QMATMUL_ENTRY(NAME, T, F)                                                                             \
  extern "C" __global__ void NAME(const T* __restrict__ x, const uint8_t* __restrict__ qweight,               \
                                  const QParamT<F>::type* __restrict__ params,                                \
                                  const uint32_t* __restrict__ chunks, T* __restrict__ out, uint32_t C,       \
                                  uint32_t N, uint32_t K, uint32_t group) {                                   \
    qmatmul_impl<T, F, false>(x, qweight, params, chunks, nullptr, nullptr, nullptr, 0, out, C, N, K, group);   \
  }

// MoE mode: out [R, N] for the live dispatched rows; row_token may be null (x already in row order).
#define QMATMUL_MOE_ENTRY(NAME, T, F)                                                                         \
  extern "C" __global__ void NAME(const T* __restrict__ x, const uint32_t* __restrict__ row_token,           \
                                  const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets, \
                                  const uint8_t* __restrict__ qweight,                                       \
                                  const QParamT<F>::type* __restrict__ params, T* __restrict__ out,          \
                                  uint32_t E, uint32_t C, uint32_t N, uint32_t K, uint32_t group) {          \
    qmatmul_impl<T, F, true>(x, qweight, params, nullptr, row_token, counts, offsets, E, out, C, N, K,         \
                             group);                                                                         \
  }

// MoE mode with the SwiGLU epilogue: qweight [E, 2N, Kb], out [R, N] = silu(x Wg^T) * (x Wu^T).
#define QMATMUL_MOE_SWIGLU_ENTRY(NAME, T, F)                                                                  \
  extern "C" __global__ void NAME(const T* __restrict__ x, const uint32_t* __restrict__ row_token,           \
                                  const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets, \
                                  const uint8_t* __restrict__ qweight,                                       \
                                  const QParamT<F>::type* __restrict__ params, T* __restrict__ out,          \
                                  uint32_t E, uint32_t C, uint32_t N, uint32_t K, uint32_t group) {          \
    qmatmul_impl<T, F, true, true>(x, qweight, params, nullptr, row_token, counts, offsets, E, out, C, N, K,   \
                                   group);                                                                   \
  }

QMATMUL_ENTRY(qmatmul_int8_f32, float, QF_INT8)
QMATMUL_ENTRY(qmatmul_int8_bf16, __nv_bfloat16, QF_INT8)
QMATMUL_ENTRY(qmatmul_int8_f16, __half, QF_INT8)
QMATMUL_ENTRY(qmatmul_int4_f32, float, QF_INT4)
QMATMUL_ENTRY(qmatmul_int4_bf16, __nv_bfloat16, QF_INT4)
QMATMUL_ENTRY(qmatmul_int4_f16, __half, QF_INT4)
QMATMUL_ENTRY(qmatmul_mxfp4_f32, float, QF_MXFP4)
QMATMUL_ENTRY(qmatmul_mxfp4_bf16, __nv_bfloat16, QF_MXFP4)
QMATMUL_ENTRY(qmatmul_mxfp4_f16, __half, QF_MXFP4)
QMATMUL_MOE_ENTRY(qmatmul_moe_int8_f32, float, QF_INT8)
QMATMUL_MOE_ENTRY(qmatmul_moe_int8_bf16, __nv_bfloat16, QF_INT8)
QMATMUL_MOE_ENTRY(qmatmul_moe_int8_f16, __half, QF_INT8)
QMATMUL_MOE_ENTRY(qmatmul_moe_int4_f32, float, QF_INT4)
QMATMUL_MOE_ENTRY(qmatmul_moe_int4_bf16, __nv_bfloat16, QF_INT4)
QMATMUL_MOE_ENTRY(qmatmul_moe_int4_f16, __half, QF_INT4)
QMATMUL_MOE_ENTRY(qmatmul_moe_mxfp4_f32, float, QF_MXFP4)
QMATMUL_MOE_ENTRY(qmatmul_moe_mxfp4_bf16, __nv_bfloat16, QF_MXFP4)
QMATMUL_MOE_ENTRY(qmatmul_moe_mxfp4_f16, __half, QF_MXFP4)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_int8_f32, float, QF_INT8)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_int8_bf16, __nv_bfloat16, QF_INT8)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_int8_f16, __half, QF_INT8)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_int4_f32, float, QF_INT4)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_int4_bf16, __nv_bfloat16, QF_INT4)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_int4_f16, __half, QF_INT4)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_mxfp4_f32, float, QF_MXFP4)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_mxfp4_bf16, __nv_bfloat16, QF_MXFP4)
QMATMUL_MOE_SWIGLU_ENTRY(qmatmul_moe_swiglu_mxfp4_f16, __half, QF_MXFP4)

// ---- prefill: tiled GEMM -------------------------------------------------------------------------------------
// qmatmul_gemm_<fmt>_<dtype>: the same product (and the same dispatch-driven row tiles as the MoE mode) for many
// rows per expert, where the GEMV chunks above would re-read every weight row once per 8 activation rows. Each
// block computes a QG_TILE_M x QG_TILE_N output tile: per QG_TILE_K step it stages the (gathered) activation
// tile and the weight tile, dequantized to f32 exactly as the reference (w = s * q, s * (q - z), or the MXFP4
// LUT value times 2^(e - 128)), in shared
// memory, and each thread accumulates a 4 x 4 block in f32. No tensor cores yet (plain f32 FMA): a correct
// baseline that reads each packed weight once per 64 rows, not a fast one.
//
// A dense linear is the case E = 1, counts = [M], offsets = [0, M], row_token = null.
// grid = (ceil(N / QG_TILE_N), ceil(R / QG_TILE_M) + min(E, R)), block = 256; tiles past the live work exit.
#define QG_TILE_M 64
#define QG_TILE_N 64
#define QG_TILE_K 32

template <typename T, int F>
__device__ void qmatmul_gemm_impl(const T* __restrict__ x, const uint32_t* __restrict__ row_token,
                                  const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets,
                                  const uint8_t* __restrict__ qweight,
                                  const typename QParamT<F>::type* __restrict__ params,
                                  T* __restrict__ out, uint32_t E, uint32_t N, uint32_t K, uint32_t group) {
  __shared__ float xs[QG_TILE_M][QG_TILE_K + 1];  // +1: rows start in different banks
  __shared__ float ws[QG_TILE_N][QG_TILE_K + 1];
  __shared__ uint32_t src[QG_TILE_M];
  uint32_t m0 = 0;
  const int e = nth_row_tile(counts, E, blockIdx.y, QG_TILE_M, &m0);
  if (e < 0) return;  // uniform per block, before any barrier
  const uint32_t lo = offsets[e], cnt = counts[e];
  const uint32_t n0 = blockIdx.x * QG_TILE_N;
  const uint32_t tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  constexpr bool INT4 = F == QF_INT4, NIB = F != QF_INT8;
  const size_t Kb = NIB ? (K + 1) / 2 : K;
  const uint32_t G = NIB ? (K + group - 1) / group : 1;
  const size_t PR = INT4 ? 2 * static_cast<size_t>(G) : NIB ? static_cast<size_t>(G) : 1;  // params per row
  const uint8_t* wbase = qweight + static_cast<size_t>(e) * N * Kb;
  const auto* pbase = params + static_cast<size_t>(e) * N * PR;
  if (tid < QG_TILE_M) {
    const uint32_t r = lo + m0 + tid;
    src[tid] = (m0 + tid < cnt) ? (row_token != nullptr ? row_token[r] : r) : 0u;
  }
  __syncthreads();
  float acc[4][4] = {};

  for (uint32_t k0 = 0; k0 < K; k0 += QG_TILE_K) {
    for (uint32_t i = tid; i < QG_TILE_M * QG_TILE_K; i += 256) {
      const uint32_t m = i / QG_TILE_K, k = i % QG_TILE_K;
      xs[m][k] = (m0 + m < cnt && k0 + k < K) ? to_float(x[static_cast<size_t>(src[m]) * K + k0 + k]) : 0.f;
    }
    for (uint32_t i = tid; i < QG_TILE_N * QG_TILE_K; i += 256) {
      const uint32_t n = i / QG_TILE_K, k = i % QG_TILE_K, kk = k0 + k;
      float w = 0.f;
      if (n0 + n < N && kk < K) {
        const uint8_t* wrow = wbase + static_cast<size_t>(n0 + n) * Kb;
        if constexpr (F == QF_MXFP4) {
          const uint8_t byte = wrow[kk / 2];
          w = mx_decode1((kk & 1u) ? (byte >> 4) : (byte & 0xf)) *
              mx_half_scale(pbase[static_cast<size_t>(n0 + n) * PR + kk / 32]);
        } else if constexpr (INT4) {
          const __half* prow = pbase + static_cast<size_t>(n0 + n) * 2 * G;
          const uint32_t g = kk / group;
          const uint8_t byte = wrow[kk / 2];
          const float q = static_cast<float>((kk & 1u) ? (byte >> 4) : (byte & 0xf));
          w = __half2float(prow[2 * g]) * (q - __half2float(prow[2 * g + 1]));
        } else {
          w = __half2float(pbase[n0 + n]) * static_cast<float>(static_cast<int8_t>(wrow[kk]));
        }
      }
      ws[n][k] = w;
    }
    __syncthreads();
    fma_tile_4x4<QG_TILE_K>(xs, ws, ty, tx, acc);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (m < cnt && n < N) out[static_cast<size_t>(lo + m) * N + n] = from_float<T>(acc[i][j]);
    }
}

#define QMATMUL_GEMM_ENTRY(NAME, T, F)                                                                        \
  extern "C" __global__ void __launch_bounds__(256)                                                          \
      NAME(const T* __restrict__ x, const uint32_t* __restrict__ row_token, const uint32_t* __restrict__ counts, \
           const uint32_t* __restrict__ offsets, const uint8_t* __restrict__ qweight,                        \
           const QParamT<F>::type* __restrict__ params, T* __restrict__ out, uint32_t E, uint32_t N,         \
           uint32_t K, uint32_t group) {                                                                      \
    qmatmul_gemm_impl<T, F>(x, row_token, counts, offsets, qweight, params, out, E, N, K, group);             \
  }

QMATMUL_GEMM_ENTRY(qmatmul_gemm_int8_f32, float, QF_INT8)
QMATMUL_GEMM_ENTRY(qmatmul_gemm_int8_bf16, __nv_bfloat16, QF_INT8)
QMATMUL_GEMM_ENTRY(qmatmul_gemm_int8_f16, __half, QF_INT8)
QMATMUL_GEMM_ENTRY(qmatmul_gemm_int4_f32, float, QF_INT4)
QMATMUL_GEMM_ENTRY(qmatmul_gemm_int4_bf16, __nv_bfloat16, QF_INT4)
QMATMUL_GEMM_ENTRY(qmatmul_gemm_int4_f16, __half, QF_INT4)
QMATMUL_GEMM_ENTRY(qmatmul_gemm_mxfp4_f32, float, QF_MXFP4)
QMATMUL_GEMM_ENTRY(qmatmul_gemm_mxfp4_bf16, __nv_bfloat16, QF_MXFP4)
QMATMUL_GEMM_ENTRY(qmatmul_gemm_mxfp4_f16, __half, QF_MXFP4)
