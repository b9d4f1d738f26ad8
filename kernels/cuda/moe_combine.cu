// moe_combine.cu: MoE stage 4, "combine" - the weighted gather-sum of expert outputs back into token order.
//
// Legend: T tokens, A top-k choices (slots) per token, H hidden,
//         R rows of expert_out (normally T*A; more if dispatch pads each expert's group).
//   expert_out [R, H]   act dtype, rows in expert-sorted slot order
//   slot_of    [T*A]    u32: row of expert_out holding the output of token t's j-th choice, at t*A + j
//   weights    [T, A]   f32 routing weights
//   out        [T, H]   act dtype: out[t, :] = sum_j weights[t, j] * expert_out[slot_of[t*A + j], :]
//   add        [T, H]   act dtype or null: added to the f32 sum before its one rounding (the shared experts'
//                       output, so their separate add kernel and its rounding are gone)
//
// Why it is written this way:
//  - Gather, not scatter: each out element is owned by one thread, so there are no atomics and the result is
//    deterministic. The sum runs j = 0..A-1 in f32 with separately rounded multiply and add (__fmul_rn /
//    __fadd_rn, never a fused FMA), exactly as the Rust reference computes it, so f32 results match the CPU
//    bit for bit and bf16/f16 differ only if the final rounding does.
//  - A choice whose weight is exactly 0 is skipped and its row never read: padding rows or rows of dropped
//    tokens may hold garbage (even NaN) without leaking into the output.
//  - A slot >= R contributes nothing instead of faulting. The CPU reference reports it as an error; checking
//    here would need a device-to-host sync.
//  - The kernel is memory bound (reads A*H, writes H elements per token), so it uses 128-bit loads/stores when
//    H is a multiple of 16/sizeof(T) and both bases are 16-byte aligned (uniform across the grid), else scalar.
//
// Launch (one launch for all tokens): grid = (T, Y), block = (B). blockIdx.x is the token; blockIdx.y and a
// stride loop cover the row, so any B and Y >= 1 are correct, and decode (T = 1) still spans Y blocks.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void moe_combine_impl(const T* __restrict__ expert_out,
                                                 const uint32_t* __restrict__ slot_of,
                                                 const float* __restrict__ weights,
                                                 const T* __restrict__ add, T* __restrict__ out, uint32_t A,
                                                 uint32_t H, uint32_t R) {
  const size_t t = blockIdx.x;
  const uint32_t* slots = slot_of + t * A;
  const float* w = weights + t * A;
  T* out_row = out + t * H;
  const uint32_t first = blockIdx.y * blockDim.x + threadIdx.x;
  const uint32_t stride = gridDim.y * blockDim.x;

  constexpr int N = Vec16<T>::N;
  const T* add_row = add != nullptr ? add + t * H : nullptr;
  if (H % N == 0 && is_aligned16(expert_out) && is_aligned16(out) && (add == nullptr || is_aligned16(add))) {
    const uint32_t nvec = H / N;
    for (uint32_t v = first; v < nvec; v += stride) {
      float acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0.f;
      for (uint32_t j = 0; j < A; ++j) {
        const float wj = __ldg(w + j);
        const uint32_t s = __ldg(slots + j);
        if (wj == 0.f || s >= R) continue;
        const Vec16<T> x = load_vec16_ro(expert_out + static_cast<size_t>(s) * H + static_cast<size_t>(v) * N);
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(wj, to_float(x.v[i])));
      }
      if (add_row != nullptr) {
        const Vec16<T> s = load_vec16_ro(add_row + static_cast<size_t>(v) * N);
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = __fadd_rn(acc[i], to_float(s.v[i]));
      }
      Vec16<T> y;
#pragma unroll
      for (int i = 0; i < N; ++i) y.v[i] = from_float<T>(acc[i]);
      store_vec16(out_row + static_cast<size_t>(v) * N, y);
    }
  } else {
    for (uint32_t h = first; h < H; h += stride) {
      float acc = 0.f;
      for (uint32_t j = 0; j < A; ++j) {
        const float wj = __ldg(w + j);
        const uint32_t s = __ldg(slots + j);
        if (wj == 0.f || s >= R) continue;
        acc = __fadd_rn(acc, __fmul_rn(wj, to_float(expert_out[static_cast<size_t>(s) * H + h])));
      }
      if (add_row != nullptr) acc = __fadd_rn(acc, to_float(add_row[h]));
      out_row[h] = from_float<T>(acc);
    }
  }
}

#define MOE_COMBINE_ENTRY(NAME, T)                                                                              \
  extern "C" __global__ void NAME(const T* __restrict__ expert_out, const uint32_t* __restrict__ slot_of,       \
                                  const float* __restrict__ weights, const T* __restrict__ add,                 \
                                  T* __restrict__ out, uint32_t A, uint32_t H, uint32_t R) {                    \
    moe_combine_impl<T>(expert_out, slot_of, weights, add, out, A, H, R);                                       \
  }

MOE_COMBINE_ENTRY(moe_combine_f32, float)
MOE_COMBINE_ENTRY(moe_combine_bf16, __nv_bfloat16)
MOE_COMBINE_ENTRY(moe_combine_f16, __half)
