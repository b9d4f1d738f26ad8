// buffers.cpp: the kernel arguments of the CPU emulator (feature `emu`). Each buffer handed to a kernel
// (moe_emu_buf_new) sits at the end of its own mapping, right before a PROT_NONE page and after canary bytes: an
// access far out of bounds faults (SIGSEGV, caught by runtime.cpp and reported with the argument it missed), a
// write into the few canary bytes around the buffer is found after the launch (moe_emu_buf_check), and read-only
// inputs are write-protected (moe_emu_buf_protect).
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "internal.h"

namespace moe_emu {
namespace {

struct Buffer {
  char* map;
  size_t map_bytes;
  char* data;
  size_t bytes;
  std::string name;
};
thread_local std::vector<Buffer> t_buffers;

Buffer* find_buffer(void* data) {
  for (Buffer& b : t_buffers)
    if (b.data == data) return &b;
  return nullptr;
}

}  // namespace

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

void copy_error(const std::string& s, char* err, size_t errlen) {
  if (errlen == 0) return;
  const size_t n = s.size() < errlen - 1 ? s.size() : errlen - 1;
  memcpy(err, s.data(), n);
  err[n] = 0;
}

std::string describe_buffer_address(const void* addr) {
  const char* a = static_cast<const char*>(addr);
  for (const Buffer& b : t_buffers) {
    if (a < b.map || a >= b.map + b.map_bytes) continue;
    if (a >= b.data && a < b.data + b.bytes)
      return format("a write into argument '%s' (%zu bytes), which is a read-only input, at byte %zu", b.name.c_str(),
                    b.bytes, static_cast<size_t>(a - b.data));
    if (a >= b.data + b.bytes)
      return format("%zu bytes past the end of argument '%s' (%zu bytes)", static_cast<size_t>(a - (b.data + b.bytes)),
                    b.name.c_str(), b.bytes);
    return format("%zu bytes before the start of argument '%s' (%zu bytes)", static_cast<size_t>(b.data - a),
                  b.name.c_str(), b.bytes);
  }
  return "";
}

bool buffer_span(const void* addr, const char** lo, const char** hi, const char** name) {
  const char* a = static_cast<const char*>(addr);
  for (const Buffer& b : t_buffers)
    if (a >= b.data && a < b.data + b.bytes) {
      *lo = b.data;
      *hi = b.data + b.bytes;
      *name = b.name.c_str();
      return true;
    }
  return false;
}

std::string locate_buffer_address(const void* addr) {
  const char* a = static_cast<const char*>(addr);
  for (const Buffer& b : t_buffers)
    if (a >= b.data && a < b.data + b.bytes)
      return format("byte %zu of argument '%s' (%zu bytes)", static_cast<size_t>(a - b.data), b.name.c_str(), b.bytes);
  return "";
}

}  // namespace moe_emu

// ---- the C interface used by kernels/src/emu.rs ----------------------------------------------------------------

using moe_emu::Buffer;
using moe_emu::copy_error;
using moe_emu::find_buffer;


// misalign (0..15): the data starts that many bytes past a 16-byte boundary, as a device pointer into a tensor
// view at that byte offset would (cudaMalloc itself aligns to 256).
extern "C" void* moe_emu_buf_new(size_t bytes, const char* name, size_t misalign) {
  misalign &= 15;
  const size_t page = moe_emu::page_size();
  const size_t body = (bytes + 15) / 16 * 16 + 64;  // data rounded to 16 plus leading canary bytes
  const size_t pages = (body + page - 1) / page;
  const size_t map_bytes = (pages + 2) * page;
  void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* map = static_cast<char*>(m);
  mprotect(map, page, PROT_NONE);
  char* end = map + map_bytes - page;
  mprotect(end, page, PROT_NONE);
  // Start misalign bytes past a 16-byte boundary, as close to the trailing guard page as that allows.
  char* data =
      reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(end - bytes - misalign) & ~static_cast<uintptr_t>(15)) +
      misalign;
  memset(map + page, moe_emu::kCanary, static_cast<size_t>(end - (map + page)));
  memset(data, 0, bytes);
  moe_emu::t_buffers.push_back(Buffer{map, map_bytes, data, bytes, name});
  return data;
}

// Write-protects the pages of a read-only input (the canary bytes sharing them are then protected too).
extern "C" void moe_emu_buf_protect(void* data) {
  Buffer* b = find_buffer(data);
  if (b != nullptr) mprotect(b->map + moe_emu::page_size(), b->map_bytes - 2 * moe_emu::page_size(), PROT_READ);
}

// 0 when the canary bytes around the buffer are intact, else 1 and a message naming the first changed byte.
extern "C" int moe_emu_buf_check(void* data, char* err, size_t errlen) {
  Buffer* b = find_buffer(data);
  if (b == nullptr) return 0;
  const size_t page = moe_emu::page_size();
  const unsigned char* lo = reinterpret_cast<unsigned char*>(b->map + page);
  const unsigned char* hi = reinterpret_cast<unsigned char*>(b->map + b->map_bytes - page);
  const unsigned char* d0 = reinterpret_cast<unsigned char*>(b->data);
  const unsigned char* d1 = d0 + b->bytes;
  for (const unsigned char* p = lo; p < d0; ++p)
    if (*p != moe_emu::kCanary) {
      copy_error(moe_emu::format("out-of-bounds write %zu bytes before the start of argument '%s' (%zu bytes)",
                                 static_cast<size_t>(d0 - p), b->name.c_str(), b->bytes),
                 err, errlen);
      return 1;
    }
  for (const unsigned char* p = d1; p < hi; ++p)
    if (*p != moe_emu::kCanary) {
      copy_error(moe_emu::format("out-of-bounds write %zu bytes past the end of argument '%s' (%zu bytes)",
                                 static_cast<size_t>(p - d1), b->name.c_str(), b->bytes),
                 err, errlen);
      return 1;
    }
  return 0;
}

extern "C" void moe_emu_buf_free(void* data) {
  auto& v = moe_emu::t_buffers;
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i].data == data) {
      munmap(v[i].map, v[i].map_bytes);
      v.erase(v.begin() + static_cast<long>(i));
      return;
    }
}
