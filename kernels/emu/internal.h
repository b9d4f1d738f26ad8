// internal.h: what runtime.cpp (the execution model) and buffers.cpp (the guarded kernel arguments) share.
#pragma once
#include <cstdarg>
#include <cstddef>
#include <string>

namespace moe_emu {

constexpr unsigned char kCanary = 0xA5;

size_t page_size();
std::string vformat(const char* fmt, va_list ap);
std::string format(const char* fmt, ...);
// Copies `s` into the caller's buffer `err` of `errlen` bytes, NUL-terminated and truncated to fit.
void copy_error(const std::string& s, char* err, size_t errlen);
// What `addr` hits in or around a buffer from moe_emu_buf_new (a read-only input, past the end, before the start),
// or "" when it is in no buffer's mapping.
std::string describe_buffer_address(const void* addr);
// "byte N of argument 'x' (M bytes)" when `addr` lies inside a buffer from moe_emu_buf_new, else "".
std::string locate_buffer_address(const void* addr);
// The buffer from moe_emu_buf_new that `addr` lies in: its data [lo, hi) and name; false when none.
bool buffer_span(const void* addr, const char** lo, const char** hi, const char** name);

}  // namespace moe_emu
