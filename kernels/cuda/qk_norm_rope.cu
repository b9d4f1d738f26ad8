// qk_norm_rope.cu: optional per-head RMSNorm fused with RoPE and the [B,T,H,D] -> [B,H,T,D] transpose.
//
// NOT YET RUN ON A GPU: written and compiled (nvcc -ptx) on a machine without one; `moe-run selftest --device
// cuda --filter qk_norm_rope` is its first real check.
//
// Legend: B batch, T tokens, H heads, D head dim (even, <= QKR_MAX_D), P table rows.
//   x        [B, T, H, D]  act dtype (f32/bf16/f16)
//   weight   [D]           act dtype, null when mode == 0
//   cos, sin [P, RH]       act dtype, token t at row pos + t; RH = rotary dims / 2 <= D / 2 (partial rotary:
//                          dims 2 RH..D pass through RoPE unchanged)
//   step     [rows, 4]     u32 or null: a decode step's table; when given, pos is row `step_row`'s first element,
//                          read as the kernel runs (one launch serves every step: a CUDA graph); rows past P
//                          are never read (pos + T > P writes nothing)
//   out      [B, H, T, D]
//   mode 0: rope(x); 1: rope(norm(x)); 2: norm(rope(x)), with
//   norm(r) = T(f32(T(r / sqrt(mean(r^2) + eps))) * f32(weight))
//   rope    : pairs (i, i + RH) or, interleaved, (2i, 2i+1), i < RH: a' = T(a*c - b*s), b' = T(b*c + a*s)
// the specification is kernels/src/rope.rs (qk_norm_rope_reference).
//
// One warp per (b, t, head) row, QKR_WARPS warps per block. The row is staged in f32 in the warp's slice of
// shared memory (each stage rounds through T exactly where the reference does); __syncwarp between stages
// because a lane reads elements other lanes wrote (RoPE pairs and the sum of squares).
#include "common.cuh"

#define QKR_WARPS 4
#define QKR_MAX_D 512

template <typename T>
__device__ __forceinline__ float round_t(float v) {
  return to_float(from_float<T>(v));
}

template <typename T>
__device__ __forceinline__ void warp_norm(float* r, const T* __restrict__ weight, uint32_t D, float eps,
                                          uint32_t lane) {
  float ss = 0.f;
  for (uint32_t i = lane; i < D; i += 32) ss = fmaf(r[i], r[i], ss);
  const float denom = sqrtf(warp_sum(ss) / static_cast<float>(D) + eps);
  for (uint32_t i = lane; i < D; i += 32) r[i] = round_t<T>(round_t<T>(r[i] / denom) * to_float(weight[i]));
  __syncwarp();
}

template <typename T>
__device__ void qk_norm_rope_impl(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ cos,
                                  const T* __restrict__ sin, T* __restrict__ out, uint32_t B, uint32_t Tn,
                                  uint32_t H, uint32_t D, uint32_t pos, uint32_t interleaved, uint32_t mode,
                                  float eps, const uint32_t* __restrict__ step, uint32_t step_row, uint32_t P,
                                  uint32_t RH) {
  __shared__ float stage[QKR_WARPS][QKR_MAX_D];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t row = static_cast<size_t>(blockIdx.x) * QKR_WARPS + warp;  // (b * T + t) * H + h
  if (row >= static_cast<size_t>(B) * Tn * H) return;  // whole warp leaves together
  if (step != nullptr) pos = step[4 * step_row];
  if (static_cast<size_t>(pos) + Tn > P) return;  // past the tables (the host checks this before it writes step)
  const uint32_t h = row % H;
  const size_t bt = row / H;
  const uint32_t t = bt % Tn;
  const size_t b = bt / Tn;
  float* r = stage[warp];
  const T* src = x + row * D;
  for (uint32_t i = lane; i < D; i += 32) r[i] = to_float(src[i]);
  __syncwarp();
  if (mode == 1) warp_norm<T>(r, weight, D, eps, lane);
  const T* c = cos + static_cast<size_t>(pos + t) * RH;
  const T* s = sin + static_cast<size_t>(pos + t) * RH;
  for (uint32_t i = lane; i < RH; i += 32) {
    const uint32_t ia = interleaved ? 2 * i : i;
    const uint32_t ib = interleaved ? 2 * i + 1 : i + RH;
    const float cf = to_float(c[i]), sf = to_float(s[i]);
    const float a = r[ia], bb = r[ib];
    r[ia] = round_t<T>(a * cf - bb * sf);
    r[ib] = round_t<T>(bb * cf + a * sf);
  }
  __syncwarp();
  if (mode == 2) warp_norm<T>(r, weight, D, eps, lane);
  T* dst = out + ((b * H + h) * Tn + t) * D;
  for (uint32_t i = lane; i < D; i += 32) dst[i] = from_float<T>(r[i]);
}

#define QKR_ENTRY(SUFFIX, T)                                                                                   \
  extern "C" __global__ void __launch_bounds__(QKR_WARPS * 32)                                                 \
      qk_norm_rope_##SUFFIX(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ cos,   \
                            const T* __restrict__ sin, T* __restrict__ out, uint32_t B, uint32_t Tn,          \
                            uint32_t H, uint32_t D, uint32_t pos, uint32_t interleaved, uint32_t mode,        \
                            float eps, const uint32_t* __restrict__ step, uint32_t step_row, uint32_t P,       \
                            uint32_t RH) {                                                                     \
    qk_norm_rope_impl<T>(x, weight, cos, sin, out, B, Tn, H, D, pos, interleaved, mode, eps, step, step_row, P,  \
                         RH);                                                                                  \
  }

QKR_ENTRY(f32, float)
QKR_ENTRY(bf16, __nv_bfloat16)
QKR_ENTRY(f16, __half)
