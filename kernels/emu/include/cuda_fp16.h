// cuda_fp16.h for the CPU emulator (kernels/emu): __half as IEEE binary16 bits, conversions rounding to nearest
// even (GCC's _Float16), like `half::f16::from_f32` in the CPU references.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline __half __float2half(float x) { return __float2half_rn(x); }

// A pair of halves, 4-byte aligned as on the GPU (so the emulator's __ldg alignment check sees what the GPU faults on).
struct alignas(4) __half2 {
  __half x, y;
};
// float2 comes from emu.h, which is force-included in front of every kernel source.
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __float2half2_rn(float a) { return {__float2half_rn(a), __float2half_rn(a)}; }
