// Strided / gathered loads of runs of elements, widened to fp32, for the CPU kernels.
// Part of each ISA variant's translation unit (the functions are static), so they vectorise for that ISA.
#pragma once

#include <stdint.h>

#include "kernels.h"
#include "lpt/element.h"

namespace lpt {
namespace cpu {
namespace {

// out[i] = t[off + i * step], i < n.
template <int DT>
void load_run_t(const void* p, int64_t off, int64_t step, int64_t n, float* out) {
  if (step == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = load_f32<DT>(p, off + i);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = load_f32<DT>(p, off + i * step);
  }
}

// out[i] = t[off + at[i] * step], i < n (a gather of listed positions).
template <int DT>
void load_gather_t(const void* p, int64_t off, int64_t step, const int64_t* at, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = load_f32<DT>(p, off + at[i] * step);
}

inline void load_run(const Tensor2D& t, int64_t off, int64_t step, int64_t n, float* out) {
  switch (t.dtype) {
    case kF32: load_run_t<kF32>(t.data, off, step, n, out); break;
    case kBF16: load_run_t<kBF16>(t.data, off, step, n, out); break;
    default: load_run_t<kF16>(t.data, off, step, n, out); break;
  }
}

inline void load_gather(const Tensor2D& t, int64_t off, int64_t step, const int64_t* at, int64_t n, float* out) {
  switch (t.dtype) {
    case kF32: load_gather_t<kF32>(t.data, off, step, at, n, out); break;
    case kBF16: load_gather_t<kBF16>(t.data, off, step, at, n, out); break;
    default: load_gather_t<kF16>(t.data, off, step, at, n, out); break;
  }
}

// Split [0, n) into `parts` contiguous ranges whose boundaries are multiples of `align`; range p of them.
inline void split_range(int64_t n, int parts, int p, int64_t align, int64_t* lo, int64_t* hi) {
  const int64_t chunks = (n + align - 1) / align;
  const int64_t per = chunks / parts, extra = chunks % parts;
  const int64_t c0 = p * per + (p < extra ? p : extra);
  const int64_t c1 = c0 + per + (p < extra ? 1 : 0);
  *lo = c0 * align < n ? c0 * align : n;
  *hi = c1 * align < n ? c1 * align : n;
}

}  // namespace
}  // namespace cpu
}  // namespace lpt
