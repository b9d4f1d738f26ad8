// entry.h: the table of emulated entry points. build.rs generates, per kernels/cuda/<stem>.cu, a translation unit
// that includes the .cu source and lists its `extern "C" __global__` functions with MOE_EMU_ENTRY, so the
// runtime can launch any of them by name with arguments passed as CUDA's kernelParams (an array of pointers to
// the argument values), checked against the kernel's real parameter list.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

namespace moe_emu {

// 'p' pointer (size = the pointee's size), 'u' unsigned integer, 'i' signed integer, 'f' floating point.
struct ArgDesc {
  char kind;
  unsigned size;
  bool writes = false;  // a pointer to non-const: the kernel may write through it
};

struct Entry {
  const char* name;
  unsigned max_threads;  // __launch_bounds__, 0 when the kernel declares none
  // The largest block its registers per thread (README.md's ptxas table, the most over the architectures
  // listed there) leave room for, 0 when not listed; the registers and the architecture that needs them.
  unsigned reg_threads, regs;
  const char* reg_arch;
  unsigned nargs;
  const ArgDesc* args;
  void (*invoke)(void* const* args);
};

template <typename A>
constexpr ArgDesc desc_of() {
  if constexpr (std::is_pointer_v<A>) {
    using P = std::remove_cv_t<std::remove_pointer_t<A>>;
    constexpr bool writes = !std::is_const_v<std::remove_pointer_t<A>>;
    if constexpr (std::is_void_v<P>) {
      return ArgDesc{'p', 0, writes};
    } else {
      return ArgDesc{'p', static_cast<unsigned>(sizeof(P)), writes};
    }
  } else if constexpr (std::is_floating_point_v<A>) {
    return ArgDesc{'f', static_cast<unsigned>(sizeof(A))};
  } else if constexpr (std::is_unsigned_v<A>) {
    return ArgDesc{'u', static_cast<unsigned>(sizeof(A))};
  } else {
    static_assert(std::is_integral_v<A>, "kernel parameter of a type the emulator does not pass");
    return ArgDesc{'i', static_cast<unsigned>(sizeof(A))};
  }
}

template <typename Sig>
struct Signature;
template <typename... A>
struct Signature<void (*)(A...)> {
  static constexpr unsigned n = sizeof...(A);
  static constexpr ArgDesc descs[sizeof...(A) + 1] = {desc_of<std::remove_cv_t<A>>()..., ArgDesc{0, 0}};
  template <void (*F)(A...), std::size_t... I>
  static void call(void* const* args, std::index_sequence<I...>) {
    F(*static_cast<std::remove_cv_t<A>*>(args[I])...);
  }
};

template <auto F>
void invoke(void* const* args) {
  using S = Signature<decltype(F)>;
  S::template call<F>(args, std::make_index_sequence<S::n>{});
}

}  // namespace moe_emu

#define MOE_EMU_ENTRY(NAME, BOUNDS, REG_THREADS, REGS, REG_ARCH)                                              \
  ::moe_emu::Entry {                                                                                        \
    #NAME, BOUNDS, REG_THREADS, REGS, REG_ARCH, ::moe_emu::Signature<decltype(&NAME)>::n,                  \
        ::moe_emu::Signature<decltype(&NAME)>::descs, &::moe_emu::invoke<&NAME>                             \
  }
