// moe_dispatch.cu: MoE stage 2, "dispatch" - group the S = N*K (token, choice) slots by expert.
//
// NOT YET RUN ON A GPU: written and compiled (nvcc -ptx) on a machine without one; `moe-run selftest --device
// cuda --filter dispatch` is its first real check.
//
// Legend: N tokens, K top-k, S = N*K slots, E experts, B = block (padding) size, R = S + E*(B-1) rows.
//   ids       [S]     u32 expert of slot s = n*K + j (token n's j-th choice)
//   counts    [E]     u32 slots routed to each expert
//   offsets   [E+1]   u32 expert e owns rows offsets[e] .. offsets[e] + counts[e]; offsets[e+1] - offsets[e] is
//                     counts[e] rounded up to a multiple of B (B = 1: no padding)
//   row_token [R]     u32 token of each row; padding rows (and every row >= offsets[E]) hold 0xffffffff
//   slot_row  [S]     u32 row of each slot
// R is the worst case of the padded total, so no output size depends on the data (no host sync).
//
// Unlike the CPU reference (a stable counting sort), the order of one expert's rows here is whatever order the
// shared-memory atomics hand out ranks in. Everything downstream (experts, combine through slot_row) is
// invariant to that order, and the self-test compares counts and offsets exactly and checks that slot_row /
// row_token form a valid dispatch (each slot in its expert's range, rows distinct, row_token[slot_row[s]] = s/K,
// padding rows marked), not the order.
//
// One block does everything (three phases separated by __syncthreads): a decode step has S = K slots and a
// prefill of thousands of tokens is still only a few microseconds of atomics. Ids >= E are skipped (their slot
// row is 0xffffffff); the CPU reference reports them as errors.
#include "common.cuh"

#define DISPATCH_MAX_E 1024
#define DISPATCH_NONE 0xffffffffu

extern "C" __global__ void __launch_bounds__(1024)
    moe_dispatch(const uint32_t* __restrict__ ids, uint32_t* __restrict__ counts, uint32_t* __restrict__ offsets,
                 uint32_t* __restrict__ row_token, uint32_t* __restrict__ slot_row, uint32_t S, uint32_t K,
                 uint32_t E, uint32_t B, uint32_t R) {
  __shared__ uint32_t s_count[DISPATCH_MAX_E];
  __shared__ uint32_t s_offset[DISPATCH_MAX_E + 1];
  const uint32_t tid = threadIdx.x;
  for (uint32_t e = tid; e < E; e += blockDim.x) s_count[e] = 0;
  for (uint32_t r = tid; r < R; r += blockDim.x) row_token[r] = DISPATCH_NONE;
  __syncthreads();

  // Phase 1: rank of each slot within its expert (kept in slot_row until phase 3).
  for (uint32_t s = tid; s < S; s += blockDim.x) {
    const uint32_t e = ids[s];
    slot_row[s] = e < E ? atomicAdd(&s_count[e], 1u) : DISPATCH_NONE;
  }
  __syncthreads();

  // Phase 2: padded exclusive scan of the counts (E <= 1024: one thread is plenty).
  if (tid == 0) {
    uint32_t acc = 0;
    for (uint32_t e = 0; e < E; ++e) {
      s_offset[e] = acc;
      acc += (s_count[e] + B - 1) / B * B;
    }
    s_offset[E] = acc;
  }
  __syncthreads();
  for (uint32_t e = tid; e < E; e += blockDim.x) counts[e] = s_count[e];
  for (uint32_t e = tid; e <= E; e += blockDim.x) offsets[e] = s_offset[e];

  // Phase 3: rank -> row. Each slot is handled by the same thread that ranked it.
  for (uint32_t s = tid; s < S; s += blockDim.x) {
    const uint32_t e = ids[s];
    if (e >= E) continue;
    const uint32_t row = s_offset[e] + slot_row[s];
    slot_row[s] = row;
    row_token[row] = s / K;
  }
}
