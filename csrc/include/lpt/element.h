// Element math shared by the CPU (g++) and CUDA (nvcc) backends.
//
// Everything here works on one element at a time and is force-inlined, so the loops in csrc/cpu and csrc/cuda
// decide the memory access pattern while the arithmetic (and therefore the numerics) is written once.
// The CPU tests exercise these functions; the CUDA build compiles the very same code for the device.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define LPT_HD __host__ __device__ __forceinline__
#else
#define LPT_HD inline __attribute__((always_inline))
#endif

namespace lpt {

// Dtype codes of the C interface (the Python side maps torch dtypes onto these).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Delta modes of unit_gram.
enum Mode : int { kConsecutive = 0, kBase = 1, kGiven = 2 };

LPT_HD float bits_to_f32(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
#endif
}

LPT_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// bf16 is the top half of an fp32: widening is exact.
LPT_HD float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

// fp16 -> fp32, exact, branch-free (selects vectorise on the CPU).
LPT_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Normals: move exponent+mantissa into place and re-bias the exponent by 127-15 = 112.
  const uint32_t normal = (em << 13) + (112u << 23);
  // Subnormals: mantissa * 2^-24, exact in fp32 (an integer below 2^10 times a power of two).
  const uint32_t sub = f32_to_bits((float)em * 5.9604644775390625e-08f);
  // Inf / NaN: exponent all ones, mantissa kept.
  const uint32_t special = (em << 13) | 0x7f800000u;
  const uint32_t r = em < 0x0400u ? sub : (em >= 0x7c00u ? special : normal);
  return bits_to_f32(sign | r);
}

// fp32 -> bf16, round to nearest even; NaN stays NaN (quieted).
LPT_HD uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_to_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x40u;
  return (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// fp32 -> fp16, round to nearest even, overflow to inf, subnormals rounded correctly, NaN quieted.
LPT_HD uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  // Below 2^-14 the result is subnormal: adding 0.5 rounds |f| to a multiple of 2^-24 (nearest even, in hardware),
  // and the low mantissa bits of the sum are then the fp16 mantissa (0x400 = smallest normal, also correct).
  const uint32_t sub = f32_to_bits(bits_to_f32(ax) + 0.5f) - 0x3f000000u;
  // Normals: re-bias the exponent (-112 << 23, modulo 2^32) and round off 13 mantissa bits to nearest even.
  const uint32_t normal = (ax + 0xc8000000u + 0xfffu + ((ax >> 13) & 1u)) >> 13;
  const uint32_t special = ax > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN (quiet) or inf
  uint32_t r = ax < 0x38800000u ? sub : normal;
  r = ax >= 0x477ff000u ? special : r;  // |f| >= 65520 rounds to inf (and inf/NaN themselves)
  return (uint16_t)(sign | r);
}

// Load element i of a buffer of the given dtype, widened to fp32.
template <int DT>
LPT_HD float load_f32(const void* p, int64_t i) {
  if (DT == kF32) return ((const float*)p)[i];
  if (DT == kBF16) return bf16_to_f32(((const uint16_t*)p)[i]);
  return f16_to_f32(((const uint16_t*)p)[i]);
}

// Round an fp32 value to the dtype and store it as element i.
template <int DT>
LPT_HD void store_from_f32(void* p, int64_t i, float v) {
  if (DT == kF32) ((float*)p)[i] = v;
  else if (DT == kBF16) ((uint16_t*)p)[i] = f32_to_bf16(v);
  else ((uint16_t*)p)[i] = f32_to_f16(v);
}

// ---- unit_gram: deltas and per-delta statistics ---------------------------------------------------------------

// Delta m of one element from the K loaded values w[0..K-1] (fp32), and its reference value (the subtrahend), as
// the contract defines them: consecutive d_m = w[m+1]-w[m]; base d_m = w[m+1]-w[0]; given d_m = w[m] (reference 0).
template <int MODE>
LPT_HD float delta(const float* w, int m) {
  if (MODE == kConsecutive) return w[m + 1] - w[m];
  if (MODE == kBase) return w[m + 1] - w[0];
  return w[m];
}

template <int MODE>
LPT_HD float delta_ref(const float* w, int m) {
  if (MODE == kConsecutive) return w[m];
  if (MODE == kBase) return w[0];
  return 0.0f;
}

// Number of deltas for K inputs.
LPT_HD int num_deltas(int mode, int k) { return mode == kGiven ? k : k - 1; }

// Per-delta element statistics. Written as selects (no fmaxf, whose NaN rule blocks vectorisation): a NaN |d|
// leaves the maximum unchanged; non-finite inputs are the caller's to count.
LPT_HD void abs_update(float d, float& abs_sum, float& abs_max) {
  const float a = d < 0.0f ? -d : d;
  abs_sum += a;
  abs_max = a > abs_max ? a : abs_max;
}

LPT_HD int is_zero(float d) { return d == 0.0f ? 1 : 0; }

// a * b rounded to fp32 on its own, never fused with a following addition. The near-zero bound
// atol + rtol * |w_ref| is contracted into an fma by nvcc, by g++ on FMA-capable ISAs and by Triton's compiler unless
// told otherwise, and an fma can flip a boundary element; the contract (docs/kernels.md) is the product rounded, then
// the sum, on every backend and build. nvcc never fuses __fmul_rn; on the host an empty asm makes the product opaque
// to the compiler's contraction (it emits no instruction).
LPT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  float p = a * b;
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(p));
#elif defined(__aarch64__)
  __asm__("" : "+w"(p));
#else
  volatile float v = p;
  p = v;
#endif
  return p;
#endif
}

// The near-zero bound atol + rtol * |ref| (see mul_rn).
LPT_HD float near_bound(float ref, float atol, float rtol) {
  const float r = ref < 0.0f ? -ref : ref;
#if defined(__CUDA_ARCH__)
  return __fadd_rn(mul_rn(rtol, r), atol);
#else
  return mul_rn(rtol, r) + atol;
#endif
}

LPT_HD int is_near_zero(float d, float ref, float atol, float rtol) {
  const float a = d < 0.0f ? -d : d;
  return a <= near_bound(ref, atol, rtol) ? 1 : 0;
}

// ---- act_stats_: one activation value ----------------------------------------------------------------------------

LPT_HD void act_update(float x, float threshold, float& abs_sum, float& sq_sum, float& abs_max, float& active) {
  const float a = x < 0.0f ? -x : x;
  abs_sum += a;
  sq_sum += x * x;
  abs_max = a > abs_max ? a : abs_max;
  active += a > threshold ? 1.0f : 0.0f;
}

// ---- rollback_: move the target toward the source --------------------------------------------------------------

// target + alpha * (source - target) in fp32 (one fused multiply-add, the same on every backend); alpha == 1 returns
// the source value itself so that the rounded result is the source exactly.
LPT_HD float lerp(float t, float s, float alpha) {
#if defined(__CUDA_ARCH__)
  return alpha == 1.0f ? s : __fmaf_rn(alpha, s - t, t);
#else
  return alpha == 1.0f ? s : __builtin_fmaf(alpha, s - t, t);
#endif
}

}  // namespace lpt
