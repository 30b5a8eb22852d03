// Host and device helpers shared by the three kernel families of the CUDA backend (private to csrc/cuda).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <string>

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
