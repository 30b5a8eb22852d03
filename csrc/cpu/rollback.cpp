// rollback_ on the CPU: target += alpha * (source - target) on the listed units only, in place.
//
// Templated on the (target, source) dtype pair so each element is one load of each, one fma and one rounding store
// (lpt/element.h). With alpha == 1 and equal dtypes the bits are copied, so the copy is exact even for NaN payloads.
#include <omp.h>

#include <cstring>

#include "load.h"

namespace lpt {
namespace cpu {
namespace LPT_ISA {
namespace {

template <int TD, int SD>
void run(void* target, int64_t ts0, int64_t ts1, const Tensor2D& src, int64_t rows, int64_t cols,
         const int64_t* index, int64_t n_index, int axis, int64_t block, float alpha, bool compact, int threads) {
  const bool raw_copy = alpha == 1.0f && TD == SD;
  const int64_t esize = TD == kF32 ? 4 : 2;
  auto update = [&](int64_t toff, int64_t soff) {
    if (raw_copy)
      std::memcpy((char*)target + toff * esize, (const char*)src.data + soff * esize, esize);
    else
      store_from_f32<TD>(target, toff, lerp(load_f32<TD>(target, toff), load_f32<SD>(src.data, soff), alpha));
  };
  if (axis == 0) {
    // Unit i is `block` whole rows: parallel over (unit, row) pairs.
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t q = 0; q < n_index * block; ++q) {
      const int64_t i = q / block, j = q % block;
      const int64_t tr = index[i] * block + j, sr = compact ? q : tr;
      if (raw_copy && ts1 == 1 && src.stride1 == 1) {  // whole contiguous row: one memcpy
        std::memcpy((char*)target + tr * ts0 * esize, (const char*)src.data + sr * src.stride0 * esize, cols * esize);
        continue;
      }
      for (int64_t c = 0; c < cols; ++c) update(tr * ts0 + c * ts1, sr * src.stride0 + c * src.stride1);
    }
  } else {
    // Unit i is `block` columns of every row: parallel over rows.
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < n_index; ++i) {
        for (int64_t j = 0; j < block; ++j) {
          const int64_t tc = index[i] * block + j, sc = compact ? i * block + j : tc;
          update(r * ts0 + tc * ts1, r * src.stride0 + sc * src.stride1);
        }
      }
    }
  }
}

template <int TD>
void run_source(int sd, void* target, int64_t ts0, int64_t ts1, const Tensor2D& src, int64_t rows, int64_t cols,
                const int64_t* index, int64_t n_index, int axis, int64_t block, float alpha, bool compact,
                int threads) {
  switch (sd) {
    case kF32: run<TD, kF32>(target, ts0, ts1, src, rows, cols, index, n_index, axis, block, alpha, compact, threads); break;
    case kBF16: run<TD, kBF16>(target, ts0, ts1, src, rows, cols, index, n_index, axis, block, alpha, compact, threads); break;
    default: run<TD, kF16>(target, ts0, ts1, src, rows, cols, index, n_index, axis, block, alpha, compact, threads); break;
  }
}

}  // namespace

void rollback(void* target, int target_dtype, int64_t ts0, int64_t ts1, Tensor2D source, int64_t rows, int64_t cols,
              const int64_t* index, int64_t n_index, int axis, int64_t block, float alpha, bool compact, int threads) {
  switch (target_dtype) {
    case kF32: run_source<kF32>(source.dtype, target, ts0, ts1, source, rows, cols, index, n_index, axis, block, alpha, compact, threads); break;
    case kBF16: run_source<kBF16>(source.dtype, target, ts0, ts1, source, rows, cols, index, n_index, axis, block, alpha, compact, threads); break;
    default: run_source<kF16>(source.dtype, target, ts0, ts1, source, rows, cols, index, n_index, axis, block, alpha, compact, threads); break;
  }
}

}  // namespace LPT_ISA
}  // namespace cpu
}  // namespace lpt
