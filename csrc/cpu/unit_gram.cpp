// unit_gram on the CPU: one pass over K inputs giving, per unit, the Gram matrix of the M deltas and their abs sum,
// abs max, exact-zero and near-zero counts.
//
// Each step widens a run of every input to fp32 into a small L1-resident buffer, then updates lane-wise fp32
// accumulators (element math from lpt/element.h); the lane loops have a fixed width so they vectorise for the ISA
// this file is compiled for. Lanes are folded into double/int64 totals once per row (axis 0) or per row block
// (axis 1), which bounds the fp32 rounding error by the length of one run.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "load.h"

namespace lpt {
namespace cpu {
namespace LPT_ISA {
namespace {

constexpr int kMaxInputs = 8;
constexpr int64_t kRun = 512;   // elements per input per step (8 inputs x 2 KiB fit L1)
constexpr int kLanes = 16;      // axis 0: fp32 accumulator lanes (one AVX-512 register)
constexpr int64_t kTile = 256;  // axis 1: columns per tile (the lanes are the columns)
constexpr int64_t kRowBlock = 128;  // axis 1: rows accumulated in fp32 before folding into doubles

// Lane-wise accumulators for M deltas over W lanes.
template <int M, int W>
struct Lanes {
  static constexpr int NG = M * (M + 1) / 2;
  float g[NG][W];
  float s[M][W];
  float mx[M][W];
  int32_t z[M][W];
  int32_t nz[M][W];
  void clear() { std::memset(this, 0, sizeof *this); }
};

// Per-unit totals.
template <int M>
struct Totals {
  static constexpr int NG = M * (M + 1) / 2;
  double g[NG];
  double s[M];
  float mx[M];
  int64_t z[M];
  int64_t nz[M];
  void clear() { std::memset(this, 0, sizeof *this); }
  template <int W>
  void add_lanes(const Lanes<M, W>& a, int lo, int hi) {
    for (int l = lo; l < hi; ++l) {
      for (int p = 0; p < NG; ++p) g[p] += a.g[p][l];
      for (int m = 0; m < M; ++m) {
        s[m] += a.s[m][l];
        mx[m] = std::max(mx[m], a.mx[m][l]);
        z[m] += a.z[m][l];
        nz[m] += a.nz[m][l];
      }
    }
  }
  void add(const Totals& o) {
    for (int p = 0; p < NG; ++p) g[p] += o.g[p];
    for (int m = 0; m < M; ++m) {
      s[m] += o.s[m];
      mx[m] = std::max(mx[m], o.mx[m]);
      z[m] += o.z[m];
      nz[m] += o.nz[m];
    }
  }
  void store(const GramOut& out, int64_t u) const {
    int p = 0;
    for (int a = 0; a < M; ++a) {
      for (int b = a; b < M; ++b, ++p) {
        out.gram[(u * M + a) * M + b] = (float)g[p];
        out.gram[(u * M + b) * M + a] = (float)g[p];
      }
      out.abs_sum[u * M + a] = (float)s[a];
      out.abs_max[u * M + a] = mx[a];
      out.zeros[u * M + a] = z[a];
      out.near_zeros[u * M + a] = nz[a];
    }
  }
};

// One element (position i of the converted runs) into lane l.
template <int M, int MODE, int W>
inline __attribute__((always_inline)) void step(Lanes<M, W>& a, float* const* buf, int64_t i, int l, float atol,
                                                float rtol) {
  constexpr int K = MODE == kGiven ? M : M + 1;
  float w[K];
  for (int k = 0; k < K; ++k) w[k] = buf[k][i];
  float d[M];
  for (int m = 0; m < M; ++m) d[m] = delta<MODE>(w, m);
  int p = 0;
  for (int x = 0; x < M; ++x)
    for (int y = x; y < M; ++y, ++p) a.g[p][l] += d[x] * d[y];
  for (int m = 0; m < M; ++m) {
    abs_update(d[m], a.s[m][l], a.mx[m][l]);
    a.z[m][l] += is_zero(d[m]);
    a.nz[m][l] += is_near_zero(d[m], delta_ref<MODE>(w, m), atol, rtol);
  }
}

// Axis 0: a unit is `block` rows; runs go along the row.
template <int M, int MODE>
void gram_axis0(const Tensor2D* ws, int64_t rows, int64_t cols, int64_t block, const int64_t* index,
                int64_t n_units, float atol, float rtol, const GramOut& out, int threads) {
  constexpr int K = MODE == kGiven ? M : M + 1;
  (void)rows;
#pragma omp parallel num_threads(threads)
  {
    alignas(64) float storage[K][kRun];
    float* buf[K];
    for (int k = 0; k < K; ++k) buf[k] = storage[k];
    Lanes<M, kLanes> lanes;
    Totals<M> tot;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < n_units; ++u) {
      const int64_t unit = index ? index[u] : u;
      tot.clear();
      for (int64_t r = unit * block; r < (unit + 1) * block; ++r) {
        lanes.clear();
        for (int64_t c0 = 0; c0 < cols; c0 += kRun) {
          const int64_t n = std::min(kRun, cols - c0);
          for (int k = 0; k < K; ++k) load_run(ws[k], r * ws[k].stride0 + c0 * ws[k].stride1, ws[k].stride1, n, buf[k]);
          int64_t i = 0;
          for (; i + kLanes <= n; i += kLanes)
            for (int l = 0; l < kLanes; ++l) step<M, MODE>(lanes, buf, i + l, l, atol, rtol);
          for (; i < n; ++i) step<M, MODE>(lanes, buf, i, 0, atol, rtol);
        }
        tot.add_lanes(lanes, 0, kLanes);
      }
      tot.store(out, u);
    }
  }
}

// Axis 1: a unit is `block` columns. Each thread owns a range of the listed columns and streams all rows over it,
// tile by tile, with the columns as lanes; per-column totals are folded into units at the end.
template <int M, int MODE>
void gram_axis1(const Tensor2D* ws, int64_t rows, int64_t cols, int64_t block, const int64_t* index,
                int64_t n_units, float atol, float rtol, const GramOut& out, int threads) {
  constexpr int K = MODE == kGiven ? M : M + 1;
  (void)cols;
  const int64_t ncol = n_units * block;
  std::vector<int64_t> col_ids;  // listed columns, unit by unit (only when an index gathers units)
  if (index) {
    col_ids.resize(ncol);
    for (int64_t u = 0; u < n_units; ++u)
      for (int64_t j = 0; j < block; ++j) col_ids[u * block + j] = index[u] * block + j;
  }
  std::vector<Totals<M>> col_tot(ncol);
#pragma omp parallel num_threads(threads)
  {
    int64_t lo, hi;
    split_range(ncol, omp_get_num_threads(), omp_get_thread_num(), kLanes, &lo, &hi);
    alignas(64) float storage[K][kTile];
    float* buf[K];
    for (int k = 0; k < K; ++k) buf[k] = storage[k];
    auto* lanes = new Lanes<M, kTile>;
    for (int64_t c = lo; c < hi; ++c) col_tot[c].clear();
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int64_t r1 = std::min(rows, r0 + kRowBlock);
      for (int64_t c0 = lo; c0 < hi; c0 += kTile) {
        const int64_t n = std::min(kTile, hi - c0);
        lanes->clear();
        for (int64_t r = r0; r < r1; ++r) {
          for (int k = 0; k < K; ++k) {
            if (index)
              load_gather(ws[k], r * ws[k].stride0, ws[k].stride1, col_ids.data() + c0, n, buf[k]);
            else
              load_run(ws[k], r * ws[k].stride0 + c0 * ws[k].stride1, ws[k].stride1, n, buf[k]);
          }
          if (n == kTile) {
            for (int l = 0; l < kTile; ++l) step<M, MODE>(*lanes, buf, l, l, atol, rtol);
          } else {
            for (int l = 0; l < n; ++l) step<M, MODE>(*lanes, buf, l, l, atol, rtol);
          }
        }
        for (int64_t l = 0; l < n; ++l) col_tot[c0 + l].add_lanes(*lanes, (int)l, (int)l + 1);
      }
    }
    delete lanes;
  }
  for (int64_t u = 0; u < n_units; ++u) {
    Totals<M> tot;
    tot.clear();
    for (int64_t j = 0; j < block; ++j) tot.add(col_tot[u * block + j]);
    tot.store(out, u);
  }
}

template <int M, int MODE>
void run(const Tensor2D* ws, int64_t rows, int64_t cols, int axis, int64_t block, const int64_t* index,
         int64_t n_units, float atol, float rtol, const GramOut& out, int threads) {
  if (axis == 0)
    gram_axis0<M, MODE>(ws, rows, cols, block, index, n_units, atol, rtol, out, threads);
  else
    gram_axis1<M, MODE>(ws, rows, cols, block, index, n_units, atol, rtol, out, threads);
}

template <int MODE>
void run_mode(int m, const Tensor2D* ws, int64_t rows, int64_t cols, int axis, int64_t block, const int64_t* index,
              int64_t n_units, float atol, float rtol, const GramOut& out, int threads) {
#define LPT_CASE(MM) \
  case MM: run<MM, MODE>(ws, rows, cols, axis, block, index, n_units, atol, rtol, out, threads); break;
  switch (m) {
    LPT_CASE(1) LPT_CASE(2) LPT_CASE(3) LPT_CASE(4) LPT_CASE(5) LPT_CASE(6) LPT_CASE(7) LPT_CASE(8)
  }
#undef LPT_CASE
}

}  // namespace

void unit_gram(const Tensor2D* ws, int k, int64_t rows, int64_t cols, int axis, int64_t block, int mode,
               const int64_t* index, int64_t n_units, float atol, float rtol, GramOut out, int threads) {
  const int m = num_deltas(mode, k);
  if (mode == kConsecutive)
    run_mode<kConsecutive>(m, ws, rows, cols, axis, block, index, n_units, atol, rtol, out, threads);
  else if (mode == kBase)
    run_mode<kBase>(m, ws, rows, cols, axis, block, index, n_units, atol, rtol, out, threads);
  else
    run_mode<kGiven>(m, ws, rows, cols, axis, block, index, n_units, atol, rtol, out, threads);
}

}  // namespace LPT_ISA
}  // namespace cpu
}  // namespace lpt
