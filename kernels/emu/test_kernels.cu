// test_kernels.cu: deliberately broken kernels that prove the CPU emulator can fail (kernels/tests/emu.rs).
// Built only into the emulator's library (feature `emu`), never by nvcc.
#include "common.cuh"

// Lanes 16..31 return before the shuffle that names all 32 lanes.
extern "C" __global__ void emu_test_divergent_shfl(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x >= 16) return;
  v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Only the first warp reaches the barrier.
extern "C" __global__ void emu_test_divergent_barrier(float* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Writes one float per thread whatever n is.
extern "C" __global__ void emu_test_oob_write(float* out, uint32_t n) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = static_cast<float>(n);
}

// Writes into its input.
extern "C" __global__ void emu_test_write_input(const float* in, float* out) {
  const_cast<float*>(in)[threadIdx.x] = 0.f;
  out[threadIdx.x] = 1.f;
}

// A 128-bit load from an address 4 bytes into the buffer.
extern "C" __global__ void emu_test_misaligned_ldg(const float* in, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + 1));
  out[threadIdx.x] = __uint_as_float(v.x);
}

// A 128-bit read of a __shared__ float array 4 bytes past its start (no __ldg: a plain typed load).
extern "C" __global__ void emu_test_misaligned_shared(float* out) {
  __shared__ __align__(16) float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  const uint4 v = *reinterpret_cast<const uint4*>(&s[1 + 4 * (threadIdx.x % 8)]);
  out[threadIdx.x] = __uint_as_float(v.x);
}

// A 64-bit store 4 bytes into the output buffer.
extern "C" __global__ void emu_test_misaligned_store(float* out) {
  *reinterpret_cast<float2*>(out + 1 + 2 * threadIdx.x) = float2{1.f, 2.f};
}

// Reads all 32 entries of a __shared__ array that block 0 fills and later blocks only half fill.
extern "C" __global__ void emu_test_uninit_shared(float* out) {
  __shared__ float s[32];
  if (blockIdx.x == 0 || threadIdx.x < 16) s[threadIdx.x] = static_cast<float>(blockIdx.x + 1);
  __syncthreads();
  out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}

// __ldg of the buffer it writes (the read-only cache may return the value from before the write).
extern "C" __global__ void emu_test_ldg_output(float* out) {
  out[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] += __ldg(out + (threadIdx.x + 1) % 32);
}

// A correct block reduction: out[0] = sum of in[0..n), one block of 256 threads (warp shuffles + barrier).
extern "C" __global__ void __launch_bounds__(256) emu_test_block_sum(const float* in, float* out, uint32_t n) {
  __shared__ float partial[8];
  float v = 0.f;
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) v += in[i];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float p = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.f;
    p = warp_sum(p);
    if (threadIdx.x == 0) out[blockIdx.x] = p;
  }
}

// Reads another thread's shared write without a barrier: the emulator's alternating thread order makes one of
// the blocks see the stale value.
// A two-step tile loop with the barrier after the reads missing (the WAR race of a GEMM's k loop): every thread
// stages its step value, a barrier, then each warp meets at a warp collective, reads the other warp's slot and
// loops straight into the next staging. Correct needs a __syncthreads at the end of the loop body; without it the
// emulator lets warp 0 run on into step 1's staging while warp 1 has not read step 0 yet.
extern "C" __global__ void emu_test_missing_loop_barrier(float* out) {
  __shared__ float s[64];
  float acc = 0.f;
  for (int step = 0; step < 2; ++step) {
    s[threadIdx.x] = static_cast<float>(step * 1000 + threadIdx.x);
    __syncthreads();
    __syncwarp();  // a warp collective (as wmma::load_matrix_sync is): where the schedule may switch warps
    acc += s[(threadIdx.x + 32) % 64];
  }
  out[threadIdx.x] = acc;
}

extern "C" __global__ void emu_test_missing_barrier(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(blockIdx.x * 100 + threadIdx.x);
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Stages one float per thread into a shared array of 32 floats: past its end when the block has more threads.
extern "C" __global__ void emu_test_shared_overflow(float* out) {
  __shared__ float stage[32];
  stage[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = stage[threadIdx.x % 32];
}

// One mma_16816 (common.cuh) on tiles in memory, each lane building its fragments from PTX ISA's per-element
// formulas (element i of a fragment, two per 32-bit register, low half first): A [16][16] and B [16][8] bf16
// (row major, as u16 bits), C and D [16][8] f32. Warp 1 of a 64-thread block does the same with its own copy.
extern "C" __global__ void emu_test_mma_16816(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  const uint32_t lane = threadIdx.x % 32, g = lane >> 2, t = lane % 4;
  uint32_t af[4], bf[2];
  float acc[4];
  for (int i = 0; i < 8; ++i) {
    const uint32_t row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
    const uint32_t col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    const uint32_t v = a[row * 16 + col];
    if (i % 2 == 0) af[i / 2] = v;
    else af[i / 2] |= v << 16;
  }
  for (int i = 0; i < 4; ++i) {
    const uint32_t row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0), col = g;
    const uint32_t v = b[row * 8 + col];
    if (i % 2 == 0) bf[i / 2] = v;
    else bf[i / 2] |= v << 16;
  }
  for (int i = 0; i < 4; ++i) acc[i] = c[(i < 2 ? g : g + 8) * 8 + t * 2 + (i & 1)];
  mma_16816<__nv_bfloat16>(acc, af, bf);
  for (int i = 0; i < 4; ++i) d[(threadIdx.x / 32) * 128 + (i < 2 ? g : g + 8) * 8 + t * 2 + (i & 1)] = acc[i];
}
