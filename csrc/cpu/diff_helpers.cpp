// lpt diff's per-tensor bookkeeping on the CPU: the histograms of a row sample and the booking of a unit_gram
// result. Each replaces a dozen small torch ops per tensor, which cost more than the work itself (lpt_kernels/
// analysis/profile.py keeps the torch version for builds without this extension).
#include "diff_helpers.h"

#include <pybind11/stl.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "lpt/element.h"
#include "pyargs.h"

namespace py = pybind11;

namespace lpt {
namespace cpu {
namespace {

// The bin edges of one (bins, lo, hi), built once: a few thousand table entries and a few hundred pow calls are
// more work than binning a small tensor's sample, and every call of a pass uses the same histogram.
struct HistTables {
  int bins;
  double lo, hi;
  std::vector<float> edge;      // [bins + 1] the smallest float >= each exact edge
  uint32_t b0;                  // top-16-bit bucket of edge[0]
  std::vector<int16_t> first;   // per bucket, the bin of its smallest value
  std::vector<double> escale;   // [bins + 1] the scale of the exact ratio compare
  std::vector<signed char> ekind;
};

std::shared_ptr<const HistTables> hist_tables(int bins, double lo, double hi) {
  static std::mutex mu;
  static std::shared_ptr<const HistTables> last;
  std::lock_guard<std::mutex> lock(mu);
  if (last && last->bins == bins && last->lo == lo && last->hi == hi) return last;
  auto t = std::make_shared<HistTables>();
  t->bins = bins, t->lo = lo, t->hi = hi;
  // Edges as the smallest float >= the exact (double) edge: for a float v, v >= edge exactly when v >= that float.
  std::vector<float>& edge = t->edge;
  edge.resize(bins + 1);
  for (int b = 0; b <= bins; ++b) {
    const double e = std::pow(10.0, lo + (hi - lo) * b / bins);
    float f = (float)e;
    edge[b] = (double)f < e ? std::nextafter(f, INFINITY) : f;
  }
  if (!(edge[0] > 0.0f) || !std::isfinite(edge[bins]) || (hi - lo) / bins < 0.004)
    throw std::invalid_argument("log_hist: bins out of the supported range");
  // Positive floats in buckets of their top 16 bits (exponent and 7 mantissa bits, 1/128 of a binade, under a
  // tenth of a decade): first[i] is the bin of bucket i's smallest value, so a normal value's bin is first[i] or the
  // next. Subnormal floats (below ~1.2e-38) have fewer mantissa bits, so their buckets are wider: bin_of walks on.
  const uint32_t b0 = t->b0 = lpt::f32_to_bits(edge[0]) >> 16, b1 = lpt::f32_to_bits(edge[bins]) >> 16;
  std::vector<int16_t>& first = t->first;
  first.resize(b1 - b0 + 1);
  for (uint32_t i = b0, b = 0; i <= b1; ++i) {
    const float v = lpt::bits_to_f32(i << 16);
    while (b + 1 < (uint32_t)bins && v >= edge[b + 1]) ++b;
    first[i - b0] = (int16_t)b;
  }
  // Exact compares for the ratio: q = d / r >= E_b, with d, r floats. At a decade 10^k the product d 10^-k (k <= 0)
  // or r 10^k (k > 0) is compared exactly (two-product: the double product plus its fma residual); elsewhere r E_b.
  std::vector<double>& escale = t->escale;
  escale.resize(bins + 1);
  std::vector<signed char>& ekind = t->ekind;
  ekind.resize(bins + 1);  // 0: r * escale, 1: d * escale (a decade 10^k, k < 0)
  for (int b = 0; b <= bins; ++b) {
    const double x = lo + (hi - lo) * b / bins, k = std::nearbyint(x);
    if (std::fabs(x - k) < 1e-9 && std::fabs(k) <= 22) {
      ekind[b] = k < 0;
      escale[b] = std::pow(10.0, std::fabs(k));  // exact: 10^n is a double for n <= 22
    } else {
      ekind[b] = 0;
      escale[b] = std::pow(10.0, x);
    }
  }
  last = t;
  return last;
}

// lpt diff's histograms over a row sample: for each listed row of K inputs [rows, cols] (consecutive or base mode),
// the log10 bin of |d_m| goes to counts[m] and that of |d_m| / |w_ref| to counts[M + m] (counts: float64 [2M, bins],
// zeros: float64 [2M], both added to). Bin b holds [E_b, E_(b+1)) with E_b = 10^(lo + b w), w = (hi - lo) / bins:
// exactly 10^k where lo + b w is an integer k (a decade), elsewhere the double nearest to it (std::pow). Values from
// E_bins up (inf too) go to the top bin; values below E_0 and NaN are not counted. Exact zeros are counted in zeros,
// and so is a relative change against a zero weight or a non-finite one. |d| is the kernels' fp32 difference; the
// ratio |d| / |w_ref| is never rounded: its bin is found by exact compares of |d| against E_b |w_ref| (so a ratio
// of exactly 1/100 lands in the bin that starts at 10^-2). One call per tensor instead of a dozen torch ops.
void log_hist(const std::vector<uintptr_t>& ptrs, const std::vector<int>& dtypes, const std::vector<int64_t>& s0,
              const std::vector<int64_t>& s1, int64_t total_rows, int64_t cols, uintptr_t rows, int64_t n_rows,
              int mode, int bins, double lo, double hi, uintptr_t counts, uintptr_t zeros, int threads) {
  const int k = (int)ptrs.size();
  if (k < 2 || k > 8 || dtypes.size() != ptrs.size() || s0.size() != ptrs.size() || s1.size() != ptrs.size())
    throw std::invalid_argument("log_hist: 2 to 8 inputs with one dtype and two strides each");
  if (mode != lpt::kConsecutive && mode != lpt::kBase) throw std::invalid_argument("log_hist: bad mode");
  if (bins < 1 || bins > 32000 || !(hi > lo)) throw std::invalid_argument("log_hist: bad bins");
  if ((n_rows > 0 && !rows) || !counts || !zeros) throw std::invalid_argument("log_hist: null pointer");
  std::vector<Tensor2D> ws;
  for (int i = 0; i < k; ++i) ws.push_back(tensor(ptrs[i], dtypes[i], s0[i], s1[i], "log_hist input"));
  const int m_count = k - 1;
  const std::shared_ptr<const HistTables> tab = hist_tables(bins, lo, hi);
  const double* es = tab->escale.data();
  const signed char* ek = tab->ekind.data();
  // Exact compares of a double a with a product b s of doubles: the product rounds to p with residual b s - p (exact,
  // by fma), and rounding is monotonic, so p > a or p < a already decide; on p == a the residual's sign does.
  auto prod_ge = [](double b, double s, double a) {  // b s >= a
    const double p = b * s;
    return p > a || (p == a && std::fma(b, s, -p) >= 0.0);
  };
  auto prod_le = [](double b, double s, double a) {  // b s <= a
    const double p = b * s;
    return p < a || (p == a && std::fma(b, s, -p) <= 0.0);
  };
  auto ratio_ge = [&](double d, double r, int b) {  // d / r >= E_b (r > 0)
    return ek[b] ? prod_ge(d, es[b], r) : prod_le(r, es[b], d);
  };
  const float* fe = tab->edge.data();
  const int16_t* ft = tab->first.data();
  const uint32_t b0 = tab->b0;
  auto bin_of = [&](float v) {  // -1 below the range (or NaN), bins at or above the top edge
    if (!(v >= fe[0])) return -1;
    if (v >= fe[bins]) return bins;
    int b = ft[(lpt::f32_to_bits(v) >> 16) - b0];
    while (v >= fe[b + 1]) ++b;  // once at most for normal floats; a subnormal bucket can span several bins
    return b;
  };
  auto add = [&](float v, int64_t* c, int64_t& z) {
    if (v == 0.0f) return (void)++z;
    const int b = bin_of(v);
    if (b >= 0) ++c[b < bins ? b : bins - 1];
  };
  auto add_ratio = [&](float d, float r, int64_t* c, int64_t& z) {
    // no change, or a change against a zero or non-finite weight (or a NaN change): counted apart
    if (d == 0.0f || !(r > 0.0f) || !std::isfinite(r) || !std::isfinite(d)) return (void)++z;
    int b = bin_of(d / r);  // a first guess from the rounded ratio: at most one bin off the exact one
    while (b < bins && ratio_ge(d, r, b + 1)) ++b;
    while (b >= 0 && !ratio_ge(d, r, b)) --b;
    if (b >= 0) ++c[b < bins ? b : bins - 1];
  };
  const int64_t* ri = (const int64_t*)rows;
  for (int64_t i = 0; i < n_rows; ++i)
    if (ri[i] < 0 || ri[i] >= total_rows) throw std::invalid_argument("log_hist: row index out of range");
  py::gil_scoped_release nogil;
  // Items of (row, chunk of columns), spread over the threads; each thread bins into counts of its own. The binning
  // costs ~10 ns a value, so a tensor's sample (~8k values per delta) is worth two threads.
  constexpr int64_t kChunk = 1024;
  const int64_t per_row = (cols + kChunk - 1) / kChunk, items = n_rows * per_row;
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)threads, items, n_rows * cols / 2048}));
  std::vector<std::vector<int64_t>> t_local(nt, std::vector<int64_t>((size_t)2 * m_count * bins, 0));
  std::vector<std::vector<int64_t>> t_zero(nt, std::vector<int64_t>(2 * m_count, 0));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = nt > 1 ? omp_get_thread_num() : 0;
    int64_t* local = t_local[t].data();
    int64_t* local_zero = t_zero[t].data();
    std::vector<float> w((size_t)k * kChunk);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t i = it / per_row, c0 = (it % per_row) * kChunk;
      const int64_t len = cols - c0 < kChunk ? cols - c0 : kChunk;
      for (int j = 0; j < k; ++j) {
        const Tensor2D& x = ws[j];
        const int64_t off = ri[i] * x.stride0 + c0 * x.stride1, st = x.stride1;
        float* out = w.data() + (size_t)j * kChunk;
        if (x.dtype == lpt::kF32)
          for (int64_t c = 0; c < len; ++c) out[c] = lpt::load_f32<lpt::kF32>(x.data, off + c * st);
        else if (x.dtype == lpt::kBF16)
          for (int64_t c = 0; c < len; ++c) out[c] = lpt::load_f32<lpt::kBF16>(x.data, off + c * st);
        else
          for (int64_t c = 0; c < len; ++c) out[c] = lpt::load_f32<lpt::kF16>(x.data, off + c * st);
      }
      for (int m = 0; m < m_count; ++m) {
        const float* ref = w.data() + (size_t)(mode == lpt::kConsecutive ? m : 0) * kChunk;
        const float* cur = w.data() + (size_t)(m + 1) * kChunk;
        int64_t* ca = local + (size_t)m * bins;
        int64_t* cr = local + (size_t)(m_count + m) * bins;
        for (int64_t c = 0; c < len; ++c) {
          const float d = std::fabs(cur[c] - ref[c]);
          add(d, ca, local_zero[m]);
          add_ratio(d, std::fabs(ref[c]), cr, local_zero[m_count + m]);
        }
      }
    }
  }
  double* cnt = (double*)counts;
  double* zer = (double*)zeros;
  for (int t = 0; t < nt; ++t) {
    for (size_t i = 0; i < t_local[t].size(); ++i) cnt[i] += (double)t_local[t][i];
    for (int i = 0; i < 2 * m_count; ++i) zer[i] += (double)t_zero[t][i];
  }
}

// lpt diff's bookkeeping of one unit_gram result (n units, m deltas, contiguous: gram float32 [n, m, m], abs_sum and
// abs_max float32 [n, m], zeros and near int64 [n, m]): adds it into a group's running totals of the same layout
// (gram and abs_sum float64, abs_max by maximum, counts int64; all null to skip) and returns the tensor's totals per
// delta: zeros, near zeros, squared norm (the Gram diagonal, summed in fp64), abs max, and whether the Gram and abs
// sums are all finite. Maxima propagate NaN, as torch.maximum does. One call instead of a dozen small torch ops.
py::tuple fold_unit_gram(uintptr_t gram, uintptr_t abs_sum, uintptr_t abs_max, uintptr_t zeros, uintptr_t near,
                         int64_t n, int64_t m, uintptr_t a_gram, uintptr_t a_abs_sum, uintptr_t a_abs_max,
                         uintptr_t a_zeros, uintptr_t a_near) {
  if (n < 0 || m < 1 || m > 8) throw std::invalid_argument("fold_unit_gram: bad shape");
  if (n > 0 && !(gram && abs_sum && abs_max && zeros && near))
    throw std::invalid_argument("fold_unit_gram: null input");
  if (a_gram && !(a_abs_sum && a_abs_max && a_zeros && a_near))
    throw std::invalid_argument("fold_unit_gram: null total");
  const float *g = (const float*)gram, *s = (const float*)abs_sum, *mx = (const float*)abs_max;
  const int64_t *z = (const int64_t*)zeros, *nz = (const int64_t*)near;
  auto nan_max = [](float a, float b) { return std::isnan(b) || b > a ? b : a; };
  std::vector<int64_t> tz(m, 0), tnz(m, 0);
  std::vector<double> tsq(m, 0.0);
  std::vector<float> tmx(m, 0.0f);
  // Not finite: all exponent bits set. An OR of bits (unlike a float sum) vectorises.
  uint32_t bad = 0;
  auto check = [&bad](const float* x, int64_t len) {
    const uint32_t* b = (const uint32_t*)x;
    for (int64_t i = 0; i < len; ++i) bad |= ((b[i] & 0x7f800000u) == 0x7f800000u);
  };
  check(g, n * m * m);
  check(s, n * m);
  // One pass over the units (each array read once, not once per delta), four interleaved partial totals per delta:
  // the double sums and the maxima are latency chains otherwise.
  double sq[4][8] = {};
  float smx[4][8] = {};
  for (int64_t u = 0; u < n; ++u) {
    double* q = sq[u & 3];
    float* x = smx[u & 3];
    for (int64_t a = 0; a < m; ++a) {
      const int64_t i = u * m + a;
      tz[a] += z[i], tnz[a] += nz[i], q[a] += g[i * m + a], x[a] = nan_max(x[a], mx[i]);
    }
  }
  for (int64_t a = 0; a < m; ++a) {
    tsq[a] = (sq[0][a] + sq[1][a]) + (sq[2][a] + sq[3][a]);
    tmx[a] = nan_max(nan_max(smx[0][a], smx[1][a]), nan_max(smx[2][a], smx[3][a]));
  }
  if (a_gram) {
    double* __restrict ag = (double*)a_gram;
    double* __restrict as = (double*)a_abs_sum;
    float* __restrict amx = (float*)a_abs_max;
    int64_t* __restrict az = (int64_t*)a_zeros;
    int64_t* __restrict anz = (int64_t*)a_near;
    for (int64_t i = 0; i < n * m * m; ++i) ag[i] += g[i];
    for (int64_t i = 0; i < n * m; ++i) as[i] += s[i];
    for (int64_t i = 0; i < n * m; ++i) az[i] += z[i];
    for (int64_t i = 0; i < n * m; ++i) anz[i] += nz[i];
    for (int64_t i = 0; i < n * m; ++i) amx[i] = nan_max(amx[i], mx[i]);
  }
  const bool finite = bad == 0;
  return py::make_tuple(tz, tnz, tsq, tmx, finite);
}

}  // namespace

void add_diff_helpers(py::module_& m) {
  m.def("log_hist", &log_hist, "lpt diff's log10 histograms of |d| and |d|/|w_ref| over listed rows.");
  m.def("fold_unit_gram", &fold_unit_gram, "lpt diff: add a unit_gram result into group totals; its totals.");
}

}  // namespace cpu
}  // namespace lpt
