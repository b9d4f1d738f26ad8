// moe_route.cu: MoE stage 1, "route" - router logits -> top-k expert ids (best first) + combine weights.
//
// NOT YET RUN ON A GPU: written and compiled (nvcc -ptx) on a machine without one; `moe-run selftest --device
// cuda --filter route` is its first real check.
//
// Legend: N tokens, E experts (<= 256), K = top-k (<= 8), G = n_group (<= 32), KG = topk_group.
//   logits  [N, E]  act dtype (f32/bf16/f16), scored in f32
//   bias    [E]     f32 selection-only correction bias (kind 2 only; may be null otherwise)
//   ids     [N, K]  u32, best first, ties to the lower expert index
//   weights [N, K]  f32
//
// Kinds (the same math as engine/src/model/moe/route.rs and kernels/src/route.rs, the specification):
//   0 softmax:            p = softmax(x); ids = top-k(p); w = p / norm, norm = 1 | sum p | (sum p^q)^(1/q)
//   1 softmax group-lim.: p = softmax(x); group score = max p in group; keep KG groups, others' p -> 0 (select
//                         only); ids = top-k; w = p * scaling
//   2 sigmoid + bias:     s = sigmoid(x), c = s + bias; group score = sum of the group's top-2 c; dropped groups'
//                         c -> -inf; ids = top-k(c); w = s / (sum s + 1e-20 if renorm else 1) * scaling
//
// Why it is written this way:
//  - One warp per token: E <= 256 is 8 values per lane, every reduction is a warp shuffle, no block barriers.
//    The token's probabilities and selection scores live in a per-warp shared-memory strip (2 x 256 f32) so
//    the group steps can index them freely (a register array indexed at run time would spill).
//  - Top-k is K rounds of warp argmax; a lane remembers which of its (up to 8) experts are taken in a bitmask.
//    Ties go to the lower expert index everywhere (the reference sorts with total_cmp then index). NaN logits
//    are not supported (the reference would rank NaN first; this kernel never picks a NaN over a number).
//  - The final weights are formed by lane 0 in the reference's order (sequential sums over the chosen ids, then
//    value / norm * scale), so they match the CPU to the ulp given the same probabilities; the softmax sum is a
//    warp tree (not the reference's sequential sum), the only source of rounding differences besides expf.
//
// Launch: block = 32 * WARPS threads, grid = ceil(N / WARPS); warp w of block b handles token b * WARPS + w.
#include "common.cuh"

#define ROUTE_WARPS 4
#define ROUTE_MAX_E 256
#define ROUTE_MAX_K 8
#define ROUTE_NONE 0xffffffffu

// Warp argmax of (v, i) pairs; i == ROUTE_NONE means "no candidate". Ties go to the lower index.
__device__ __forceinline__ void warp_argmax(float& v, uint32_t& i) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
    const uint32_t oi = __shfl_xor_sync(0xffffffffu, i, offset);
    if (oi != ROUTE_NONE && (i == ROUTE_NONE || ov > v || (ov == v && oi < i))) {
      v = ov;
      i = oi;
    }
  }
}

template <typename T>
__device__ void moe_route_impl(const T* __restrict__ logits, const float* __restrict__ bias,
                               uint32_t* __restrict__ ids, float* __restrict__ weights, uint32_t N, uint32_t E,
                               uint32_t K, uint32_t kind, uint32_t n_group, uint32_t topk_group, uint32_t norm_mode,
                               float norm_p, float scaling) {
  __shared__ float s_val[ROUTE_WARPS][ROUTE_MAX_E];
  __shared__ float s_sel[ROUTE_WARPS][ROUTE_MAX_E];
  const uint32_t warp = threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  const size_t n = static_cast<size_t>(blockIdx.x) * ROUTE_WARPS + warp;
  if (n >= N) return;  // whole warps exit together: the shuffles below always see 32 lanes
  float* val = s_val[warp];
  float* sel = s_sel[warp];
  const T* row = logits + n * E;

  // 1. Scores: val = the values the weights come from, sel = the values the top-k is taken over.
  if (kind == 2) {
    for (uint32_t e = lane; e < E; e += 32) {
      const float s = 1.f / (1.f + expf(-to_float(row[e])));
      val[e] = s;
      sel[e] = s + bias[e];
    }
  } else {
    float mx = -INFINITY;
    for (uint32_t e = lane; e < E; e += 32) mx = fmaxf(mx, to_float(row[e]));
    mx = warp_max(mx);
    float sum = 0.f;
    for (uint32_t e = lane; e < E; e += 32) {
      const float p = expf(to_float(row[e]) - mx);
      val[e] = p;
      sum += p;
    }
    sum = warp_sum(sum);
    for (uint32_t e = lane; e < E; e += 32) {
      const float p = val[e] / sum;
      val[e] = p;
      sel[e] = p;
    }
  }
  __syncwarp();

  // 2. Group limit: lane g scores group g, then KG rounds of warp argmax keep the best groups.
  if (kind != 0 && n_group > 1) {
    const uint32_t size = E / n_group;
    float gscore = -INFINITY;
    uint32_t gidx = ROUTE_NONE;
    if (lane < n_group) {
      const float* g = sel + lane * size;
      if (kind == 1) {
        gscore = -3.402823466e38f;  // f32::MIN, the reference's fold start
        for (uint32_t i = 0; i < size; ++i) gscore = fmaxf(gscore, g[i]);
      } else {
        // Sum of the two best (ties to the lower index; the sum is the same either way).
        float b1 = g[0], b2 = -INFINITY;
        uint32_t i1 = 0;
        for (uint32_t i = 1; i < size; ++i)
          if (g[i] > b1) { b1 = g[i]; i1 = i; }
        bool have2 = false;
        for (uint32_t i = 0; i < size; ++i) {
          if (i == i1) continue;
          if (!have2 || g[i] > b2) { b2 = g[i]; have2 = true; }
        }
        gscore = have2 ? b1 + b2 : b1;
      }
      gidx = lane;
    }
    uint32_t keep = 0;
    __syncwarp();  // every lane has read sel for the group scores before any lane overwrites it below
    for (uint32_t r = 0; r < topk_group; ++r) {
      float v = gscore;
      uint32_t i = gidx;
      warp_argmax(v, i);
      if (i != ROUTE_NONE) keep |= 1u << i;
      if (lane == i) gidx = ROUTE_NONE;  // taken
    }
    const float fill = kind == 1 ? 0.f : -INFINITY;
    for (uint32_t e = lane; e < E; e += 32)
      if (!((keep >> (e / size)) & 1u)) sel[e] = fill;
    __syncwarp();
  }

  // 3. Top-k of sel: K rounds of warp argmax; lane l owns experts l, l + 32, ... (bit j of `taken`).
  uint32_t taken = 0;
  uint32_t chosen[ROUTE_MAX_K];
#pragma unroll
  for (uint32_t r = 0; r < ROUTE_MAX_K; ++r) {
    if (r >= K) break;
    float v = -INFINITY;
    uint32_t i = ROUTE_NONE;
#pragma unroll
    for (uint32_t j = 0; j < ROUTE_MAX_E / 32; ++j) {
      const uint32_t e = lane + 32 * j;
      if (e < E && !((taken >> j) & 1u)) {
        const float s = sel[e];
        if (i == ROUTE_NONE || s > v) {  // e grows with j: strict > keeps the lower index on ties
          v = s;
          i = e;
        }
      }
    }
    warp_argmax(v, i);
    if (i != ROUTE_NONE && i % 32 == lane) taken |= 1u << (i / 32);
    chosen[r] = i;
  }

  // 4. Weights, by lane 0 in the reference's order.
  if (lane == 0) {
    float norm = 1.f;
    if (kind == 0 && norm_mode == 1) {
      norm = 0.f;
#pragma unroll
      for (uint32_t r = 0; r < ROUTE_MAX_K; ++r)
        if (r < K) norm += val[chosen[r]];
    } else if (kind == 0 && norm_mode == 2) {
      float s = 0.f;
#pragma unroll
      for (uint32_t r = 0; r < ROUTE_MAX_K; ++r)
        if (r < K) s += powf(val[chosen[r]], norm_p);
      norm = powf(s, 1.f / norm_p);
    } else if (kind == 2 && norm_mode == 1) {
      norm = 0.f;
#pragma unroll
      for (uint32_t r = 0; r < ROUTE_MAX_K; ++r)
        if (r < K) norm += val[chosen[r]];
      norm += 1e-20f;
    }
    const float scale = kind == 0 ? 1.f : scaling;
#pragma unroll
    for (uint32_t r = 0; r < ROUTE_MAX_K; ++r) {
      if (r < K) {
        ids[n * K + r] = chosen[r];
        weights[n * K + r] = __fmul_rn(__fdiv_rn(val[chosen[r]], norm), scale);
      }
    }
  }
}

#define MOE_ROUTE_ENTRY(NAME, T)                                                                                 \
  extern "C" __global__ void __launch_bounds__(32 * ROUTE_WARPS)                                                 \
      NAME(const T* __restrict__ logits, const float* __restrict__ bias, uint32_t* __restrict__ ids,             \
           float* __restrict__ weights, uint32_t N, uint32_t E, uint32_t K, uint32_t kind, uint32_t n_group,     \
           uint32_t topk_group, uint32_t norm_mode, float norm_p, float scaling) {                               \
    moe_route_impl<T>(logits, bias, ids, weights, N, E, K, kind, n_group, topk_group, norm_mode, norm_p,         \
                      scaling);                                                                                  \
  }

MOE_ROUTE_ENTRY(moe_route_f32, float)
MOE_ROUTE_ENTRY(moe_route_bf16, __nv_bfloat16)
MOE_ROUTE_ENTRY(moe_route_f16, __half)
