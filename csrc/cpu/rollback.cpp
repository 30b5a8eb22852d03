// rollback_ on the CPU: target += alpha * (source - target) on the listed units only, in place.
//
// Templated on the (target, source) dtype pair so each element is one load of each, one fma and one rounding store
// (lpt/element.h, lane-wise in load.h's vectors). Runs with unit stride on both sides (whole rows for axis 0, a
// unit's columns for axis 1) are vectorised; with alpha == 1 and equal dtypes the bytes are copied, so the copy is
// exact even for NaN payloads. Other strides go element by element.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "load.h"

namespace lpt {
namespace cpu {
namespace LPT_ISA {
namespace {

constexpr int64_t kAhead = 4;    // single listed columns: rows prefetched ahead
constexpr int64_t kChunk = 256;  // elements updated (and prefetched in the next row) at a time

// Prefetch the bytes [b0, b1) of the row at p (the next row a thread will update: consecutive listed rows are
// scattered, so the hardware prefetchers would start every row cold), for a write or a read, into L1 or (l2) L2.
inline void prefetch_bytes(const void* p, int64_t b0, int64_t b1, bool write, bool l2 = false) {
  if (!p) return;
  for (int64_t b = b0 & ~int64_t(63); b < b1; b += 64) {
    if (l2) __builtin_prefetch((const char*)p + b, 0, 2);
    else if (write) __builtin_prefetch((const char*)p + b, 1);
    else __builtin_prefetch((const char*)p + b, 0);
  }
}

// Element ti of t from element si of s (in elements): the bytes themselves when the dtypes match and alpha is 1
// (exact even for NaN payloads), else round(lerp(t, s, alpha)).
template <int TD, int SD>
inline void update_elem(void* t, int64_t ti, const void* s, int64_t si, float alpha) {
  constexpr int64_t TE = TD == kF32 ? 4 : 2;
  if (TD == SD && alpha == 1.0f)
    std::memcpy((char*)t + ti * TE, (const char*)s + si * TE, TE);
  else
    store_from_f32<TD>(t, ti, lerp(load_f32<TD>(t, ti), load_f32<SD>(s, si), alpha));
}

// n elements: t[i] = round(lerp(t[i], s[i], alpha)), unit strides, a chunk at a time; while a chunk is updated, the
// same chunk of the next rows (nt, ns; may be null) is prefetched: with l2 (AMD cores) into L2, the next chunk of
// this row's source into L1 (2% of gate_proj's rows on a Zen 4, in alternated runs: alpha = 1 0.44 -> 0.61 of the
// copy ceiling, alpha = 0.5 0.39 -> 0.53; with the next target row prefetched for writing into L1 instead, 0.48 /
// 0.48). Whole vectors load, lerp (one fused multiply-add) and round (store_vec) in registers; the last elements of a
// run use the scalar functions.
template <int TD, int SD>
void update_run(void* t, const void* s, int64_t n, float alpha, const void* nt = nullptr, const void* ns = nullptr,
                bool l2 = false) {
  constexpr int64_t TE = TD == kF32 ? 4 : 2, SE = SD == kF32 ? 4 : 2;
  const vf va = vf{} + alpha;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t m = n - c0 < kChunk ? n - c0 : kChunk;
    prefetch_bytes(ns, c0 * SE, (c0 + m) * SE, false, l2);
    prefetch_bytes(nt, c0 * TE, (c0 + m) * TE, true, l2);
    if (l2 && c0 + m < n) prefetch_bytes(s, (c0 + m) * SE, std::min(n, c0 + m + kChunk) * SE, false);
    if (TD == SD && alpha == 1.0f) {
      std::memcpy((char*)t + c0 * TE, (const char*)s + c0 * SE, m * TE);
      continue;
    }
    int64_t i = c0;
    if (alpha == 1.0f) {  // lerp(t, s, 1) == s: the target is not read
      for (; i + kW <= c0 + m; i += kW) store_vec<TD>(t, i, load_vec<SD>(s, i));
    } else {
      for (; i + kW <= c0 + m; i += kW) {
        const vf tv = load_vec<TD>(t, i);
        store_vec<TD>(t, i, vfma(va, load_vec<SD>(s, i) - tv, tv));
      }
    }
    for (; i < c0 + m; ++i) update_elem<TD, SD>(t, i, s, i, alpha);
  }
}

// n elements with strides (in elements) ts, ss.
template <int TD, int SD>
void update_strided(void* t, int64_t ts, const void* s, int64_t ss, int64_t n, float alpha) {
  for (int64_t i = 0; i < n; ++i) update_elem<TD, SD>(t, i * ts, s, i * ss, alpha);
}

template <int TD, int SD>
void run(void* target, int64_t ts0, int64_t ts1, const Tensor2D& src, int64_t rows, int64_t cols,
         const int64_t* index, int64_t n_index, int axis, int64_t block, float alpha, bool compact, int threads) {
  constexpr int64_t TE = TD == kF32 ? 4 : 2, SE = SD == kF32 ? 4 : 2;
  char* t = (char*)target;
  const char* s = (const char*)src.data;
  const bool unit = ts1 == 1 && src.stride1 == 1;
  if (axis == 0) {
    // Unit i is `block` whole rows: parallel over (unit, row) pairs.
    threads = threads_for(n_index * block * cols, threads);
    const int64_t nq = n_index * block;
    const bool l2 = amd_core();
    auto target_row = [&](int64_t q) { return t + (index[q / block] * block + q % block) * ts0 * TE; };
    auto source_row = [&](int64_t q) { return s + (compact ? q : index[q / block] * block + q % block) * src.stride0 * SE; };
#pragma omp parallel num_threads(threads)
    {
      int64_t q0, q1;
      split_range(nq, omp_get_num_threads(), omp_get_thread_num(), 1, &q0, &q1);
      for (int64_t q = q0; q < q1; ++q) {
        if (unit) {
          const bool next = q + 1 < q1;
          update_run<TD, SD>(target_row(q), source_row(q), cols, alpha, next ? target_row(q + 1) : nullptr,
                             next ? source_row(q + 1) : nullptr, l2);
        } else {
          update_strided<TD, SD>(target_row(q), ts1, source_row(q), src.stride1, cols, alpha);
        }
      }
    }
  } else if (block == 1) {
    // Single listed columns (a neuron's down_proj column): one element per unit and row, each in its own cache
    // line, so a row's listed elements are fetched kAhead rows before they are updated (the hardware cannot
    // predict them). Parallel over rows.
    threads = threads_for(rows * n_index, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
      if (r + kAhead < rows) {
        const char* tn = t + (r + kAhead) * ts0 * TE;
        const char* sn = s + (r + kAhead) * src.stride0 * SE;
        for (int64_t i = 0; i < n_index; ++i) {
          __builtin_prefetch(tn + index[i] * ts1 * TE, 1);
          if (!compact) __builtin_prefetch(sn + index[i] * src.stride1 * SE, 0);
        }
      }
      char* tr = t + r * ts0 * TE;
      const char* sr = s + r * src.stride0 * SE;
      for (int64_t i = 0; i < n_index; ++i)
        update_elem<TD, SD>(tr, index[i] * ts1, sr, (compact ? i : index[i]) * src.stride1, alpha);
    }
  } else {
    // Unit i is `block` columns of every row: parallel over rows.
    threads = threads_for(rows * n_index * block, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < n_index; ++i) {
        const int64_t tc = index[i] * block, sc = compact ? i * block : tc;
        char* tp = t + (r * ts0 + tc * ts1) * TE;
        const char* sp = s + (r * src.stride0 + sc * src.stride1) * SE;
        if (unit)
          update_run<TD, SD>(tp, sp, block, alpha);
        else
          update_strided<TD, SD>(tp, ts1, sp, src.stride1, block, alpha);
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
