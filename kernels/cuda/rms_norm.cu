// rms_norm.cu: RMSNorm, optionally fused with the residual add in front of it.
//
// NOT YET RUN ON A GPU: written and compiled (nvcc -ptx) on a machine without one; `moe-run selftest --device
// cuda --filter rms_norm` is its first real check.
//
// Legend: T tokens, H hidden.
//   x        [T, H]  act dtype (f32/bf16/f16)
//   residual [T, H]  act dtype, optional
//   weight   [H]     act dtype
//   h        = residual ? T(x + residual) : x           (written to h_out when fused: the next residual)
//   out      = T(f32(T(h / sqrt(mean(h^2) + eps))) * f32(weight))
// the same roundings as engine/src/model/norm.rs (statistics in f32, normalised value cast to the activation
// dtype, then multiplied by the weight in that dtype) and kernels/src/norm.rs, the specification.
//
// One block of 256 threads per token row; the sum of squares is a block reduction (warp shuffles, then one
// warp over the 8 partials). The fused variant first writes h, then re-reads it (the block reads back only what
// its own threads wrote, after a barrier), so memory traffic is x + residual + 2 writes + 1 re-read per row.
#include "common.cuh"

#define NORM_THREADS 256

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[NORM_THREADS / 32];
  __shared__ float total;
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float p = threadIdx.x < NORM_THREADS / 32 ? partial[threadIdx.x] : 0.f;
    p = warp_sum(p);
    if (threadIdx.x == 0) total = p;
  }
  __syncthreads();
  return total;
}

template <typename T>
__device__ void rms_norm_impl(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                              T* __restrict__ h_out, T* __restrict__ out, uint32_t H, float eps) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * H;
  const T* rr = residual != nullptr ? residual + row * H : nullptr;
  float ss = 0.f;
  if (rr != nullptr) {
    T* hr = h_out + row * H;
    for (uint32_t i = threadIdx.x; i < H; i += NORM_THREADS) {
      const T h = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
      hr[i] = h;
      const float hf = to_float(h);
      ss = fmaf(hf, hf, ss);
    }
  } else {
    for (uint32_t i = threadIdx.x; i < H; i += NORM_THREADS) {
      const float hf = to_float(xr[i]);
      ss = fmaf(hf, hf, ss);
    }
  }
  const float denom = sqrtf(block_sum(ss) / static_cast<float>(H) + eps);
  T* o = out + row * H;
  for (uint32_t i = threadIdx.x; i < H; i += NORM_THREADS) {
    // h again from the read-only inputs (the same rounding), not read back from h_out: the
    // __restrict__ pointers let nvcc read h_out through the non-coherent cache.
    const float hf = rr != nullptr ? to_float(from_float<T>(to_float(xr[i]) + to_float(rr[i]))) : to_float(xr[i]);
    const T n = from_float<T>(hf / denom);
    o[i] = from_float<T>(to_float(n) * to_float(weight[i]));
  }
}

#define RMS_NORM_ENTRY(SUFFIX, T)                                                                                 \
  extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                      \
      rms_norm_##SUFFIX(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,    \
                        T* __restrict__ h_out, T* __restrict__ out, uint32_t H, float eps) {                      \
    rms_norm_impl<T>(x, residual, weight, h_out, out, H, eps);                                                    \
  }

RMS_NORM_ENTRY(f32, float)
RMS_NORM_ENTRY(bf16, __nv_bfloat16)
RMS_NORM_ENTRY(f16, __half)
