// Host and device helpers shared by the three kernel families of the CUDA backend (private to csrc/cuda).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <string>
#include <type_traits>

#include "lpt/element.h"
#include "lpt_cuda.h"

namespace lpt {
namespace cuda {

// ---- host: errors, launch checks, grid sizing ------------------------------------------------------------------

// One message per host thread (inline + function-local static: a single instance across the translation units).
inline std::string& last_error() {
  static thread_local std::string msg;
  return msg;
}

inline int fail(int code, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  last_error() = buf;
  return code;
}

// After a launch: cudaGetLastError reports configuration/launch errors without synchronising.
inline int check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? LPT_CUDA_OK : fail(LPT_CUDA_ERUNTIME, "%s: %s", what, cudaGetErrorString(e));
}

inline bool valid_dtype(int dt) { return dt == kF32 || dt == kBF16 || dt == kF16; }
inline int dtype_size(int dt) { return dt == kF32 ? 4 : 2; }

// Streaming multiprocessors of `device` (cached; a host attribute query, no synchronisation). Sizes the grids.
inline int sm_count(int device, int* n) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) return fail(LPT_CUDA_EINVAL, "device: %d is not a CUDA device ordinal", device);
  *n = cache[device].load(std::memory_order_relaxed);
  if (*n > 0) return LPT_CUDA_OK;
  const cudaError_t e = cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so that a later launch check does not report it again
    return fail(LPT_CUDA_ERUNTIME, "cannot query CUDA device %d: %s", device, cudaGetErrorString(e));
  }
  cache[device].store(*n, std::memory_order_relaxed);
  return LPT_CUDA_OK;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// CTAs of `Kernel` that fit on one SM at `threads` threads per CTA: cudaOccupancyMaxActiveBlocksPerMultiprocessor
// reads the compiled kernel's registers and shared memory (a host computation, no synchronisation). Cached per device
// (one thread count per kernel instance). The grids below are sized from it, in whole waves.
template <auto Kernel>
int resident_ctas(int device, int threads, int* n) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) return fail(LPT_CUDA_EINVAL, "device: %d is not a CUDA device ordinal", device);
  *n = cache[device].load(std::memory_order_relaxed);
  if (*n > 0) return LPT_CUDA_OK;
  const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, Kernel, threads, 0);
  if (e != cudaSuccess || *n < 1) {
    cudaGetLastError();
    return fail(LPT_CUDA_ERUNTIME, "cannot query the occupancy of a kernel on CUDA device %d: %s", device,
                cudaGetErrorString(e));
  }
  cache[device].store(*n, std::memory_order_relaxed);
  return LPT_CUDA_OK;
}

// How many parts to split each of `tiles` independent tiles into (at most max_split) so that the grid fills the
// device's `slots` resident CTAs in whole waves: a partial last wave leaves SMs idle while it runs (e.g. 2128 CTAs on
// 2112 slots is two waves, the second 1% full). One wave when the tiles are few (slots / tiles parts); otherwise the
// smallest split up to 32 whose waves are >= 90% used, else the best of those.
inline int64_t fit_split(int64_t tiles, int64_t max_split, int64_t slots) {
  if (max_split < 1) max_split = 1;
  if (tiles < 1 || slots < 1) return 1;
  if (tiles * max_split <= slots) return max_split;  // not even one wave: all the parallelism there is
  if (10 * tiles <= slots) return std::min(max_split, slots / tiles);  // one wave, >= 90% of the slots
  int64_t best = 1;
  double best_use = 0.0;
  for (int64_t s = 1; s <= std::min<int64_t>(max_split, 32); ++s) {
    const int64_t n = tiles * s, waves = (n + slots - 1) / slots;
    const double use = (double)n / (double)(waves * slots);
    if (use >= 0.9) return s;
    if (use > best_use) best = s, best_use = use;
  }
  return best;
}

// Split `n` items into `parts` ~equal chunks (chunk a multiple of `align`); returns the chunk size, sets the count.
inline int64_t split(int64_t n, int64_t parts, int64_t align, int64_t* count) {
  int64_t chunk = ceil_div(ceil_div(n, parts < 1 ? 1 : parts), align) * align;
  if (chunk < align) chunk = align;
  *count = n > 0 ? ceil_div(n, chunk) : 1;
  return chunk;
}

// ---- device: loads, warp reductions, atomics -------------------------------------------------------------------

// Runtime (mixed) dtypes: loads are split from conversions. A load helper that branched on the dtype would put a
// branch (and the conversion that consumes the value) between consecutive loads, so a thread would have one load in
// flight at a time. Instead every load of an iteration is issued first, as a pair of predicated loads (the
// predicate is warp-uniform) giving the raw bits; element.h's conversions run afterwards.

// Raw bits of element i: fp32 -> 32 bits, bf16/f16 -> 16 bits zero-extended.
__device__ __forceinline__ uint32_t load_raw(const void* p, int dt, int64_t i) {
  uint32_t r;
  if (dt == kF32) r = __ldg((const unsigned int*)p + i);
  if (dt != kF32) r = __ldg((const unsigned short*)p + i);
  return r;
}

// Raw bits of elements i..i+3 (i a multiple of 4, 4-element-aligned address): one 16-byte (fp32) or 8-byte load.
__device__ __forceinline__ uint4 load_raw4(const void* p, int dt, int64_t i) {
  uint4 r;
  if (dt == kF32) r = __ldg((const uint4*)p + (i >> 2));
  if (dt != kF32) {
    const uint2 h = __ldg((const uint2*)p + (i >> 2));
    r.x = h.x, r.y = h.y;
  }
  return r;
}

__device__ __forceinline__ float raw_to_f32(uint32_t r, int dt) {
  if (dt == kF32) return bits_to_f32(r);
  if (dt == kBF16) return bf16_to_f32((uint16_t)r);
  return f16_to_f32((uint16_t)r);
}

__device__ __forceinline__ void raw4_to_f32(uint4 r, int dt, float (&w)[4]) {
  if (dt == kF32) {
    w[0] = bits_to_f32(r.x), w[1] = bits_to_f32(r.y), w[2] = bits_to_f32(r.z), w[3] = bits_to_f32(r.w);
    return;
  }
  const uint16_t h[4] = {(uint16_t)(r.x & 0xffffu), (uint16_t)(r.x >> 16), (uint16_t)(r.y & 0xffffu),
                         (uint16_t)(r.y >> 16)};
  if (dt == kBF16) {
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = bf16_to_f32(h[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = f16_to_f32(h[e]);
  }
}

__device__ __forceinline__ float warp_sum(float v, int width = 32) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    if (o < width) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum(int v, int width = 32) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    if (o < width) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Same select as element.h's abs_update: a NaN never replaces the maximum.
__device__ __forceinline__ float warp_max(float v, int width = 32) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    if (o < width) {
      const float w = __shfl_xor_sync(0xffffffffu, v, o);
      v = w > v ? w : v;
    }
  return v;
}

// Maxima of non-negative values: their IEEE bit patterns order like signed integers, so an integer atomicMax is
// exact; any negative existing value (sign bit set) compares below every non-negative one.
__device__ __forceinline__ void atomic_max_nonneg(float* p, float v) { atomicMax((int*)p, __float_as_int(v)); }
__device__ __forceinline__ void atomic_max_nonneg(double* p, double v) {
  atomicMax((long long*)p, __double_as_longlong(v));
}

}  // namespace cuda
}  // namespace lpt
