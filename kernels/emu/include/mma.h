// mma.h for the CPU emulator (kernels/emu): nvcuda::wmma with 16x16x16 fragments that hold the whole tile in
// every lane (redundantly) and compute the product exactly in f32 (16-bit products are exact in f32; the sum
// runs over k in order). Every call is warp-synchronous, as on the GPU: the emulator checks that the whole warp
// reaches it, that the pointer is 32-byte aligned and that the leading dimension is a multiple of 16 bytes.
#pragma once
#include <cstddef>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
void check_op(const char* what, const void* p, unsigned ldm, size_t elem_bytes);
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements the 16x16x16 shape only");
  static constexpr int num_elements = 256;
  float v[16][16];  // [row][col] of the tile (A: m x k, B: k x n, C: m x n)
};

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float x) {
  detail::check_op("wmma::fill_fragment", nullptr, 0, 0);
  for (auto& r : f.v)
    for (auto& e : r) e = x;
}

// A, row major: a[i][k] = p[i * ldm + k]. A, col major: p[k * ldm + i].
// B, col major: b[k][j] = p[j * ldm + k]. B, row major: p[k * ldm + j].
template <typename Use, int M, int N, int K, typename T, typename L, typename E>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const E* p, unsigned ldm) {
  static_assert(sizeof(E) == sizeof(T), "fragment and memory element types differ");
  detail::check_op("wmma::load_matrix_sync", p, ldm, sizeof(E));
  constexpr bool row = __is_same(L, row_major);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = detail::to_f(row ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  detail::check_op("wmma::store_matrix_sync", p, ldm, sizeof(float));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  detail::check_op("wmma::mma_sync", nullptr, 0, 0);
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.v[i][j];
      for (int k = 0; k < 16; ++k) acc += a.v[i][k] * b.v[k][j];
      out[i][j] = acc;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}

}  // namespace wmma
}  // namespace nvcuda
