// decode_attention.cu: one decode step of grouped-query attention over a KV cache, flash-decoding style.
//
// NOT YET RUN ON A GPU: written and compiled (nvcc -ptx) on a machine without one; `moe-run selftest --device
// cuda --filter decode_attention` is its first real check.
//
// Legend: B batch, H query heads, KV kv heads (g = H / KV), CAP cache rows, D head dim (<= DA_MAX_D).
//   q        [B, H, D]          act dtype (the [B, H, 1, D] tensor)
//   k, v     [B, KV, CAP, D]    act dtype; only rows start..len are read
//   part_m   [B, H, chunks]     f32: max score of the chunk
//   part_s   [B, H, chunks]     f32: sum of exp(score - part_m)
//   part_o   [B, H, chunks, D]  f32: sum of exp(score - part_m) * v  (unnormalised)
//   sinks    [H]                f32 or null: one more logit per head in the softmax's denominator (gpt-oss)
//   out      [B, H, D]          act dtype = T(sum_c e_c part_o / (sum_c e_c part_s + exp(sink - max))),
//                               e_c = exp(part_m_c - max), max over the chunks' maxima and the sink
//   step     [rows, 4]          u32 or null: a decode step's table (position, first key, keys, cache slot per
//                               row); when given, both kernels read start and len from row `row` as they run,
//                               the grid is sized for at most `chunks` chunks, the blocks past the step's keys
//                               leave at once and the reduce reads only the chunks that ran, so one launch
//                               serves every step up to that bound (a CUDA graph per bound)
// the specification is kernels/src/attention.rs (decode_attention_reference).
//
// Chunk kernel: grid (chunks, H, B), DA_THREADS threads; chunk c covers keys start + c*DA_CHUNK .. (clipped to
// len). q is staged in f32 in shared memory; each warp takes keys warp, warp + 4, ... and computes the dot
// product across its lanes (coalesced over D), the scores go to shared memory, then a block max / exp / sum,
// then each thread owns output dims d = tid, tid + DA_THREADS, ... and sums p_j * v[j, d] over the chunk
// (coalesced over d for each key). Every head reads its kv head's rows itself (g-fold re-read of K/V, served
// mostly by L2; folding the g heads of a group into one block is the obvious next step).
// Reduce kernel: grid (H, B), one block per head rescales and adds the chunk partials.
#include "common.cuh"

#define DA_THREADS 128
#define DA_WARPS (DA_THREADS / 32)
#define DA_CHUNK 256
#define DA_MAX_D 512

__device__ __forceinline__ float da_block_reduce(float v, bool is_max, float* scratch) {
  v = is_max ? warp_max(v) : warp_sum(v);
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < DA_WARPS; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

// With a step table: start and len of row `row`, len clipped to the cache and start to len (chunk and reduce
// kernels derive the same chunk count from them).
__device__ __forceinline__ void da_step_range(const uint32_t* __restrict__ step, uint32_t row, uint32_t CAP,
                                              uint32_t& start, uint32_t& len) {
  if (step == nullptr) return;
  len = min(step[4 * row + 2], CAP);
  start = min(step[4 * row + 1], len);
}

template <typename T>
__device__ void decode_attention_chunk_impl(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, float* __restrict__ part_m,
                                            float* __restrict__ part_s, float* __restrict__ part_o, uint32_t H,
                                            uint32_t KV, uint32_t CAP, uint32_t D, uint32_t start, uint32_t len,
                                            uint32_t chunks, float scale, const uint32_t* __restrict__ step,
                                            uint32_t row) {
  __shared__ float q_s[DA_MAX_D];
  __shared__ float p_s[DA_CHUNK];
  __shared__ float scratch[DA_WARPS];
  const uint32_t c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t g = H / KV;
  const size_t bh = static_cast<size_t>(b) * H + h;
  da_step_range(step, row, CAP, start, len);
  if (start + c * DA_CHUNK >= len) return;  // past the step's keys: the reduce skips it (the block leaves together)
  const T* qr = q + bh * D;
  for (uint32_t d = threadIdx.x; d < D; d += DA_THREADS) q_s[d] = to_float(qr[d]);
  __syncthreads();
  const uint32_t j0 = start + c * DA_CHUNK;
  const uint32_t n = min(static_cast<uint32_t>(DA_CHUNK), len - j0);
  const size_t base = (static_cast<size_t>(b) * KV + h / g) * CAP + j0;  // row of key j0
  for (uint32_t j = warp; j < n; j += DA_WARPS) {
    const T* kr = k + (base + j) * D;
    float dot = 0.f;
    for (uint32_t d = lane; d < D; d += 32) dot = fmaf(q_s[d], to_float(kr[d]), dot);
    dot = warp_sum(dot);
    if (lane == 0) p_s[j] = scale * dot;
  }
  __syncthreads();
  float m = -INFINITY;
  for (uint32_t j = threadIdx.x; j < n; j += DA_THREADS) m = fmaxf(m, p_s[j]);
  m = da_block_reduce(m, true, scratch);
  float s = 0.f;
  for (uint32_t j = threadIdx.x; j < n; j += DA_THREADS) {
    const float p = expf(p_s[j] - m);
    p_s[j] = p;
    s += p;
  }
  s = da_block_reduce(s, false, scratch);  // its barriers also publish p_s
  const size_t pc = bh * chunks + c;
  if (threadIdx.x == 0) {
    part_m[pc] = m;
    part_s[pc] = s;
  }
  for (uint32_t d = threadIdx.x; d < D; d += DA_THREADS) {
    float acc = 0.f;
    for (uint32_t j = 0; j < n; ++j) acc = fmaf(p_s[j], to_float(v[(base + j) * D + d]), acc);
    part_o[pc * D + d] = acc;
  }
}

template <typename T>
__device__ void decode_attention_reduce_impl(const float* __restrict__ part_m, const float* __restrict__ part_s,
                                             const float* __restrict__ part_o, const float* __restrict__ sinks,
                                             T* __restrict__ out, uint32_t H, uint32_t D, uint32_t chunks,
                                             const uint32_t* __restrict__ step, uint32_t row, uint32_t CAP) {
  const size_t bh = static_cast<size_t>(blockIdx.y) * H + blockIdx.x;
  const float* pm = part_m + bh * chunks;
  const float* ps = part_s + bh * chunks;
  const float* po = part_o + bh * chunks * D;
  if (step != nullptr) {  // the partials above are laid out by the grid's chunks; fewer of them ran
    uint32_t start = 0, len = 0;
    da_step_range(step, row, CAP, start, len);
    chunks = min(chunks, (len - start + DA_CHUNK - 1) / DA_CHUNK);
  }
  const float sink = sinks != nullptr ? sinks[blockIdx.x] : -INFINITY;
  float m = sink;
  for (uint32_t c = 0; c < chunks; ++c) m = fmaxf(m, pm[c]);
  float total = sinks != nullptr ? expf(sink - m) : 0.f;
  for (uint32_t c = 0; c < chunks; ++c) total += ps[c] * expf(pm[c] - m);
  for (uint32_t d = threadIdx.x; d < D; d += DA_THREADS) {
    float acc = 0.f;
    for (uint32_t c = 0; c < chunks; ++c) acc = fmaf(po[static_cast<size_t>(c) * D + d], expf(pm[c] - m), acc);
    out[bh * D + d] = from_float<T>(acc / total);
  }
}

#define DA_ENTRY(SUFFIX, T)                                                                                      \
  extern "C" __global__ void __launch_bounds__(DA_THREADS) decode_attention_chunk_##SUFFIX(                      \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, float* __restrict__ part_m,     \
      float* __restrict__ part_s, float* __restrict__ part_o, uint32_t H, uint32_t KV, uint32_t CAP, uint32_t D, \
      uint32_t start, uint32_t len, uint32_t chunks, float scale, const uint32_t* __restrict__ step, uint32_t row) { \
    decode_attention_chunk_impl<T>(q, k, v, part_m, part_s, part_o, H, KV, CAP, D, start, len, chunks, scale, step, \
                                   row);                                                                         \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(DA_THREADS) decode_attention_reduce_##SUFFIX(                     \
      const float* __restrict__ part_m, const float* __restrict__ part_s, const float* __restrict__ part_o,      \
      const float* __restrict__ sinks, T* __restrict__ out, uint32_t H, uint32_t D, uint32_t chunks,             \
      const uint32_t* __restrict__ step, uint32_t row, uint32_t CAP) {                                           \
    decode_attention_reduce_impl<T>(part_m, part_s, part_o, sinks, out, H, D, chunks, step, row, CAP);           \
  }

DA_ENTRY(f32, float)
DA_ENTRY(bf16, __nv_bfloat16)
DA_ENTRY(f16, __half)

// kv_store: a decode step's new keys and values into the cache, in place.
//   k        [B, KV, 1, DK], v [B, KV, 1, DV]   act dtype (MLA: the latent and the rope key, DK != DV)
//   k_cache  [B, KV, CAP, DK], v_cache [B, KV, CAP, DV]: row `slot` (or, with `step`, step[4 * row + 3]) of every
//                             (b, kv head) is overwritten; a slot >= CAP writes nothing
// Grid (KV, B), DA_THREADS threads over the dims. The specification is kernels/src/attention.rs (kv_store).
template <typename T>
__device__ void kv_store_impl(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                              T* __restrict__ v_cache, uint32_t KV, uint32_t CAP, uint32_t DK, uint32_t DV,
                              uint32_t slot, const uint32_t* __restrict__ step, uint32_t row) {
  const uint32_t s = step != nullptr ? step[4 * row + 3] : slot;
  if (s >= CAP) return;
  const size_t head = static_cast<size_t>(blockIdx.y) * KV + blockIdx.x;
  const T* kr = k + head * DK;
  const T* vr = v + head * DV;
  T* kd = k_cache + (head * CAP + s) * DK;
  T* vd = v_cache + (head * CAP + s) * DV;
  for (uint32_t d = threadIdx.x; d < DK; d += DA_THREADS) kd[d] = kr[d];
  for (uint32_t d = threadIdx.x; d < DV; d += DA_THREADS) vd[d] = vr[d];
}

#define KV_STORE_ENTRY(SUFFIX, T)                                                                               \
  extern "C" __global__ void __launch_bounds__(DA_THREADS)                                                      \
      kv_store_##SUFFIX(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,              \
                        T* __restrict__ v_cache, uint32_t KV, uint32_t CAP, uint32_t DK, uint32_t DV,           \
                        uint32_t slot, const uint32_t* __restrict__ step, uint32_t row) {                       \
    kv_store_impl<T>(k, v, k_cache, v_cache, KV, CAP, DK, DV, slot, step, row);                                 \
  }

KV_STORE_ENTRY(f32, float)
KV_STORE_ENTRY(bf16, __nv_bfloat16)
KV_STORE_ENTRY(f16, __half)
