// emu.h: force-included (g++ -include) in front of every kernels/cuda/*.cu when the `emu` feature compiles the
// kernels for the CPU. It defines just enough of CUDA's device dialect that the .cu files compile unmodified as
// C++: the qualifiers, the built-in index variables, barriers, warp shuffles, atomics, __ldg and the
// round-to-nearest intrinsics. The execution model lives in runtime.cpp: one fiber per GPU thread, the blocks of
// a grid one after another, every barrier and warp collective a point where the fibers of a block meet and
// where divergence (part of a block or warp arriving) is reported instead of hanging.
//
// __shared__ variables become thread_local: all fibers of a block run on one host thread, so they share them,
// and two host threads (two tests) emulating at the same time do not. build.rs also rewrites every __shared__
// declaration of the kernels into a reference to guarded memory (moe_emu::shared_array below), so the
// `__shared__` macro here only serves code that build.rs does not see.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

// ---- qualifiers -------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ thread_local
#define __constant__ const
#define __align__(n) __attribute__((aligned(n)))
#ifdef MOE_EMU_SCAN
// build.rs preprocesses each .cu with this defined to find the entry points and their launch bounds.
#undef __global__
#define __global__ MOE_EMU_GLOBAL
#define __launch_bounds__(...) MOE_EMU_BOUNDS(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif

// ---- vector types -------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

namespace moe_emu {

// The fiber (GPU thread) running now on this host thread; its first member is threadIdx.
struct ThreadHead {
  uint3 idx;
};
extern thread_local ThreadHead* t_cur;
extern thread_local uint3 t_block_idx;
extern thread_local uint3 t_block_dim;
extern thread_local uint3 t_grid_dim;

// Collectives (runtime.cpp). `site` names the source line for the divergence report.
void syncthreads(const char* site);
// A warp-wide exchange: every lane named in `mask` must arrive; returns the 64-bit value of lane `src(lane)`,
// where mode 0 = idx, 1 = xor, 2 = down, 3 = up (CUDA's __shfl_*_sync with `width`).
uint64_t warp_exchange(const char* what, const char* site, unsigned mask, uint64_t v, int mode, int arg, int width);
unsigned warp_vote(const char* what, const char* site, unsigned mask, bool pred);  // ballot
void syncwarp(const char* site, unsigned mask);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: every lane of the warp must arrive; the lanes'
// fragments (PTX ISA layout, see runtime.cpp) meet and each lane's d = its part of C + A B.
struct MmaLane {
  uint32_t a[4], b[2];
  float c[4], d[4];
};
void mma_m16n8k16(const char* site, bool bf16, MmaLane* lane);
[[noreturn]] void fail(const char* fmt, ...);
void check_aligned(const void* p, size_t align, const char* what, const char* site);

// Memory for one `__shared__` declaration (build.rs rewrites each into a reference to what this returns, once per
// template instantiation and host thread): `bytes` placed so that they end at a guard page (as close as the
// alignment allows), so an access past the array's end faults and names `name` and `site`. Zero-filled; the
// SharedArray below poisons it at each block.
void* shared_alloc(size_t bytes, size_t align, const char* name, const char* site);
template <typename A>
inline A* shared_array(size_t align, const char* name, const char* site) {
  return static_cast<A*>(shared_alloc(sizeof(A), align > alignof(A) ? align : alignof(A), name, site));
}

// Counts the blocks this host thread has emulated (runtime.cpp's run_block): a new value, a new block.
extern thread_local uint64_t t_block_serial;
// What build.rs makes of one `__shared__` declaration: the guarded memory of shared_array, which the first thread
// of each block to reach the declaration fills with 0xFF bytes (NaN as f32/bf16/f16, 0xffffffff as an index).
// On a GPU shared memory starts each block undefined; here a read before any write of the block sees poison,
// not zeros or what the previous block left.
template <typename A>
struct SharedArray {
  A* ptr;
  uint64_t block = 0;
  SharedArray(size_t align, const char* name, const char* site) : ptr(shared_array<A>(align, name, site)) {}
  A& get() {
    if (block != t_block_serial) {
      memset(static_cast<void*>(ptr), 0xff, sizeof(A));
      block = t_block_serial;
    }
    return *ptr;
  }
};

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 64 bits");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace moe_emu

#define MOE_EMU_STR2(x) #x
#define MOE_EMU_STR(x) MOE_EMU_STR2(x)
#define MOE_EMU_SITE __FILE__ ":" MOE_EMU_STR(__LINE__)

#define threadIdx (::moe_emu::t_cur->idx)
#define blockIdx (::moe_emu::t_block_idx)
#define blockDim (::moe_emu::t_block_dim)
#define gridDim (::moe_emu::t_grid_dim)
#define warpSize 32

#define __syncthreads() ::moe_emu::syncthreads(MOE_EMU_SITE)
#define __syncwarp(...) ::moe_emu::syncwarp(MOE_EMU_SITE, moe_emu_mask_or_full(__VA_ARGS__))
inline unsigned moe_emu_mask_or_full(unsigned m = 0xffffffffu) { return m; }

#define __shfl_sync(mask, v, ...) moe_emu_shfl(MOE_EMU_SITE, "__shfl_sync", 0, mask, v, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) moe_emu_shfl(MOE_EMU_SITE, "__shfl_xor_sync", 1, mask, v, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) moe_emu_shfl(MOE_EMU_SITE, "__shfl_down_sync", 2, mask, v, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) moe_emu_shfl(MOE_EMU_SITE, "__shfl_up_sync", 3, mask, v, __VA_ARGS__)
template <typename T>
inline T moe_emu_shfl(const char* site, const char* what, int mode, unsigned mask, T v, int arg, int width = 32) {
  return ::moe_emu::from_bits<T>(
      ::moe_emu::warp_exchange(what, site, mask, ::moe_emu::to_bits(v), mode, arg, width));
}
#define __ballot_sync(mask, pred) ::moe_emu::warp_vote("__ballot_sync", MOE_EMU_SITE, mask, (pred))
#define __any_sync(mask, pred) (::moe_emu::warp_vote("__any_sync", MOE_EMU_SITE, mask, (pred)) != 0u)
#define __all_sync(mask, pred) (::moe_emu::warp_vote("__all_sync", MOE_EMU_SITE, mask, (pred)) == (mask))

// ---- read-only loads ------------------------------------------------------------------------------------------
// __ldg of a vector type must be naturally aligned on the GPU (a misaligned 128-bit load faults there), and the
// data it reads must stay unwritten for the whole kernel (the read-only cache is not coherent with the kernel's
// own writes): an __ldg into a buffer the kernel takes as a pointer to non-const fails (check_ldg, runtime.cpp).
#define __ldg(p) moe_emu_ldg(p, MOE_EMU_SITE)
namespace moe_emu {
void check_ldg(const void* p, size_t align, const char* site);
}
template <typename T>
inline T moe_emu_ldg(const T* p, const char* site) {
  constexpr size_t natural = sizeof(T) <= 16 && (sizeof(T) & (sizeof(T) - 1)) == 0 ? sizeof(T) : alignof(T);
  ::moe_emu::check_ldg(p, natural, site);
  return *p;
}

// ---- atomics (fibers of a block are cooperative on one host thread: a plain read-modify-write is atomic) ----
template <typename T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicSub(T* p, T v) {
  T old = *p;
  *p = old - v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  T old = *p;
  if (old == cmp) *p = v;
  return old;
}
template <typename T>
inline T atomicOr(T* p, T v) {
  T old = *p;
  *p = old | v;
  return old;
}

// ---- arithmetic intrinsics (IEEE round-to-nearest; the build uses -ffp-contract=off) ------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline int __float_as_int(float a) { return ::moe_emu::from_bits<int>(::moe_emu::to_bits(a)); }
inline unsigned __float_as_uint(float a) { return ::moe_emu::from_bits<unsigned>(::moe_emu::to_bits(a)); }
inline float __int_as_float(int a) { return ::moe_emu::from_bits<float>(::moe_emu::to_bits(a)); }
inline float __uint_as_float(unsigned a) { return ::moe_emu::from_bits<float>(::moe_emu::to_bits(a)); }
// PRMT's default mode: result byte n is byte (s >> 4n) & 7 of the 8 bytes {y:x}; with bit 3 of that selector
// nibble set, the selected byte's sign bit replicated instead. The upper 16 bits of s are not used.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned sel = (s >> (4 * n)) & 0xfu;
    unsigned b = static_cast<unsigned>(v >> (8 * (sel & 7u))) & 0xffu;
    if (sel & 8u) b = (b & 0x80u) ? 0xffu : 0u;
    r |= b << (8 * n);
  }
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// CUDA's device min/max overloads.
#define MOE_EMU_MINMAX(T)                        \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
MOE_EMU_MINMAX(int)
MOE_EMU_MINMAX(unsigned int)
MOE_EMU_MINMAX(long long)
MOE_EMU_MINMAX(unsigned long long)
MOE_EMU_MINMAX(long)
MOE_EMU_MINMAX(unsigned long)
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
#undef MOE_EMU_MINMAX
// fmaf, sqrtf, expf, powf, fmaxf, ... are <math.h>'s own float functions, the same IEEE operations as CUDA's.
