// Declarations of the CPU kernels. Each kernel source (unit_gram.cpp, act_stats.cpp, rollback.cpp) is compiled once
// per instruction-set level with -DLPT_ISA=<name> and matching -march flags (see setup.py), which puts its symbols in
// namespace lpt::cpu::<name>; bindings.cpp picks the best level the running CPU supports. Wheels therefore never
// depend on -march=native.
#pragma once

#include <stdint.h>

namespace lpt {
namespace cpu {

// One input tensor: data pointer (already offset), dtype code, strides in elements.
struct Tensor2D {
  const void* data;
  int dtype;
  int64_t stride0;
  int64_t stride1;
};

struct GramOut {
  float* gram;         // [U, M, M]
  float* abs_sum;      // [U, M]
  float* abs_max;      // [U, M]
  int64_t* zeros;      // [U, M]
  int64_t* near_zeros; // [U, M]
};

#define LPT_DECLARE_CPU_KERNELS(ISA)                                                                              \
  namespace ISA {                                                                                                 \
  void unit_gram(const Tensor2D* ws, int k, int64_t rows, int64_t cols, int axis, int64_t block, int mode,        \
                 const int64_t* index, int64_t n_units, float atol, float rtol, GramOut out, int threads);        \
  void act_stats(Tensor2D x, int64_t tokens, int64_t channels, const uint8_t* mask, double* stats,                \
                 int64_t stats_stride0, int64_t stats_stride1, float threshold, int threads);                     \
  void rollback(void* target, int target_dtype, int64_t t_stride0, int64_t t_stride1, Tensor2D source,            \
                int64_t rows, int64_t cols, const int64_t* index, int64_t n_index, int axis, int64_t block,       \
                float alpha, bool compact, int threads);                                                          \
  }

// Whose tuning the kernels take where vendors differ (amd_core below): -1 the running CPU's, 1 AMD's, 0 the
// others'. Set by set_tuning, so that tests run both sides on any machine.
extern int g_tuning;

// Whether the kernels take AMD's tuning: set_tuning's choice, else whether the running CPU is AMD's.
inline bool amd_core() {
  if (g_tuning >= 0) return g_tuning == 1;
#if defined(__x86_64__) || defined(__i386__)
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

LPT_DECLARE_CPU_KERNELS(base)
#if defined(__x86_64__)
LPT_DECLARE_CPU_KERNELS(avx2)
LPT_DECLARE_CPU_KERNELS(avx512)
#endif

}  // namespace cpu
}  // namespace lpt
