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
// sum then gives the outputs. Larger M runs more chunks (grid y); the host sends many-row launches to a tiled
// GEMM further down instead (qmma_gemm_* on tensor cores where qmma applies, else qmatmul_gemm_*), INT4, INT8 and
// MXFP4 GEMVs with bf16/f16 activations to the tensor-core qmma_* entries, and the other INT4 (power-of-two group
// 32..1024) and INT8 GEMVs to the qgemv_* entries further down (same chunks and arguments, fewer instructions per
// weight). These qmatmul_* GEMV entries stay for f32 MXFP4, other INT4 groups, odd K, and MOE_PATH=qmatmul-gemv.
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

// Chunk c of a GEMV launch: its expert e, first row r0 and rows cnt (<= QMM_ROWS). MOE: the c-th QMM_ROWS-row tile
// of the experts' live rows of a device dispatch (counts, offsets); false when c is past the live work (and so is
// every later chunk). Otherwise row c of the host's chunk table. Block-uniform.
template <bool MOE>
__device__ __forceinline__ bool gemv_chunk(uint32_t c, const uint32_t* __restrict__ chunks,
                                           const uint32_t* __restrict__ counts, const uint32_t* __restrict__ offsets,
                                           uint32_t E, uint32_t& e, uint32_t& r0, uint32_t& cnt) {
  if constexpr (MOE) {
    uint32_t m0 = 0;
    const int ee = nth_row_tile(counts, E, c, QMM_ROWS, &m0);
    if (ee < 0) return false;
    e = static_cast<uint32_t>(ee);
    r0 = offsets[e] + m0;
    cnt = min(static_cast<uint32_t>(QMM_ROWS), counts[e] - m0);
  } else {
    e = __ldg(chunks + 3 * c);
    r0 = __ldg(chunks + 3 * c + 1);
    cnt = __ldg(chunks + 3 * c + 2);
  }
  return true;
}

// The activation row of output row orow (a dispatched row in MoE mode): x[row_token[orow]] with the MoE gather,
// else x[orow].
template <bool MOE, typename T>
__device__ __forceinline__ const T* gemv_x_row(const T* __restrict__ x, const uint32_t* __restrict__ row_token,
                                               uint32_t orow, uint32_t K) {
  return x + static_cast<size_t>(MOE && row_token != nullptr ? row_token[orow] : orow) * K;
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
    if (!gemv_chunk<MOE>(c, chunks, counts, offsets, E, e, r0, cnt)) break;  // block-uniform
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

// The argument lists of the GEMV entries (here and the qgemv_* ones below), P the params' element type: dense
// (chunks from the host table) and MoE mode (chunks from a device dispatch; out [R, N] for the live dispatched
// rows; row_token may be null, x then already in row order), and how they reach the templated bodies.
#define QMM_DENSE_PARAMS(T, P)                                                                                \
  const T *__restrict__ x, const uint8_t *__restrict__ qweight, const P *__restrict__ params,                 \
      const uint32_t *__restrict__ chunks, T *__restrict__ out, uint32_t C, uint32_t N, uint32_t K, uint32_t group
#define QMM_DENSE_ARGS x, qweight, params, chunks, nullptr, nullptr, nullptr, 0, out, C, N, K, group
#define QMM_MOE_PARAMS(T, P)                                                                                  \
  const T *__restrict__ x, const uint32_t *__restrict__ row_token, const uint32_t *__restrict__ counts,       \
      const uint32_t *__restrict__ offsets, const uint8_t *__restrict__ qweight, const P *__restrict__ params, \
      T *__restrict__ out, uint32_t E, uint32_t C, uint32_t N, uint32_t K, uint32_t group
#define QMM_MOE_ARGS x, qweight, params, nullptr, row_token, counts, offsets, E, out, C, N, K, group

#define QMATMUL_ENTRY(NAME, T, F)                                                                             \
  extern "C" __global__ void NAME(QMM_DENSE_PARAMS(T, QParamT<F>::type)) {                                   \
    qmatmul_impl<T, F, false>(QMM_DENSE_ARGS);                                                               \
  }

// MoE mode; with SWIGLU the epilogue: qweight [E, 2N, Kb], out [R, N] = silu(x Wg^T) * (x Wu^T).
#define QMATMUL_MOE_ENTRY(NAME, T, F, SWIGLU)                                                                 \
  extern "C" __global__ void NAME(QMM_MOE_PARAMS(T, QParamT<F>::type)) {                                     \
    qmatmul_impl<T, F, true, SWIGLU>(QMM_MOE_ARGS);                                                          \
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
QMATMUL_MOE_ENTRY(qmatmul_moe_int8_f32, float, QF_INT8, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_int8_bf16, __nv_bfloat16, QF_INT8, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_int8_f16, __half, QF_INT8, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_int4_f32, float, QF_INT4, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_int4_bf16, __nv_bfloat16, QF_INT4, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_int4_f16, __half, QF_INT4, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_mxfp4_f32, float, QF_MXFP4, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_mxfp4_bf16, __nv_bfloat16, QF_MXFP4, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_mxfp4_f16, __half, QF_MXFP4, false)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_int8_f32, float, QF_INT8, true)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_int8_bf16, __nv_bfloat16, QF_INT8, true)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_int8_f16, __half, QF_INT8, true)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_int4_f32, float, QF_INT4, true)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_int4_bf16, __nv_bfloat16, QF_INT4, true)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_int4_f16, __half, QF_INT4, true)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_mxfp4_f32, float, QF_MXFP4, true)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_mxfp4_bf16, __nv_bfloat16, QF_MXFP4, true)
QMATMUL_MOE_ENTRY(qmatmul_moe_swiglu_mxfp4_f16, __half, QF_MXFP4, true)

// ---- decode: qgemv, the INT4/INT8 GEMV at few instructions per weight ----------------------------------------
// qgemv_{dense,moe,moe_swiglu}_{int8,int4}_<dtype>: the same products, chunks, arguments and outputs as the
// qmatmul_{,moe_,moe_swiglu_}* entries above, for the shapes the host sends here (int4 with K % 32 == 0 and a
// power-of-two group of 32..1024; int8 with K % 16 == 0). Batch-1 decode streams every weight once, so the weight bytes
// set the time, and at 4.8 TB/s (H200) INT4 arrives at ~9.6e12 weights/s against ~3.4e13 lane-instructions/s:
// about 3.5 instructions per weight is all there is. The kernel above spends ~8 in its sm_90 SASS (byte
// extract, int-to-float trick, zero subtract, scale multiply, activation convert and FMA per weight and row).
// Here, per weight and row:
//  - one logic op makes the weight code a float: the masked code bits ARE a subnormal (int4 nibble p of a word,
//    u & (0xF << 4p) = q 2^(4p) 2^-149 for p <= 4; the top three after one shift by 20; int8: u ^ 0x80808080
//    makes each byte unsigned b + 128, and byte 0, 1 (mask), 2 (__byte_perm) and 3 (shift) are subnormals the
//    same way). FFMA takes subnormal operands at full rate (nvcc without -ftz, as build.rs compiles);
//  - the activations are staged once per block in shared memory as f32, pre-multiplied by the power of two that
//    makes every product x q 2^-85 (2^(64 - 4p) for the nibble or byte position p the code sits at), so one FFMA
//    per weight does the rest and every product is x * q exactly scaled (no rounding beyond the reference's,
//    unless |x q| < 2^-41, where the product's absolute error is under 2^-64);
//  - the zero point and scale leave the inner loop: each lane's 16-byte load covers one slice of 32 (int4) or 16
//    (int8) weights inside one group, and sum_k x_k s (q_k - z) = s (sum_k x_k q_k - z S) with S = sum_k x_k of
//    the slice, summed once per block at staging (int8: z = 128 for the biased bytes, s per row at the end).
// So ~1.1 (int4) or 1.25 (int8) logic ops, one FFMA and an eighth of a 16-byte shared load (shared by the warp's
// two weight rows) per weight, plus per-slice terms (counted in the sm_90 SASS of qgemv_moe_swiglu_int4_bf16's
// tile loop: 272 FFMA, 256 LOP3, 37 LDS and ~138 others per 256 weight-row products, ~2.75 per weight, plus ~0.4
// for the staging). Each lane
// issues the QR_LOADS 16-byte loads of a tile for both of its warp's QR_WROWS weight rows before it uses any,
// so a warp keeps 4 KiB in flight.
//
// Shared layout: one tile = QR_SLICES slices (QR_LOADS per lane), 4096 int4 or 2048 int8 weights per row; for
// activation row b of a pass, slice s at xs[b * QR_XS + s * (PER + 4)] (the pad of 4 floats makes the 16-byte
// accesses of 8 consecutive lanes, 4 * PER + 16 bytes apart, hit distinct banks), its sum at
// xsum[b * QR_SLICES + s]. Staging: thread t loads 16 activations of each row (int4: half a slice, the pair's sums
// meet by one shuffle; int8: one slice).
//
// Exactness guard: pre-multiplied by 2^64, an activation of magnitude 2^64 or more would overflow. Staging flags
// any |x| >= 2^62 (or inf); a pass holding such a row, like any pass whose qweight is not 16-byte aligned (or
// int4 params not 4-byte aligned), takes an exact path: each lane walks K one weight at a time as the reference
// does (slow, correct).
//
// Rows: a chunk's rows go through in passes of QR_XROWS (2 for int4, 4 for int8: what static shared memory holds
// staged), then two, then one. A pass stages each of its rows (row b at xs[b * QR_XS]) and unpacks every weight
// code once for all of them: one logic op, then one FFMA and an eighth of an LDS per row (each 16-byte load of
// staged activations serves the warp's two weight rows). In sm_90 SASS, per
// weight-row product: qgemv_moe_swiglu_int4_bf16's tile ~2.75 (one row), ~2.0 (two rows: 544 FFMA, 256 LOP3, 73
// LDS, ~147 others per 512); qgemv_moe_swiglu_int8_bf16's ~2.9 (one row), ~2.1 (two), ~1.7 (four: 884 per 512).
// The next pass streams the block's weight rows again (from L1/L2 after the first), so DRAM traffic equals the
// chunked kernel's, and batch-1 decode (one row per chunk) runs the one-row pass alone.
//
// Launch: grid = (ceil(N / 16), min(C, 65535)) (ceil(N / 8) with SwiGLU: QR_WARPS warps of QR_WROWS weight rows),
// block = QR_WARPS * 32 = 256; grid y strides over chunks.
#define QR_WARPS 8
#define QR_WROWS 2  // weight rows per warp: two features, or one feature's gate and up rows (SwiGLU)
#define QR_LOADS 4
#define QR_SLICES (32 * QR_LOADS)
// Activation rows per pass: as many as static shared memory (48 KB) holds staged, 2 for int4 (18 KB a row),
// 4 for int8 (10 KB); a chunk's rows go that many at a time, then two, then one.
template <int F> constexpr int QR_XROWS = F == QF_INT4 ? 2 : 4;

// 2^e as a float, for a constant e in the normal range.
__device__ __forceinline__ constexpr uint32_t pow2_bits(int e) { return static_cast<uint32_t>(127 + e) << 23; }

// The power of two that element i of a slice is staged with (see above): int4 nibble position p = i % 8 at bit
// 4p (p <= 4) or 4(p - 5) after the shift by 20; int8 byte position i % 4 at bit 0 except byte 1 (bit 8).
template <int F> __device__ __forceinline__ float stage_scale(int i) {
  if constexpr (F == QF_INT4) {
    const int p = i % 8;
    return __uint_as_float(pow2_bits(64 - 4 * (p <= 4 ? p : p - 5)));
  } else {
    return __uint_as_float(pow2_bits(i % 4 == 1 ? 56 : 64));
  }
}

// sum_k xs_k q_k of one 16-byte load (32 int4 or 16 int8 codes) of each of NR weight rows against its staged
// slice, times 2^-85, for each of XR activation rows (row b's slice at xs + b * QR_XS<F>): each code is unpacked
// once for all activation rows, and each staged activation is loaded once for all weight rows.
template <int F> constexpr uint32_t QR_XS = QR_SLICES * ((F == QF_INT4 ? 32 : 16) + 4);
// acc + a.x c[0] + a.y c[1] + a.z c[2] + a.w c[3], one FFMA each, in that order.
__device__ __forceinline__ float fma4(const float4& a, const float* c, float acc) {
  return fmaf(a.w, c[3], fmaf(a.z, c[2], fmaf(a.y, c[1], fmaf(a.x, c[0], acc))));
}

// Word j of a 16-byte load.
__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

template <int F, int NR, int XR>
__device__ __forceinline__ void slice_dot(const uint4 (&raw)[NR], const float* __restrict__ xs,
                                          float (&acc)[NR][XR]) {
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    if constexpr (F == QF_INT4) {
      float c[NR][8];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const uint32_t u = word_of(raw[r], t), v = u >> 20;
        c[r][0] = __uint_as_float(u & 0xFu);
        c[r][1] = __uint_as_float(u & 0xF0u);
        c[r][2] = __uint_as_float(u & 0xF00u);
        c[r][3] = __uint_as_float(u & 0xF000u);
        c[r][4] = __uint_as_float(u & 0xF0000u);
        c[r][5] = __uint_as_float(v & 0xFu);
        c[r][6] = __uint_as_float(v & 0xF0u);
        c[r][7] = __uint_as_float(v & 0xF00u);
      }
#pragma unroll
      for (int b = 0; b < XR; ++b) {
        const float4 a = *reinterpret_cast<const float4*>(xs + b * QR_XS<F> + 8 * t);
        const float4 d = *reinterpret_cast<const float4*>(xs + b * QR_XS<F> + 8 * t + 4);
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          acc[r][b] = fma4(d, c[r] + 4, fma4(a, c[r], acc[r][b]));
        }
      }
    } else {
      float c[NR][4];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const uint32_t u = word_of(raw[r], t) ^ 0x80808080u;
        c[r][0] = __uint_as_float(u & 0xFFu);
        c[r][1] = __uint_as_float(u & 0xFF00u);
        c[r][2] = __uint_as_float(__byte_perm(u, 0u, 0x4442u));
        c[r][3] = __uint_as_float(u >> 24);
      }
#pragma unroll
      for (int b = 0; b < XR; ++b) {
        const float4 a = *reinterpret_cast<const float4*>(xs + b * QR_XS<F> + 4 * t);
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          acc[r][b] = fma4(a, c[r], acc[r][b]);
        }
      }
    }
  }
}

// NR weight rows' tile against XR staged activation rows: this lane's slices s = lane + 32 j < ns of tile kb0 (in
// weights) of each live row r (live[r], warp-uniform), added to tot[r][b] as s_g (sum x q - z S) (int4) or
// sum x (b + 128) - 128 S (int8; the row scale comes at the end). Every row's loads are issued before any is used.
// Addressing: one pointer per row into this lane's first slice of the tile, so load j is that pointer plus the
// constant 32 j 16 bytes (an immediate offset in the LDG), and its (scale, zero) the row's params pointer plus j
// times the groups that 32 slices span. No branches: a slice past a partial tile's end (s >= ns), or of a row past
// N (not live), loads nothing and keeps zero codes and a zero (scale, zero); the slices past the end are staged as
// zero activations with zero sums. So those terms add exactly 0 (a dead row's sums are never written), and each
// staged activation is read once for all the warp's weight rows.
template <int F, int NR, int XR>
__device__ __forceinline__ void qgemv_rows_tile(const uint8_t* const (&wrow)[NR], const __half* const (&prow)[NR],
                                                const bool (&live)[NR], const float* __restrict__ xs,
                                                const float* __restrict__ xsum, uint32_t kb0, uint32_t ns,
                                                uint32_t gshift, uint32_t lane, float (&tot)[NR][XR]) {
  constexpr uint32_t PER = F == QF_INT4 ? 32 : 16, STRIDE = PER + 4;
  const uint32_t k0 = kb0 + lane * PER;  // this lane's first weight of the tile
  const uint32_t gstep = (32u * PER) >> gshift;  // groups between its slices j and j + 1 (int4; group <= 1024)
  uint4 raw[NR][QR_LOADS];
  __half2 sz[NR][QR_LOADS];  // int4: the slice's group (scale, zero), one 4-byte load (params checked aligned)
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const uint4* w = reinterpret_cast<const uint4*>(wrow[r] + (F == QF_INT4 ? k0 / 2 : k0));
    const __half2* g = reinterpret_cast<const __half2*>(prow[r]) + (k0 >> gshift);
#pragma unroll
    for (int j = 0; j < QR_LOADS; ++j) {
      raw[r][j] = uint4{0u, 0u, 0u, 0u};
      if constexpr (F == QF_INT4) sz[r][j] = __float2half2_rn(0.f);
      if (live[r] && lane + 32u * j < ns) {
        raw[r][j] = __ldg(w + 32 * j);
        if constexpr (F == QF_INT4) sz[r][j] = __ldg(g + j * gstep);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < QR_LOADS; ++j) {
    const uint32_t s = lane + 32u * j;
    uint4 rj[NR];
    float dot[NR][XR];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      rj[r] = raw[r][j];
#pragma unroll
      for (int b = 0; b < XR; ++b) dot[r][b] = 0.f;
    }
    slice_dot<F, NR, XR>(rj, xs + s * STRIDE, dot);
#pragma unroll
    for (int b = 0; b < XR; ++b) {
      const float S = xsum[b * QR_SLICES + s];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        if constexpr (F == QF_INT4) {
          const float2 g = __half22float2(sz[r][j]);
          tot[r][b] = fmaf(g.x, fmaf(dot[r][b], 0x1p85f, -g.y * S), tot[r][b]);
        } else {
          tot[r][b] += fmaf(dot[r][b], 0x1p85f, -128.f * S);
        }
      }
    }
  }
}

// The exact path: this lane's share of x . W[row] one weight at a time, dequantized as the reference does.
template <typename T, int F>
__device__ __forceinline__ float qgemv_row_exact(const T* __restrict__ xr, const uint8_t* __restrict__ wrow,
                                                 const typename QParamT<F>::type* __restrict__ prow, uint32_t K,
                                                 uint32_t group, uint32_t lane) {
  float acc = 0.f;
  for (uint32_t k = lane; k < K; k += 32) {
    float w;
    if constexpr (F == QF_MXFP4) {
      const uint8_t byte = wrow[k / 2];
      w = mx_decode1((k & 1u) ? (byte >> 4) : (byte & 0xf)) * mx_half_scale(prow[k / 32]);
    } else if constexpr (F == QF_INT4) {
      const uint32_t g = k / group;
      const uint8_t byte = wrow[k / 2];
      w = f16_at(prow, 2 * g) * (static_cast<float>((k & 1u) ? (byte >> 4) : (byte & 0xf)) - f16_at(prow, 2 * g + 1));
    } else {
      w = f16_at(prow, 0) * static_cast<float>(static_cast<int8_t>(wrow[k]));
    }
    acc = fmaf(to_float(xr[k]), w, acc);
  }
  return acc;
}

// One pass of XR activation rows xr[b] (output rows orow0 + b) through the warp's NR weight rows: stage each K tile
// of every row (the block's threads, 16 activations of each row apiece), then the tile's products. `exact` (in
// shared memory): set when the weights are misaligned or a staged |x| >= 2^62; then every row of the pass takes
// the exact path.
template <typename T, int F, bool SWIGLU, int NR, int XR>
__device__ __forceinline__ void qgemv_pass(const T* const (&xr)[XR], uint32_t orow0,
                                           const uint8_t* const (&wrow)[NR], const __half* const (&prow)[NR],
                                           const bool (&live)[NR], bool any_live, bool vec, bool xvec,
                                           float* __restrict__ xs, float* __restrict__ xsum, int& exact,
                                           T* __restrict__ out, uint32_t n0, uint32_t N, uint32_t K, uint32_t group,
                                           uint32_t gshift) {
  constexpr bool INT4 = F == QF_INT4;
  constexpr uint32_t PER = INT4 ? 32 : 16, STRIDE = PER + 4, TILE = QR_SLICES * PER;
  constexpr int NF = SWIGLU ? NR / 2 : NR;
  const uint32_t tid = threadIdx.x, lane = tid & 31u;
  // Staging: thread t's 16 activations start at element 16 t of the tile: slice t / 2 (int4) or t (int8).
  // (16 is a multiple of 8 and 4, so each of them is staged with stage_scale of its index j < 16.)
  const uint32_t slice = INT4 ? tid / 2 : tid, half16 = INT4 ? (tid & 1u) * 16 : 0;
  const bool stager = 16 * tid < TILE;  // every int4 thread; int8 stages 2048 activations with 128 of its 256
  float tot[NR][XR];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int b = 0; b < XR; ++b) tot[r][b] = 0.f;
  if (tid == 0) exact = !vec;
  __syncthreads();  // the previous pass's reads of xs and `exact` are done
  bool fallback = false;
  for (uint32_t kb0 = 0; kb0 < K; kb0 += TILE) {
    const uint32_t kt = min(TILE, K - kb0), ns = kt / PER;
    const bool mine = 16 * tid < kt;
#pragma unroll
    for (int b = 0; b < XR; ++b) {
      // Past a partial tile's end the slices are staged as zeros (and zero sums): see qgemv_rows_tile.
      float v[16], part = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) v[j] = 0.f;
      if (mine) {
        load_x16(xr[b], kb0 + 16 * tid, xvec, v);
        bool big = false;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          part += v[j];
          big |= fabsf(v[j]) >= 0x1p62f;  // inf too; NaN propagates on either path
        }
        if (big) exact = 1;
      }
      float* dst = xs + b * QR_XS<F> + slice * STRIDE + half16;
      if (stager) {
#pragma unroll
        for (int j = 0; j < 16; j += 4) {
          const float4 q = {v[j] * stage_scale<F>(j), v[j + 1] * stage_scale<F>(j + 1),
                            v[j + 2] * stage_scale<F>(j + 2), v[j + 3] * stage_scale<F>(j + 3)};
          *reinterpret_cast<float4*>(dst + j) = q;
        }
      }
      if constexpr (INT4) part += __shfl_xor_sync(0xffffffffu, part, 1);  // the slice's two halves
      if (stager && half16 == 0) xsum[b * QR_SLICES + slice] = part;
    }
    __syncthreads();
    fallback = exact != 0;
    if (!fallback && any_live) qgemv_rows_tile<F, NR, XR>(wrow, prow, live, xs, xsum, kb0, ns, gshift, lane, tot);
    __syncthreads();  // xs is restaged next
    if (fallback) break;
  }
#pragma unroll
  for (int b = 0; b < XR; ++b) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      if (!live[r]) continue;
      if (fallback) tot[r][b] = qgemv_row_exact<T, F>(xr[b], wrow[r], prow[r], K, group, lane);
      else if constexpr (!INT4) tot[r][b] *= f16_at(prow[r], 0);
      tot[r][b] = warp_sum(tot[r][b]);
    }
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      if (!live[f] || lane != 0) continue;
      const float g = tot[f][b];
      out[static_cast<size_t>(orow0 + b) * N + n0 + f] =
          from_float<T>(SWIGLU ? g / (1.f + expf(-g)) * tot[NF + f][b] : g);
    }
  }
}

template <typename T, int F, bool MOE, bool SWIGLU>
__device__ __forceinline__ void qgemv_impl(const T* __restrict__ x, const uint8_t* __restrict__ qweight,
                                           const __half* __restrict__ params, const uint32_t* __restrict__ chunks,
                                           const uint32_t* __restrict__ row_token,
                                           const uint32_t* __restrict__ counts,
                                           const uint32_t* __restrict__ offsets, uint32_t E, T* __restrict__ out,
                                           uint32_t C, uint32_t N, uint32_t K, uint32_t group) {
  constexpr bool INT4 = F == QF_INT4;
  constexpr int XR = QR_XROWS<F>;
  __shared__ __align__(16) float xs[XR * QR_XS<F>];
  __shared__ float xsum[XR * QR_SLICES];
  __shared__ int exact;
  const uint32_t tid = threadIdx.x;
  // This warp's NF features n0, n0 + 1, ...; its NR weight rows: one per feature, or gate and up (SwiGLU).
  constexpr int NR = QR_WROWS, NF = SWIGLU ? NR / 2 : NR;
  const uint32_t n0 = (blockIdx.x * QR_WARPS + (tid >> 5)) * NF;
  const bool any_live = n0 < N;  // warp-uniform; dead warps still stage and meet every barrier
  const size_t Kb = INT4 ? K / 2 : K, PR = INT4 ? 2 * static_cast<size_t>((K + group - 1) / group) : 1;
  // The host checked K and group; int4 also reads (scale, zero) as one 4-byte __half2.
  const bool vec = is_aligned16(qweight) && (!INT4 || (reinterpret_cast<uintptr_t>(params) & 3u) == 0);
  const uint32_t gshift = INT4 ? __ffs(group) - 1 : 0;  // group is a power of two (the host checked)
  const bool xvec = is_aligned16(x);       // K % 16 == 0 keeps every row aligned too

  for (uint32_t c = blockIdx.y; c < C; c += gridDim.y) {
    uint32_t e, r0, cnt;
    if (!gemv_chunk<MOE>(c, chunks, counts, offsets, E, e, r0, cnt)) break;  // block-uniform
    // Weight row r: feature n0 + r % NF, the up half for r >= NF (SwiGLU).
    bool live[NR];
    const uint8_t* wrow[NR];
    const __half* prow[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const uint32_t n = n0 + r % NF;
      live[r] = n < N;
      const size_t row =
          SWIGLU ? static_cast<size_t>(e) * 2 * N + (r >= NF ? N : 0) + n : static_cast<size_t>(e) * N + n;
      wrow[r] = qweight + (live[r] ? row : 0) * Kb;
      prow[r] = params + (live[r] ? row : 0) * PR;
    }
    // The chunk's rows XR at a time, then two, then one (block-uniform: cnt is the chunk's).
    const auto xrow = [&](uint32_t i) { return gemv_x_row<MOE>(x, row_token, r0 + i, K); };
    uint32_t i = 0;
    for (; i + XR <= cnt; i += XR) {
      const T* xr[XR];
#pragma unroll
      for (int b = 0; b < XR; ++b) xr[b] = xrow(i + b);
      qgemv_pass<T, F, SWIGLU, NR, XR>(xr, r0 + i, wrow, prow, live, any_live, vec, xvec, xs, xsum, exact, out, n0, N,
                                       K, group, gshift);
    }
    if constexpr (XR > 2) {
      if (i + 2 <= cnt) {
        const T* xr[2] = {xrow(i), xrow(i + 1)};
        qgemv_pass<T, F, SWIGLU, NR, 2>(xr, r0 + i, wrow, prow, live, any_live, vec, xvec, xs, xsum, exact, out, n0, N,
                                        K, group, gshift);
        i += 2;
      }
    }
    if (i < cnt) {
      const T* xr[1] = {xrow(i)};
      qgemv_pass<T, F, SWIGLU, NR, 1>(xr, r0 + i, wrow, prow, live, any_live, vec, xvec, xs, xsum, exact, out, n0, N, K,
                                      group, gshift);
    }
  }
}

// Two blocks of 256 threads per SM (what their 38-43 KB of shared memory allows on an sm_89), so at most 128
// registers; without the minimum ptxas put the int8 entries in 80 registers and spilled.
#define QGEMV_DENSE_ENTRY(NAME, T, F)                                                                         \
  extern "C" __global__ void __launch_bounds__(QR_WARPS * 32, 2) NAME(QMM_DENSE_PARAMS(T, __half)) {         \
    qgemv_impl<T, F, false, false>(QMM_DENSE_ARGS);                                                          \
  }

#define QGEMV_MOE_ENTRY(NAME, T, F, SWIGLU)                                                                   \
  extern "C" __global__ void __launch_bounds__(QR_WARPS * 32, 2) NAME(QMM_MOE_PARAMS(T, __half)) {         \
    qgemv_impl<T, F, true, SWIGLU>(QMM_MOE_ARGS);                                                            \
  }

QGEMV_DENSE_ENTRY(qgemv_dense_int8_f32, float, QF_INT8)
QGEMV_DENSE_ENTRY(qgemv_dense_int8_bf16, __nv_bfloat16, QF_INT8)
QGEMV_DENSE_ENTRY(qgemv_dense_int8_f16, __half, QF_INT8)
QGEMV_DENSE_ENTRY(qgemv_dense_int4_f32, float, QF_INT4)
QGEMV_DENSE_ENTRY(qgemv_dense_int4_bf16, __nv_bfloat16, QF_INT4)
QGEMV_DENSE_ENTRY(qgemv_dense_int4_f16, __half, QF_INT4)
QGEMV_MOE_ENTRY(qgemv_moe_int8_f32, float, QF_INT8, false)
QGEMV_MOE_ENTRY(qgemv_moe_int8_bf16, __nv_bfloat16, QF_INT8, false)
QGEMV_MOE_ENTRY(qgemv_moe_int8_f16, __half, QF_INT8, false)
QGEMV_MOE_ENTRY(qgemv_moe_int4_f32, float, QF_INT4, false)
QGEMV_MOE_ENTRY(qgemv_moe_int4_bf16, __nv_bfloat16, QF_INT4, false)
QGEMV_MOE_ENTRY(qgemv_moe_int4_f16, __half, QF_INT4, false)
QGEMV_MOE_ENTRY(qgemv_moe_swiglu_int8_f32, float, QF_INT8, true)
QGEMV_MOE_ENTRY(qgemv_moe_swiglu_int8_bf16, __nv_bfloat16, QF_INT8, true)
QGEMV_MOE_ENTRY(qgemv_moe_swiglu_int8_f16, __half, QF_INT8, true)
QGEMV_MOE_ENTRY(qgemv_moe_swiglu_int4_f32, float, QF_INT4, true)
QGEMV_MOE_ENTRY(qgemv_moe_swiglu_int4_bf16, __nv_bfloat16, QF_INT4, true)
QGEMV_MOE_ENTRY(qgemv_moe_swiglu_int4_f16, __half, QF_INT4, true)

// ---- decode on tensor cores: qmma, the INT4, INT8 and MXFP4 GEMVs for bf16/f16 activations -------------------
// qmma_{dense,moe,moe_swiglu}_{int4,int8,mxfp4}_{bf16,f16}: the same products, chunks (up to QMM_ROWS = 8
// activation rows), arguments and outputs as the qgemv_* entries above, for int4 with K % 32 == 0 and a
// power-of-two group of at least 32, int8 with K % 16 == 0 or mxfp4 with K % 32 == 0 (its codes on INT4's path:
// see qmmx_a), bf16/f16 activations, sm_80+ (the host's qgemv_entry decides). One
// block is one mma.sync m16n8k16 tile: 16 weight rows (M) by the chunk's up to 8 activation rows (N), over all
// of K. INT4 first; INT8 (qmma8_iter) after the split-K notes.
//  - The weight codes go to the tensor cores as 16-bit floats without a conversion: a nibble OR-ed into the
//    mantissa of MAGIC (128 in bf16, 1024 in f16: the value whose unit in the last place is 1) is MAGIC + q
//    exactly, and one shift plus one LOP3 makes two of them (nibbles i and i + 4 of a 32-bit word, one per
//    half). The activations go in as they are. So every product (MAGIC + q) x is exact in the f32 accumulator.
//  - The zero point, the scale and the MAGIC offset leave the inner loop: per group segment the tile
//    accumulates P = sum (MAGIC + q) x and, by a second mma with A = ones, S = sum x per activation row; then
//    sum s (q - z) x = s (P - (MAGIC + z) S), two FFMA per output.
//  - Which K positions a tile's 16 k slots hold does not matter as long as A and B agree: lane (g, t) loads
//    32-bit word 4 j + t of its rows g and g + 8 (weights 32 j + 8 t + 0..7 of the step) and the 8 activations
//    of row g at the same positions (one 16-byte load), and its fragment slots 2t, 2t+1, 2t+8, 2t+9 hold
//    positions {0, 4, 1, 5} (tile 0 of the step) or {2, 6, 3, 7} (tile 1): the LOP3 pairs on the A side, two
//    PRMT per tile on the B side. A step's 32 weights lie in one group (group % 32 == 0).
// Per lane and 32-weight step: 2 4-byte weight loads, one 16-byte activation load, 4 PRMT, 3 SHF + 4 LOP3 per
// weight word, 4 HMMA, for 16 weights of every activation row up to 8; plus 4 FFMA pairs per group segment.
// Batch-1 decode wastes 7 of the 8 B columns, which cost nothing extra: the instructions are per weight. In the
// sm_90 SASS of qmma_moe_swiglu_int4_bf16 (g128, a full iteration of QM_STEPS = 4 steps): 143 instructions per
// 64 weights of a lane (32 LOP3, 26 SHF, 16 PRMT, 16 HMMA, 14 loads, ~39 others), ~2.2 per weight for 1 to 8
// activation rows. Eight steps per iteration came to 2.1 (g >= 256) or 2.4 (g128, two segments) and 128
// registers with spills, so an iteration is four (91-102 registers).
//
// Split K: the block's QM_WARPS warps take 128-weight iterations kb = 128 (warp + QM_WARPS i), each with its
// own partial sums (a group segment never straddles two warps: it is min(group, 128) weights); warp 0 adds
// the others' from shared memory in warp order, applies the SwiGLU epilogue and writes. All QM_STEPS loads of
// an iteration are issued before any is used.
//
// INT8 (one f16 scale per row, no zero point): a code b = m - 128 s (m its low 7 bits, s its sign bit) is the sum
// of two exact 16-bit values, MAGIC + m (the low 7 bits OR-ed into MAGIC's mantissa) and -(MAGIC + 128 s) (the
// sign bit OR-ed into -MAGIC: bit 7 is bf16's lowest exponent bit, so -128 or -256; f16's mantissa bit 7, so
// -1024 or -1152). Each goes through its own mma against the same B, into the same accumulator, so the tile sums
// sum b x with no offset, no S and no per-segment epilogue; the row's scale multiplies the block's total. Per
// 32-bit word of a row (4 codes): one SHF (the odd bytes) and 4 LOP3 make codes {0, 2} and {1, 3} of both
// planes; two PRMT per tile pair the activations to match. A lane loads 16 bytes of each of its two rows
// (kb + 64 q + 16 t, q = 0, 1) and the 32 bytes of activations at the same positions, so the iteration is 128
// weights as for int4. sm_90 SASS of qmma_moe_swiglu_int8_bf16 (a full iteration): 138 instructions per 64
// weights of a lane (64 LOP3, 18 SHF, 16 PRMT, 16 HMMA, 8 128-bit loads, ~16 others), ~2.2 per weight for 1 to
// 8 activation rows, where qgemv's int8 needs ~2.9 per weight and row for one row and ~1.7 for four.
//
// MXFP4 (an E8M0 exponent per 32 weights) runs INT4's iteration with its own A decode (qmmx_a: each code as the
// integer 12 + 2 fp4 in MAGIC's mantissa, so the zero point is the constant 12 and every segment is one step).
// sm_90 SASS of qmma_moe_swiglu_mxfp4_bf16 (a full iteration): 326 instructions per 64 weights of a lane (80
// PRMT, 72 LOP3, 32 FFMA, 16 HMMA, 20 loads, ~106 others), ~5.1 per weight for 1 to 8 activation rows, where
// qmatmul's MXFP4 GEMV spends ~6.3 per weight on dequantization alone (202 instructions per 16-byte load of 32
// weights: LOP3, I2F, FMUL) and then an FFMA per weight and row.
//
// Exactness: if a sum of warp 0 is not finite (an inf or NaN activation, or (MAGIC + q) x overflowing where the
// reference's s (q - z) x would not), or a pointer is not aligned for the vector loads, warp 0 recomputes the
// block's outputs one weight at a time as the reference does (slow, correct).
//
// Launch: grid = (min(C, 2^31 - 1), ceil(N / 16) <= 65535) (ceil(N / 8) with SwiGLU), block = QM_WARPS * 32 =
// 256. The chunks are on x, the fastest-varying index, so the blocks a GPU starts together are the chunks of one
// weight tile: an expert's 8-row chunks (a prefill or a large batch) read each 16-row tile from DRAM once and
// then from L2, where feature blocks on x would stream the whole weight once per chunk.
#define QM_WARPS 8
#define QM_STEPS 4  // 32-weight steps per warp iteration

template <typename T> struct QmmaMagic;
template <> struct QmmaMagic<__nv_bfloat16> {
  static constexpr uint32_t MAGIC2 = 0x43004300u, ONES2 = 0x3F803F80u;  // (128, 128), (1, 1)
  static constexpr float MAGIC = 128.f;
};
template <> struct QmmaMagic<__half> {
  static constexpr uint32_t MAGIC2 = 0x64006400u, ONES2 = 0x3C003C00u;  // (1024, 1024), (1, 1)
  static constexpr float MAGIC = 1024.f;
};

// (a & mask) | bits in one LOP3 (the compiler splits it in two when both constants are immediates).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));
  return r;
#else
  return (a & mask) | bits;
#endif
}

// A 4-bit format's A fragments of one 32-weight step from pr[h][i], the decoded pairs (codes {i, i + 4} of the
// word of row g for h = 0, of row g + 8 for h = 1): i = 0, 1 make tile 0, i = 2, 3 tile 1 (mma's a0..a3 order:
// row g low k, row g + 8 low k, row g high k, row g + 8 high k).
__device__ __forceinline__ void qmma_nib_frags(const uint32_t (&pr)[2][4], uint32_t (&a0)[4], uint32_t (&a1)[4]) {
  a0[0] = pr[0][0], a0[1] = pr[1][0], a0[2] = pr[0][1], a0[3] = pr[1][1];
  a1[0] = pr[0][2], a1[1] = pr[1][2], a1[2] = pr[0][3], a1[3] = pr[1][3];
}

// INT4, one 32-weight step: the A fragments of its two k16 tiles from the step's words of rows g (w0) and g + 8
// (w1): MAGIC + codes {i, i + 4} of each word, i = 0, 1 (tile 0) and 2, 3 (tile 1).
template <typename T>
__device__ __forceinline__ void qmma4_a(uint32_t w0, uint32_t w1, uint32_t (&a0)[4], uint32_t (&a1)[4]) {
  constexpr uint32_t MAGIC2 = QmmaMagic<T>::MAGIC2;
  const uint32_t wq[2] = {w0, w1};
  uint32_t pr[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 4; ++i) pr[h][i] = and_or(wq[h] >> (4 * i), 0x000F000Fu, MAGIC2);
  qmma_nib_frags(pr, a0, a1);
}

// MXFP4 on the same fragments: each E2M1 code n (sign bit 3) becomes the integer u = 12 + 2 fp4(n) (12 - 2 |fp4|
// when negative), 0..24, so MAGIC + u is exact and the INT4 path's zero point is the constant 12: the segment
// (one 32-weight group) folds as s (P - (MAGIC + 12) S) with s = 2^(e - 128), the E8M0 scale of the doubled
// values. Per word and half (nibbles {0, 1, 4, 5}, then {2, 3, 6, 7}): one PRMT gathers the half's 4 codes into a
// selector, a LOP3 drops their sign bits, two PRMT look u up in byte tables for both signs, one PRMT turns the
// signs into a byte mask (PRMT's sign-replicate mode on 0x80 bytes: 0xFF for a negative code, 0x80 otherwise,
// which keeps the positive value since no table byte reaches 0x80) and one LOP3 selects; then the INT4 pairing
// (bytes 0 and 2: nibbles i and i + 4): two LOP3 and a shift.
#define MXU_POS_LO 0x0F0E0D0Cu  // 12 + {0, 1, 2, 3}: codes 0..3 (2 fp4 = 0, 1, 2, 3)
#define MXU_POS_HI 0x18141210u  // 12 + {4, 6, 8, 12}: codes 4..7
#define MXU_NEG_LO 0x090A0B0Cu  // 12 - {0, 1, 2, 3}
#define MXU_NEG_HI 0x00040608u  // 12 - {4, 6, 8, 12}

// PRMT in its default mode with all 4 selector bits: bit 3 of a nibble replicates the selected byte's sign bit
// (__byte_perm is specified on 3 bits, so nvcc masks the 4th off first). The emulator's __byte_perm has both.
__device__ __forceinline__ uint32_t prmt4(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(s));
  return r;
#else
  return __byte_perm(a, b, s);
#endif
}

template <typename T>
__device__ __forceinline__ void qmmx_a(uint32_t w0, uint32_t w1, uint32_t (&a0)[4], uint32_t (&a1)[4]) {
  constexpr uint32_t MAGIC2 = QmmaMagic<T>::MAGIC2;
  const uint32_t wq[2] = {w0, w1};
  uint32_t pr[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const uint32_t raw = prmt4(wq[h], 0u, half == 0 ? 0x0020u : 0x0031u);  // the half's codes, signs included
      const uint32_t sel = raw & 0x7777u;
      const uint32_t pos = prmt4(MXU_POS_LO, MXU_POS_HI, sel), neg = prmt4(MXU_NEG_LO, MXU_NEG_HI, sel);
      const uint32_t m = prmt4(0x80808080u, 0x80808080u, raw);
      const uint32_t u = (neg & m) | (pos & ~m);
      pr[h][2 * half] = and_or(u, 0x00FF00FFu, MAGIC2);
      pr[h][2 * half + 1] = and_or(u >> 8, 0x00FF00FFu, MAGIC2);
    }
  qmma_nib_frags(pr, a0, a1);
}

// The A fragments of a 4-bit format's step: INT4 or MXFP4.
template <typename T, int F>
__device__ __forceinline__ void qmma_nib_a(uint32_t w0, uint32_t w1, uint32_t (&a0)[4], uint32_t (&a1)[4]) {
  if constexpr (F == QF_MXFP4) qmmx_a<T>(w0, w1, a0, a1);
  else qmma4_a<T>(w0, w1, a0, a1);
}

// A 4-bit format's per-row segment params as the qmma kernels load them: INT4's (scale, zero) pairs, MXFP4's
// E8M0 bytes.
template <int F> struct QmPar { using type = __half2; };
template <> struct QmPar<QF_MXFP4> { using type = uint8_t; };

// INT4, a step's B fragments from the lane's 8 activations xv: positions {0, 4}, {1, 5} (tile 0: words x, y of the
// result) and {2, 6}, {3, 7} (tile 1: z, w), matching qmma4_a.
__device__ __forceinline__ uint4 qmma4_pair(const uint4& xv) {
  return uint4{__byte_perm(xv.x, xv.z, 0x5410u), __byte_perm(xv.x, xv.z, 0x7632u), __byte_perm(xv.y, xv.w, 0x5410u),
               __byte_perm(xv.y, xv.w, 0x7632u)};
}

// INT4, one step's products against one 8-row activation tile: d += A B with B from bv (qmma4_pair). With A = ones
// (MAGIC's ONES2 in every word), d += S.
template <typename T>
__device__ __forceinline__ void qmma4_mma(const uint32_t (&a0)[4], const uint32_t (&a1)[4], const uint4& bv,
                                          float (&d)[4]) {
  const uint32_t b0[2] = {bv.x, bv.y}, b1[2] = {bv.z, bv.w};
  mma_16816<T>(d, a0, b0);
  mma_16816<T>(d, a1, b1);
}

// 4-bit formats, the end of a group segment that starts at k0: the (scale, zero) pairs of rows g and g + 8 (p[h]
// at the lane's rows; INT4's pairs, MXFP4's (2^(e - 128), 12)); a dead row, or a segment past K in a partial
// iteration, gets a zero scale.
template <int F, bool TAIL>
__device__ __forceinline__ void qmma4_params(const typename QmPar<F>::type* const (&p)[2], const bool (&live)[2],
                                             uint32_t kb, uint32_t j0, uint32_t K, uint32_t gshift,
                                             float2 (&sz)[2]) {
  const uint32_t k0 = kb + 32u * j0;  // the segment's first weight: step j0 of the iteration from kb
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if constexpr (F == QF_MXFP4) {
      // One exponent per step: the iteration's sit at kb / 32 + j (one base, immediate offsets). A dead row's
      // pointer is row 0's, so only a step past K skips its load: unconditional loads keep the row pointers in
      // registers, where under the live branch the compiler recomputed them at each of the iteration's loads.
      float2 v{0.f, 0.f};
      if (!TAIL || k0 < K) v = float2{mx_half_scale(__ldg(p[h] + (kb >> 5) + j0)), 12.f};
      sz[h] = live[h] ? v : float2{0.f, 0.f};
    } else {
      sz[h] = float2{0.f, 0.f};
      if (live[h] && (!TAIL || k0 < K)) sz[h] = __half22float2(__ldg(p[h] + (k0 >> gshift)));
    }
  }
}

// ...and the fold of the segment's sums: tot += s (P - (MAGIC + z) S); P and S restart. d[0], d[1]: row g for
// activation rows 2t, 2t + 1; d[2], d[3]: row g + 8. S's rows are all equal.
template <typename T>
__device__ __forceinline__ void qmma4_fold(const float2 (&sz)[2], float (&P)[4], float (&S)[4], float (&tot)[4]) {
  constexpr float MAGIC = QmmaMagic<T>::MAGIC;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 g = sz[q / 2];
    tot[q] = fmaf(g.x, fmaf(-(MAGIC + g.y), S[q & 1], P[q]), tot[q]);
    P[q] = 0.f;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) S[q] = 0.f;
}

// One iteration of a warp: QM_STEPS steps of 32 weights from kb of the block's rows (row g's 32-bit words from
// w[0], row g + 8's from w[1], each already offset by the lane's word t; their (scale, zero) pairs p[0], p[1];
// a row past N reads packed row 0 and gets a zero scale) against the activations of row g (xr, a live row's
// when g is past the chunk: that column is computed and dropped), added to tot as in the notes above. Segments of
// SEG steps share one group. TAIL: a partial iteration (K - kb < 32 QM_STEPS): the steps past K load nothing.
template <typename T, int F, int SEG, bool TAIL>
__device__ __forceinline__ void qmma_iter(const uint32_t* const (&w)[2], const typename QmPar<F>::type* const (&p)[2],
                                          const bool (&live)[2], const T* __restrict__ xr, uint32_t kb,
                                          uint32_t K, uint32_t gshift, uint32_t t, float (&tot)[4]) {
  const uint32_t ns = TAIL ? (K - kb) / 32u : QM_STEPS;  // steps past ns load nothing
  const uint4* xp = reinterpret_cast<const uint4*>(xr + kb) + t;
  uint32_t wq[2][QM_STEPS];
  uint4 xv[QM_STEPS];
#pragma unroll
  for (int j = 0; j < QM_STEPS; ++j) {
    const bool in = !TAIL || static_cast<uint32_t>(j) < ns;
#pragma unroll
    for (int h = 0; h < 2; ++h) wq[h][j] = in ? __ldg(w[h] + kb / 8 + 4 * j) : 0u;
    xv[j] = in ? __ldg(xp + 4 * j) : uint4{0u, 0u, 0u, 0u};
  }
  constexpr uint32_t ONES2 = QmmaMagic<T>::ONES2;
  const uint32_t ones[4] = {ONES2, ONES2, ONES2, ONES2};
  float P[4] = {0.f, 0.f, 0.f, 0.f}, S[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < QM_STEPS; ++j) {
    uint32_t a0[4], a1[4];
    qmma_nib_a<T, F>(wq[0][j], wq[1][j], a0, a1);
    const uint4 bv = qmma4_pair(xv[j]);
    qmma4_mma<T>(a0, a1, bv, P);
    qmma4_mma<T>(ones, ones, bv, S);
    if (j % SEG == SEG - 1) {
      float2 sz[2];
      qmma4_params<F, TAIL>(p, live, kb, static_cast<uint32_t>(j + 1 - SEG), K, gshift, sz);
      qmma4_fold<T>(sz, P, S, tot);
    }
  }
}

// qmma_iter for the runtime segment length seg (1, 2 or QM_STEPS steps; MXFP4's groups are one step).
template <typename T, int F, bool TAIL>
__device__ __forceinline__ void qmma_iter_seg(uint32_t seg, const uint32_t* const (&w)[2],
                                              const typename QmPar<F>::type* const (&p)[2], const bool (&live)[2],
                                              const T* __restrict__ xr, uint32_t kb, uint32_t K, uint32_t gshift,
                                              uint32_t t, float (&tot)[4]) {
  if (F == QF_MXFP4 || seg == 1) qmma_iter<T, F, 1, TAIL>(w, p, live, xr, kb, K, gshift, t, tot);
  else if (seg == 2) qmma_iter<T, F, 2, TAIL>(w, p, live, xr, kb, K, gshift, t, tot);
  else qmma_iter<T, F, QM_STEPS, TAIL>(w, p, live, xr, kb, K, gshift, t, tot);
}

// INT8, one 32-bit word (4 codes) of rows g (u0) and g + 8 (u1): the A planes of codes {0, 2} and {1, 3}, split as
// code = m - 128 s (m: the low 7 bits, s: the sign bit) into MAGIC + m (am) and -(MAGIC + 128 s) (as; bf16: -128 or
// -256 by the exponent's low bit; f16: -1024 or -1152), whose sum is the code exactly.
template <typename T>
__device__ __forceinline__ void qmma8_a(uint32_t u0, uint32_t u1, uint32_t (&am)[4], uint32_t (&as)[4]) {
  constexpr uint32_t MAGIC2 = QmmaMagic<T>::MAGIC2, NEG2 = MAGIC2 | 0x80008000u;  // (MAGIC, MAGIC), negated
  const uint32_t u[2] = {u0, u1};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t v = u[h] >> 8;
    am[h] = and_or(u[h], 0x007F007Fu, MAGIC2);
    am[2 + h] = and_or(v, 0x007F007Fu, MAGIC2);
    as[h] = and_or(u[h], 0x00800080u, NEG2);
    as[2 + h] = and_or(v, 0x00800080u, NEG2);
  }
}

// INT8, the B fragment of a word's 4 activations (xa: the first two, xb: the last two): pairs {0, 2} and {1, 3},
// as qmma8_a pairs the codes.
__device__ __forceinline__ uint2 qmma8_pair(uint32_t xa, uint32_t xb) {
  return uint2{__byte_perm(xa, xb, 0x5410u), __byte_perm(xa, xb, 0x7632u)};
}

// INT8, a word's products against one 8-row activation tile, B from qmma8_pair.
template <typename T>
__device__ __forceinline__ void qmma8_mma(const uint32_t (&am)[4], const uint32_t (&as)[4], const uint2& bv,
                                          float (&acc)[4]) {
  const uint32_t b[2] = {bv.x, bv.y};
  mma_16816<T>(acc, as, b);
  mma_16816<T>(acc, am, b);
}

// INT8: one iteration of a warp, 128 weights from kb of the block's rows: lane (g, t) loads bytes
// kb + 64 q + 16 t (q = 0, 1) of rows g (w[0]) and g + 8 (w[1]) and the 16 activations of row g (xr) at the same
// positions, all before any is used; each 32-bit word (4 codes of a row) is one tile. TAIL: a partial iteration
// (K - kb < 128; K % 16 == 0): a lane's 16 weights past K load nothing (zero weights and activations add 0).
template <typename T, bool TAIL>
__device__ __forceinline__ void qmma8_iter(const uint4* const (&w)[2], const T* __restrict__ xr, uint32_t kb,
                                           uint32_t K, uint32_t t, float (&acc)[4]) {
  const uint4* xp = reinterpret_cast<const uint4*>(xr);
  const uint4 zero{0u, 0u, 0u, 0u};
  uint4 wq[2][2], xv[2][2];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint32_t k0 = kb + 64u * q + 16u * t;
    const bool in = !TAIL || k0 < K;
#pragma unroll
    for (int h = 0; h < 2; ++h) wq[h][q] = in ? __ldg(w[h] + k0 / 16) : zero;
#pragma unroll
    for (int i = 0; i < 2; ++i) xv[q][i] = in ? __ldg(xp + k0 / 8 + i) : zero;
  }
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t am[4], as[4];
      qmma8_a<T>(word_of(wq[0][q], j), word_of(wq[1][q], j), am, as);
      qmma8_mma<T>(am, as, qmma8_pair(word_of(xv[q][j / 2], 2 * (j % 2)), word_of(xv[q][j / 2], 2 * (j % 2) + 1)),
                   acc);
    }
}

// What the qmma kernels derive from K and the group for format F: the group's shift (INT4's group is a power of
// two >= 32, the host checked; MXFP4's is 32; INT8 has one scale per row), params per row (INT4's (scale, zero)
// pairs, MXFP4's exponents), bytes per packed row, the group segment in 32-weight steps (min(group, 128)
// weights: a segment never straddles an iteration), and whether the pointers allow the vector loads (4-byte
// words and INT4 pairs, 16-byte INT8 loads, 16-byte activations); and the lane's pointers into its rows g and
// g + 8: a 4-bit format's word t of each row and the row's params, INT8's rows as 16-byte units.
template <int F> struct QmmaGeom {
  static constexpr bool NIB = F != QF_INT8;
  using P = typename QParamT<F>::type;
  using PP = typename QmPar<F>::type;
  uint32_t gshift, seg;
  size_t PR, KB;
  bool vec;
  template <typename T>
  __device__ __forceinline__ QmmaGeom(const T* x, const uint8_t* qweight, const P* params, uint32_t K,
                                      uint32_t group)
      : gshift(F == QF_INT4 ? __ffs(group) - 1 : F == QF_MXFP4 ? 5 : 0),
        seg(F == QF_INT4 ? min(group / 32u, static_cast<uint32_t>(QM_STEPS)) : 1),
        PR(NIB ? (K + 31 + (F == QF_INT4 ? group - 32 : 0)) >> gshift : 1), KB(NIB ? K / 2 : K),
        vec((reinterpret_cast<uintptr_t>(qweight) & (NIB ? 3u : 15u)) == 0 &&
            (F != QF_INT4 || (reinterpret_cast<uintptr_t>(params) & 3u) == 0) && is_aligned16(x)) {}
  __device__ __forceinline__ void ptrs(const uint8_t* qweight, const P* params, const size_t (&rows)[2],
                                       uint32_t t, const uint32_t* (&w4)[2], const PP* (&p4)[2],
                                       const uint4* (&w8)[2]) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      w4[h] = reinterpret_cast<const uint32_t*>(qweight + rows[h] * KB) + t;
      p4[h] = reinterpret_cast<const PP*>(params) + rows[h] * PR;
      w8[h] = reinterpret_cast<const uint4*>(qweight + rows[h] * KB);
    }
  }
};

// Tile row m (0..15) of a warp's 16 weight rows from feature n0: feature n0 + m, or with SwiGLU feature
// n0 + (m & 7)'s gate row (m < 8) or up row (m >= 8), so the epilogue finds both in one lane. Returns its packed
// row of expert e (row 0 when past N: never loaded).
template <bool SWIGLU>
__device__ __forceinline__ size_t qmma_tile_row(uint32_t e, uint32_t n0, uint32_t N, uint32_t m, bool& live) {
  const uint32_t n = SWIGLU ? n0 + (m & 7u) : n0 + m;
  live = n < N;
  const size_t row =
      SWIGLU ? static_cast<size_t>(e) * 2 * N + (m >= 8 ? N : 0) + n : static_cast<size_t>(e) * N + n;
  return live ? row : 0;
}

// The end of a warp's 16 x 8 tile: tot as the mma leaves it (rows g, g + 8 by activation rows 2t, 2t + 1; INT8
// not yet scaled) for activation rows 0..cnt, whose activations are x_row(b) and outputs out[r0 + b]. Applies
// INT8's row scales, recomputes the tile one weight at a time as the reference does when `bad` (the vector path
// did not run) or an output that is written is not finite in any lane (see "Exactness"), and writes it (SwiGLU:
// silu(gate) * up from the f32 sums).
template <typename T, int F, bool SWIGLU, class XRow>
__device__ __forceinline__ void qmma_tile_out(float (&tot)[4], bool bad, const size_t (&rows)[2],
                                              const bool (&live)[2], uint32_t e, uint32_t n0, uint32_t N,
                                              uint32_t cnt, const XRow& x_row, const uint8_t* __restrict__ qweight,
                                              const typename QParamT<F>::type* __restrict__ params, uint32_t K,
                                              uint32_t group,
                                              T* __restrict__ out, uint32_t r0) {
  constexpr bool INT4 = F == QF_INT4, NIB = F != QF_INT8;
  const uint32_t lane = threadIdx.x & 31u, g = lane >> 2, t = lane & 3u;
  const size_t KB = NIB ? K / 2 : K, PR = INT4 ? (K + group - 1) / group : F == QF_MXFP4 ? (K + 31) / 32 : 1;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if constexpr (!NIB) tot[q] *= live[q / 2] ? f16_at(params, rows[q / 2]) : 0.f;  // INT8: the row's scale
    // An inf or NaN in an output that is written.
    bad |= live[q / 2] && 2 * t + (q & 1) < cnt && !(fabsf(tot[q]) <= 3.402823466e38f);
  }
  if (__any_sync(0xffffffffu, bad)) {
    // The exact path: every (tile row, activation row) of the tile, one weight at a time.
    for (uint32_t m = 0; m < 16; ++m) {
      bool lv;
      const size_t row = qmma_tile_row<SWIGLU>(e, n0, N, m, lv);
      if (!lv) continue;  // warp-uniform
      for (uint32_t b = 0; b < cnt; ++b) {
        const float v = warp_sum(
            qgemv_row_exact<T, F>(x_row(b), qweight + row * KB, params + row * (INT4 ? 2 : 1) * PR, K, group, lane));
        const uint32_t at = g == (m & 7u) && t == b / 2 ? (m >= 8 ? 2 : 0) + (b & 1) : 4;
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q) tot[q] = q == at ? v : tot[q];  // no dynamic index: tot stays in registers
      }
    }
  }
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint32_t b = 2 * t + q;
    if (b >= cnt) continue;
    T* orow = out + static_cast<size_t>(r0 + b) * N;
    if constexpr (SWIGLU) {
      const float gv = tot[q];
      if (live[0]) orow[n0 + g] = from_float<T>(gv / (1.f + expf(-gv)) * tot[2 + q]);
    } else {
      if (live[0]) orow[n0 + g] = from_float<T>(tot[q]);
      if (live[1]) orow[n0 + g + 8] = from_float<T>(tot[2 + q]);
    }
  }
}

template <typename T, int F, bool MOE, bool SWIGLU>
__device__ __forceinline__ void qmma_impl(const T* __restrict__ x, const uint8_t* __restrict__ qweight,
                                          const typename QParamT<F>::type* __restrict__ params,
                                          const uint32_t* __restrict__ chunks,
                                          const uint32_t* __restrict__ row_token,
                                          const uint32_t* __restrict__ counts,
                                          const uint32_t* __restrict__ offsets, uint32_t E, T* __restrict__ out,
                                          uint32_t C, uint32_t N, uint32_t K, uint32_t group) {
  __shared__ float red[QM_WARPS - 1][4][32];  // warps 1.. park their partial sums here for warp 0
  constexpr bool NIB = F != QF_INT8;
  const uint32_t tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5, g = lane >> 2, t = lane & 3u;
  // Tile row m: feature n0 + m (n0 = 16 blockIdx.y); SwiGLU: rows g and g + 8 are feature n0 + g's gate and up
  // rows (n0 = 8 blockIdx.y), so the epilogue finds both in the same lane.
  const uint32_t n0 = blockIdx.y * (SWIGLU ? 8u : 16u);
  const QmmaGeom<F> geo(x, qweight, params, K, group);
  const bool vec = geo.vec;

  for (uint32_t c = blockIdx.x; c < C; c += gridDim.x) {
    uint32_t e, r0, cnt;
    if (!gemv_chunk<MOE>(c, chunks, counts, offsets, E, e, r0, cnt)) break;  // block-uniform
    const auto x_row = [&](uint32_t b) { return gemv_x_row<MOE>(x, row_token, r0 + b, K); };
    bool live[2];
    size_t rows[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[h] = qmma_tile_row<SWIGLU>(e, n0, N, g + 8u * h, live[h]);
    // Lanes of a row past the chunk's rows read its row 0 (their column is dropped).
    const T* xr = x_row(g < cnt ? g : 0u);
    float tot[4] = {0.f, 0.f, 0.f, 0.f};
    if (vec) {
      constexpr uint32_t IT = 32u * QM_STEPS;  // 128 weights per iteration, int4 and int8 alike
      const uint32_t* w4[2];
      const typename QmPar<F>::type* p4[2];
      const uint4* w8[2];
      geo.ptrs(qweight, params, rows, t, w4, p4, w8);
      for (uint32_t kb = warp * IT; kb < K; kb += QM_WARPS * IT) {
        if constexpr (NIB) {
          if (K - kb >= IT) qmma_iter_seg<T, F, false>(geo.seg, w4, p4, live, xr, kb, K, geo.gshift, t, tot);
          else qmma_iter_seg<T, F, true>(geo.seg, w4, p4, live, xr, kb, K, geo.gshift, t, tot);
        } else {
          if (K - kb >= IT) qmma8_iter<T, false>(w8, xr, kb, K, t, tot);
          else qmma8_iter<T, true>(w8, xr, kb, K, t, tot);
        }
      }
    }
    if (warp > 0) {
#pragma unroll
      for (int q = 0; q < 4; ++q) red[warp - 1][q][lane] = tot[q];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int q = 0; q < 4; ++q)
        for (uint32_t v = 0; v < QM_WARPS - 1; ++v) tot[q] += red[v][q][lane];
      qmma_tile_out<T, F, SWIGLU>(tot, !vec, rows, live, e, n0, N, cnt, x_row, qweight, params, K, group, out, r0);
    }
    __syncthreads();  // `red` is reused by the next chunk
  }
}

// Entries from sm_80 (mma.sync m16n8k16 with bf16 / f16).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define QMMA_DENSE_ENTRY(NAME, T, F)                                                                          \
  extern "C" __global__ void __launch_bounds__(QM_WARPS * 32, 2) NAME(QMM_DENSE_PARAMS(T, QParamT<F>::type)) { \
    qmma_impl<T, F, false, false>(QMM_DENSE_ARGS);                                                           \
  }
#define QMMA_MOE_ENTRY(NAME, T, F, SWIGLU)                                                                    \
  extern "C" __global__ void __launch_bounds__(QM_WARPS * 32, 2) NAME(QMM_MOE_PARAMS(T, QParamT<F>::type)) { \
    qmma_impl<T, F, true, SWIGLU>(QMM_MOE_ARGS);                                                             \
  }
QMMA_DENSE_ENTRY(qmma_dense_int4_bf16, __nv_bfloat16, QF_INT4)
QMMA_DENSE_ENTRY(qmma_dense_int4_f16, __half, QF_INT4)
QMMA_MOE_ENTRY(qmma_moe_int4_bf16, __nv_bfloat16, QF_INT4, false)
QMMA_MOE_ENTRY(qmma_moe_int4_f16, __half, QF_INT4, false)
QMMA_MOE_ENTRY(qmma_moe_swiglu_int4_bf16, __nv_bfloat16, QF_INT4, true)
QMMA_MOE_ENTRY(qmma_moe_swiglu_int4_f16, __half, QF_INT4, true)
QMMA_DENSE_ENTRY(qmma_dense_int8_bf16, __nv_bfloat16, QF_INT8)
QMMA_DENSE_ENTRY(qmma_dense_int8_f16, __half, QF_INT8)
QMMA_MOE_ENTRY(qmma_moe_int8_bf16, __nv_bfloat16, QF_INT8, false)
QMMA_MOE_ENTRY(qmma_moe_int8_f16, __half, QF_INT8, false)
QMMA_MOE_ENTRY(qmma_moe_swiglu_int8_bf16, __nv_bfloat16, QF_INT8, true)
QMMA_MOE_ENTRY(qmma_moe_swiglu_int8_f16, __half, QF_INT8, true)
QMMA_DENSE_ENTRY(qmma_dense_mxfp4_bf16, __nv_bfloat16, QF_MXFP4)
QMMA_DENSE_ENTRY(qmma_dense_mxfp4_f16, __half, QF_MXFP4)
QMMA_MOE_ENTRY(qmma_moe_mxfp4_bf16, __nv_bfloat16, QF_MXFP4, false)
QMMA_MOE_ENTRY(qmma_moe_mxfp4_f16, __half, QF_MXFP4, false)
QMMA_MOE_ENTRY(qmma_moe_swiglu_mxfp4_bf16, __nv_bfloat16, QF_MXFP4, true)
QMMA_MOE_ENTRY(qmma_moe_swiglu_mxfp4_f16, __half, QF_MXFP4, true)
#endif

// ---- prefill on tensor cores: qmma_gemm -----------------------------------------------------------------------
// qmma_gemm_{,swiglu_}{int4,int8,mxfp4}_{bf16,f16}: qmatmul_gemm's product (arguments, dispatch-driven row tiles and
// output below), or the SwiGLU of the GEMV's swiglu entries, on qmma's fragments, for many rows per expert
// (prefill, large batches). Where the qmma GEMV would dequantize every weight once per 8 activation rows and read
// every activation from L2 once per 16 weight rows, one block here is QM_WARPS = 8 warps on 128 weight rows (16
// per warp, the GEMV's tile; SwiGLU: 64 features, a warp's rows g and g + 8 the gate and up rows of one) by a
// row tile of up to QMG_ROWS = 32 activation rows of one expert:
//  - per 128 weights of K (a stage) the block stages the tile's activations (gathered through row_token, zero
//    past the tile's rows or K) in shared memory with 16-byte loads;
//  - each warp dequantizes its rows' 128 weights once into A fragments (qmma4_a / qmmx_a / qmma8_a) and runs each
//    fragment against the QMG_NT = 4 activation tiles of 8 rows (B fragments from shared memory, the GEMV's
//    positions; the row stride is padded so the 8 lanes of a 16-byte load phase hit 32 distinct banks);
//  - no split K: each warp walks all of K, so there is no reduction, and its epilogue is the GEMV's
//    (qmma_tile_out: INT8 scale, exact fallback, SwiGLU) once per activation tile.
// So each weight is dequantized once per 32 rows and each staged activation read from L2 once per 128 weight
// rows. sm_90 SASS of qmma_gemm_int4_bf16 (g128, a full stage): 167 instructions for 64 weights x 32 rows of a
// lane (32 LOP3, 32 HMMA, 32 FFMA, 25 SHF, 20 LDS, ~26 others), ~0.08 per weight and row where the GEMV spends
// ~0.28; INT8's stage is 167 too (64 HMMA). MXFP4's whole stage loop (staging included) is 659 instructions;
// INT4 g32's stage (its closest: one-step segments) is 342 plus the ~230 of staging and dispatch its loop
// shares. INT4 and MXFP4 take 186-196 registers (one block per SM: capped at 128 for two, INT4 spilled), INT8
// 116-118 (two).
// Launch: grid = (ceil(N / 128) (SwiGLU: ceil(N / 64)), ceil(R / 32) + min(E, R)), block = 256; the host takes it
// where the qmma GEMV applies and experts get more rows than one GEMV chunk (qexperts.rs, qmm_path).
#define QMG_ROWS 32
#define QMG_NT (QMG_ROWS / 8)

// The weights of a stage from kb of the warp's rows g (w[0]) and g + 8 (w[1]), zero past K: INT4's QM_STEPS
// words per row (the lane's word t of each 32-weight step, w already offset by t), INT8's two 16-byte loads per
// row (bytes kb + 64 q + 16 t).
__device__ __forceinline__ void qmmg_load4(const uint32_t* const (&w)[2], uint32_t kb, uint32_t K,
                                           uint32_t (&wq)[2][QM_STEPS]) {
#pragma unroll
  for (int j = 0; j < QM_STEPS; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) wq[h][j] = kb + 32u * j < K ? __ldg(w[h] + kb / 8 + 4 * j) : 0u;
}
__device__ __forceinline__ void qmmg_load8(const uint4* const (&w)[2], uint32_t kb, uint32_t K, uint32_t t,
                                           uint4 (&wq)[2][2]) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint32_t k0 = kb + 64u * q + 16u * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) wq[h][q] = k0 < K ? __ldg(w[h] + k0 / 16) : uint4{0u, 0u, 0u, 0u};
  }
}

// INT4, one stage (QM_STEPS steps of 32 weights from kb, the words wq of qmmg_load4) of a warp: qmma_iter's
// steps with each A fragment run against the QMG_NT staged activation tiles (xs: the stage, row stride XS; lane
// (g, t) reads row 8 s + g, the 8 activations at 32 j + 8 t, already paired by qmma4_pair), the tiles one at a
// time after all A fragments (one tile's P live, not four). S, the activation sums, come from the staging (ss:
// the sums of rows 2 p and 2 p + 1 over the segment from step j at float2 p QM_STEPS + j) instead of a ones-mma.
// Steps past K hold zero weights and activations; their segments get a zero scale.
template <typename T, int F, int SEG, uint32_t XS>
__device__ __forceinline__ void qmmg_iter4(const uint32_t (&wq)[2][QM_STEPS],
                                           const typename QmPar<F>::type* const (&p)[2],
                                           const bool (&live)[2], const T* xs, const float* ss, uint32_t kb,
                                           uint32_t K, uint32_t gshift, uint32_t g, uint32_t t,
                                           float (&tot)[QMG_NT][4]) {
  uint32_t a[QM_STEPS][2][4];
#pragma unroll
  for (int j = 0; j < QM_STEPS; ++j) qmma_nib_a<T, F>(wq[0][j], wq[1][j], a[j][0], a[j][1]);
  float2 sz[QM_STEPS / SEG][2];
#pragma unroll
  for (int u = 0; u < QM_STEPS / SEG; ++u) qmma4_params<F, true>(p, live, kb, SEG * u, K, gshift, sz[u]);
#pragma unroll
  for (int s = 0; s < QMG_NT; ++s) {
    float P[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < QM_STEPS; ++j) {
      qmma4_mma<T>(a[j][0], a[j][1], *reinterpret_cast<const uint4*>(xs + (8 * s + g) * XS + 32 * j + 8 * t), P);
      if (j % SEG == SEG - 1) {
        const float2 v = reinterpret_cast<const float2*>(ss)[(4 * s + t) * QM_STEPS + j + 1 - SEG];
        float S[4] = {v.x, v.y, 0.f, 0.f};
        qmma4_fold<T>(sz[j / SEG], P, S, tot[s]);
      }
    }
  }
}

// qmmg_iter4 for the runtime segment length seg (1, 2 or QM_STEPS steps).
template <typename T, int F, uint32_t XS>
__device__ __forceinline__ void qmmg_iter4_seg(uint32_t seg, const uint32_t (&wq)[2][QM_STEPS],
                                               const typename QmPar<F>::type* const (&p)[2], const bool (&live)[2],
                                               const T* xs,
                                               const float* ss, uint32_t kb, uint32_t K, uint32_t gshift,
                                               uint32_t g, uint32_t t, float (&tot)[QMG_NT][4]) {
  if (F == QF_MXFP4 || seg == 1) qmmg_iter4<T, F, 1, XS>(wq, p, live, xs, ss, kb, K, gshift, g, t, tot);
  else if (seg == 2) qmmg_iter4<T, F, 2, XS>(wq, p, live, xs, ss, kb, K, gshift, g, t, tot);
  else qmmg_iter4<T, F, QM_STEPS, XS>(wq, p, live, xs, ss, kb, K, gshift, g, t, tot);
}

// INT8, one stage (128 weights from kb, the loads wq of qmmg_load8) of a warp: qmma8_iter's words, each word's A
// planes run against the QMG_NT staged activation tiles (lane (g, t) reads row 8 s + g at 64 q + 16 t + 8 i,
// paired by qmma8_pair).
template <typename T, uint32_t XS>
__device__ __forceinline__ void qmmg_iter8(const uint4 (&wq)[2][2], const T* xs, uint32_t g, uint32_t t,
                                           float (&acc)[QMG_NT][4]) {
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint4 xv[QMG_NT];
#pragma unroll
      for (int s = 0; s < QMG_NT; ++s)
        xv[s] = *reinterpret_cast<const uint4*>(xs + (8 * s + g) * XS + 64 * q + 16 * t + 8 * i);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        uint32_t am[4], as[4];
        qmma8_a<T>(word_of(wq[0][q], 2 * i + jj), word_of(wq[1][q], 2 * i + jj), am, as);
#pragma unroll
        for (int s = 0; s < QMG_NT; ++s)
          qmma8_mma<T>(am, as, uint2{word_of(xv[s], 2 * jj), word_of(xv[s], 2 * jj + 1)}, acc[s]);
      }
    }
}

template <typename T, int F, bool SWIGLU>
__device__ __forceinline__ void qmma_gemm_impl(const T* __restrict__ x, const uint32_t* __restrict__ row_token,
                                               const uint32_t* __restrict__ counts,
                                               const uint32_t* __restrict__ offsets,
                                               const uint8_t* __restrict__ qweight,
                                               const typename QParamT<F>::type* __restrict__ params,
                                               T* __restrict__ out, uint32_t E, uint32_t N, uint32_t K,
                                               uint32_t group) {
  constexpr bool NIB = F != QF_INT8;  // INT4 and MXFP4 share the 4-bit path
  constexpr uint32_t IT = 32u * QM_STEPS;  // K per stage
  // Staged row stride: a 16-byte load phase (8 lanes: rows g, g + 1, 4 lanes t each) covers all 32 banks once:
  // int4's 4 lanes read 64 consecutive bytes of a row (next row 64 bytes on), int8's 16 of every 32 (16 on).
  constexpr uint32_t XS = IT + (NIB ? 32u : 8u);
  __shared__ __align__(16) T xs[QMG_ROWS][XS];
  __shared__ __align__(8) float ss[QMG_ROWS / 2][2 * QM_STEPS];  // 4-bit formats: segment sums, read as float2
  __shared__ uint32_t src[QMG_ROWS];
  uint32_t m0 = 0;
  const int ee = nth_row_tile(counts, E, blockIdx.y, QMG_ROWS, &m0);
  if (ee < 0) return;  // block-uniform, before any barrier
  const uint32_t e = static_cast<uint32_t>(ee), r0 = offsets[e] + m0;
  const uint32_t cnt = min(static_cast<uint32_t>(QMG_ROWS), counts[e] - m0);
  const uint32_t tid = threadIdx.x, warp = tid >> 5, g = (tid & 31u) >> 2, t = tid & 3u;
  constexpr uint32_t WF = SWIGLU ? 8u : 16u;  // features per warp
  const uint32_t n0 = (blockIdx.x * QM_WARPS + warp) * WF;
  const QmmaGeom<F> geo(x, qweight, params, K, group);
  const bool vec = geo.vec;
  const uint32_t gshift = geo.gshift, seg = geo.seg;
  if (tid < QMG_ROWS) src[tid] = tid < cnt ? (row_token != nullptr ? row_token[r0 + tid] : r0 + tid) : 0u;
  // The warp's rows g and g + 8 (found again for the epilogue: fewer registers live across the stages).
  bool live[2];
  size_t rows[2];
  const auto tile_rows = [&] {
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[h] = qmma_tile_row<SWIGLU>(e, n0, N, g + 8u * h, live[h]);
  };
  float tot[QMG_NT][4] = {};
  __syncthreads();
  if (vec) {
    tile_rows();
    const uint32_t* w4[2];
    const typename QmPar<F>::type* p4[2];
    const uint4* w8[2];
    geo.ptrs(qweight, params, rows, t, w4, p4, w8);
    // Each thread stages 16-byte pieces tid and tid + 256 of a stage (piece i: row i / 16, activations
    // 8 (i % 16) on), loaded one stage ahead, so the next stage's loads are in flight during this one's mma.
    constexpr uint32_t PIECES = QMG_ROWS * IT / 8 / (QM_WARPS * 32);
    const auto load = [&](uint32_t kb, uint4 (&v)[PIECES]) {
#pragma unroll
      for (uint32_t u = 0; u < PIECES; ++u) {
        const uint32_t i = tid + u * QM_WARPS * 32, r = i / (IT / 8), c = 8 * (i % (IT / 8));
        v[u] = uint4{0u, 0u, 0u, 0u};
        if (r < cnt && kb + c < K)
          v[u] = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(src[r]) * K + kb + c));
      }
    };
    // Stage kb + IT's activations and the warp's weights for it are loaded while stage kb computes.
    uint4 nx[PIECES];
    uint32_t wq4[2][QM_STEPS];
    uint4 wq8[2][2];
    const bool busy = n0 < N;  // warp-uniform: a warp past N stages activations, nothing more
    const auto load_w = [&](uint32_t kb) {
      if (!busy) return;
      if constexpr (NIB) qmmg_load4(w4, kb, K, wq4);
      else qmmg_load8(w8, kb, K, t, wq8);
    };
    load(0, nx);
    load_w(0);
    for (uint32_t kb = 0; kb < K; kb += IT) {
#pragma unroll
      for (uint32_t u = 0; u < PIECES; ++u) {
        const uint32_t i = tid + u * QM_WARPS * 32, r = i / (IT / 8), c = 8 * (i % (IT / 8));
        const uint4 v = nx[u];
        if constexpr (NIB) {
          *reinterpret_cast<uint4*>(&xs[r][c]) = qmma4_pair(v);
          // A (row, 32-weight step) is 4 consecutive lanes' pieces, a segment of seg steps 4 seg lanes: their
          // sum is S for the segment, kept at its first step.
          T a[8];
          memcpy(a, &v, sizeof(a));
          float sum = 0.f;
#pragma unroll
          for (int h = 0; h < 8; ++h) sum += to_float(a[h]);
          for (uint32_t d = 1; d < 4 * seg; d *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
          if (i % (4 * seg) == 0) ss[r / 2][2 * (c / 32) + (r & 1)] = sum;
        } else {
          const uint2 lo = qmma8_pair(v.x, v.y), hi = qmma8_pair(v.z, v.w);
          *reinterpret_cast<uint4*>(&xs[r][c]) = uint4{lo.x, lo.y, hi.x, hi.y};
        }
      }
      uint32_t cur4[2][QM_STEPS];
      uint4 cur8[2][2];
      if constexpr (NIB) memcpy(cur4, wq4, sizeof(cur4));
      else memcpy(cur8, wq8, sizeof(cur8));
      if (kb + IT < K) {
        load(kb + IT, nx);
        load_w(kb + IT);
      }
      __syncthreads();
      if (busy) {
        if constexpr (NIB)
          qmmg_iter4_seg<T, F, XS>(seg, cur4, p4, live, &xs[0][0], &ss[0][0], kb, K, gshift, g, t, tot);
        else qmmg_iter8<T, XS>(cur8, &xs[0][0], g, t, tot);
      }
      __syncthreads();  // xs is restaged
    }
  }
  if (n0 >= N) return;  // warp-uniform, after the last barrier
  tile_rows();
  const auto x_row = [&](uint32_t b) { return x + static_cast<size_t>(src[b]) * K; };
#pragma unroll
  for (int s = 0; s < QMG_NT; ++s) {
    const uint32_t base = 8u * s;
    if (base >= cnt) break;  // warp-uniform
    const auto x_tile_row = [&](uint32_t b) { return x_row(base + b); };
    qmma_tile_out<T, F, SWIGLU>(tot[s], !vec, rows, live, e, n0, N, min(cnt - base, 8u), x_tile_row, qweight, params,
                                K, group, out, r0 + base);
  }
}

// Entries from sm_80, with qmatmul_gemm's arguments.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define QMMA_GEMM_ENTRY(NAME, T, F, SWIGLU)                                                                   \
  extern "C" __global__ void __launch_bounds__(QM_WARPS * 32, F == QF_INT8 ? 2 : 1)                          \
      NAME(const T* __restrict__ x, const uint32_t* __restrict__ row_token, const uint32_t* __restrict__ counts, \
           const uint32_t* __restrict__ offsets, const uint8_t* __restrict__ qweight,                        \
           const QParamT<F>::type* __restrict__ params, T* __restrict__ out, uint32_t E, uint32_t N,           \
           uint32_t K,                                                                                        \
           uint32_t group) {                                                                                  \
    qmma_gemm_impl<T, F, SWIGLU>(x, row_token, counts, offsets, qweight, params, out, E, N, K, group);          \
  }
QMMA_GEMM_ENTRY(qmma_gemm_int4_bf16, __nv_bfloat16, QF_INT4, false)
QMMA_GEMM_ENTRY(qmma_gemm_int4_f16, __half, QF_INT4, false)
QMMA_GEMM_ENTRY(qmma_gemm_swiglu_int4_bf16, __nv_bfloat16, QF_INT4, true)
QMMA_GEMM_ENTRY(qmma_gemm_swiglu_int4_f16, __half, QF_INT4, true)
QMMA_GEMM_ENTRY(qmma_gemm_int8_bf16, __nv_bfloat16, QF_INT8, false)
QMMA_GEMM_ENTRY(qmma_gemm_int8_f16, __half, QF_INT8, false)
QMMA_GEMM_ENTRY(qmma_gemm_swiglu_int8_bf16, __nv_bfloat16, QF_INT8, true)
QMMA_GEMM_ENTRY(qmma_gemm_swiglu_int8_f16, __half, QF_INT8, true)
QMMA_GEMM_ENTRY(qmma_gemm_mxfp4_bf16, __nv_bfloat16, QF_MXFP4, false)
QMMA_GEMM_ENTRY(qmma_gemm_mxfp4_f16, __half, QF_MXFP4, false)
QMMA_GEMM_ENTRY(qmma_gemm_swiglu_mxfp4_bf16, __nv_bfloat16, QF_MXFP4, true)
QMMA_GEMM_ENTRY(qmma_gemm_swiglu_mxfp4_f16, __half, QF_MXFP4, true)
#endif

// ---- prefill: tiled GEMM -------------------------------------------------------------------------------------
// qmatmul_gemm_<fmt>_<dtype>: the same product (and the same dispatch-driven row tiles as the MoE mode) for many
// rows per expert, where the GEMV chunks above would re-read every weight row once per 8 activation rows. Each
// block computes a QG_TILE_M x QG_TILE_N output tile: per QG_TILE_K step it stages the (gathered) activation
// tile and the weight tile, dequantized to f32 exactly as the reference (w = s * q, s * (q - z), or the MXFP4
// LUT value times 2^(e - 128)), in shared
// memory, and each thread accumulates a 4 x 4 block in f32. No tensor cores yet (plain f32 FMA): a correct
// baseline that reads each packed weight once per 64 rows, not a fast one. Where the qmma GEMV applies (INT4, INT8
// or MXFP4 with bf16/f16 on sm_80+) the host takes qmma_gemm above instead (qexperts.rs, qmm_path).
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
