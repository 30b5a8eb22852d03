// pybind11 module lpt_kernels._C_cpu: takes raw pointers, shapes and strides from Python (no libtorch), picks the
// best instruction-set variant of the kernels the running CPU supports, and checks the arguments it relies on so
// that a bad call raises a Python exception instead of touching memory.
#include <algorithm>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "diff_helpers.h"
#include "kernels.h"
#include "pyargs.h"
#include "lpt/element.h"

namespace py = pybind11;
using namespace lpt::cpu;

int lpt::cpu::g_tuning = -1;

namespace {

enum class Isa { base, avx2, avx512 };

Isa best_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return Isa::avx2;
#endif
  return Isa::base;
}

const char* isa_name(Isa i) { return i == Isa::avx512 ? "avx512" : i == Isa::avx2 ? "avx2" : "base"; }

Isa g_best = best_isa();
Isa g_isa = g_best;

void set_isa(const std::string& name) {
  Isa want;
  if (name == "base") want = Isa::base;
  else if (name == "avx2") want = Isa::avx2;
  else if (name == "avx512") want = Isa::avx512;
  else if (name == "auto") want = g_best;
  else throw std::invalid_argument("unknown ISA '" + name + "' (expected auto, base, avx2 or avx512)");
  if ((int)want > (int)g_best)
    throw std::invalid_argument(std::string("ISA '") + name + "' is not supported by this CPU (best: " +
                                isa_name(g_best) + ")");
  g_isa = want;
}

void set_tuning(const std::string& name) {
  if (name == "auto") g_tuning = -1;
  else if (name == "amd") g_tuning = 1;
  else if (name == "intel") g_tuning = 0;
  else throw std::invalid_argument("unknown tuning '" + name + "' (expected auto, amd or intel)");
}

// Choose the variant at run time.
#if defined(__x86_64__)
#define LPT_DISPATCH(fn, ...)                                     \
  do {                                                            \
    if (g_isa == Isa::avx512) lpt::cpu::avx512::fn(__VA_ARGS__);  \
    else if (g_isa == Isa::avx2) lpt::cpu::avx2::fn(__VA_ARGS__); \
    else lpt::cpu::base::fn(__VA_ARGS__);                         \
  } while (0)
#else
#define LPT_DISPATCH(fn, ...) lpt::cpu::base::fn(__VA_ARGS__)
#endif

void unit_gram(const std::vector<uintptr_t>& ptrs, const std::vector<int>& dtypes, const std::vector<int64_t>& s0,
               const std::vector<int64_t>& s1, int64_t rows, int64_t cols, int axis, int64_t block, int mode,
               uintptr_t index, int64_t n_units, float atol, float rtol, uintptr_t gram, uintptr_t abs_sum,
               uintptr_t abs_max, uintptr_t zeros, uintptr_t near_zeros, int threads) {
  const int k = (int)ptrs.size();
  if (k < 1 || k > 8 || dtypes.size() != ptrs.size() || s0.size() != ptrs.size() || s1.size() != ptrs.size())
    throw std::invalid_argument("unit_gram: 1 to 8 inputs with one dtype and two strides each");
  if (mode < lpt::kConsecutive || mode > lpt::kGiven) throw std::invalid_argument("unit_gram: bad mode");
  if (lpt::num_deltas(mode, k) < 1) throw std::invalid_argument("unit_gram: this mode needs at least 2 inputs");
  if (axis != 0 && axis != 1) throw std::invalid_argument("unit_gram: axis must be 0 or 1");
  if (rows < 0 || cols < 0 || n_units < 0) throw std::invalid_argument("unit_gram: negative extent");
  const int64_t extent = axis == 0 ? rows : cols;
  if (block < 1 || extent % block) throw std::invalid_argument("unit_gram: block must divide the axis");
  // No index: every unit. An empty index may come with a null pointer (n_units == 0).
  if (!index && n_units != 0 && n_units != extent / block)
    throw std::invalid_argument("unit_gram: unit count mismatch");
  if (n_units > 0 && !(gram && abs_sum && abs_max && zeros && near_zeros))
    throw std::invalid_argument("unit_gram: null output pointer");
  std::vector<Tensor2D> ws;
  for (int i = 0; i < k; ++i) ws.push_back(tensor(ptrs[i], dtypes[i], s0[i], s1[i], rows * cols, "unit_gram input"));
  GramOut out{(float*)gram, (float*)abs_sum, (float*)abs_max, (int64_t*)zeros, (int64_t*)near_zeros};
  py::gil_scoped_release nogil;
  LPT_DISPATCH(unit_gram, ws.data(), k, rows, cols, axis, block, mode, (const int64_t*)index, n_units, atol, rtol,
               out, threads < 1 ? 1 : threads);
}

void act_stats(uintptr_t x, int dtype, int64_t s0, int64_t s1, int64_t tokens, int64_t channels, uintptr_t mask,
               uintptr_t stats, int64_t ss0, int64_t ss1, float threshold, int threads) {
  if (tokens < 0 || channels < 0) throw std::invalid_argument("act_stats_: negative extent");
  if (!stats && channels > 0) throw std::invalid_argument("act_stats_: null stats pointer");
  const Tensor2D t = tensor(x, dtype, s0, s1, tokens * channels, "act_stats_ input");
  py::gil_scoped_release nogil;
  LPT_DISPATCH(act_stats, t, tokens, channels, (const uint8_t*)mask, (double*)stats, ss0, ss1, threshold,
               threads < 1 ? 1 : threads);
}

void rollback(uintptr_t target, int tdtype, int64_t ts0, int64_t ts1, uintptr_t source, int sdtype, int64_t ss0,
              int64_t ss1, int64_t rows, int64_t cols, uintptr_t index, int64_t n_index, int axis, int64_t block,
              float alpha, bool compact, int threads) {
  check_dtype(tdtype, "rollback_ target");
  if (rows < 0 || cols < 0 || n_index < 0) throw std::invalid_argument("rollback_: negative extent");
  if (!target && rows * cols > 0) throw std::invalid_argument("rollback_: null target pointer");
  if (axis != 0 && axis != 1) throw std::invalid_argument("rollback_: axis must be 0 or 1");
  if (block < 1 || (axis == 0 ? rows : cols) % block)
    throw std::invalid_argument("rollback_: block must divide the axis");
  if (n_index > 0 && !index) throw std::invalid_argument("rollback_: null index pointer");
  // A compact source holds n_index * block lines along the axis; otherwise target's shape.
  const int64_t s_elems = compact ? n_index * block * (axis == 0 ? cols : rows) : rows * cols;
  const Tensor2D s = tensor(source, sdtype, ss0, ss1, s_elems, "rollback_ source");
  if (n_index == 0 || rows * cols == 0) return;  // nothing to move
  py::gil_scoped_release nogil;
  LPT_DISPATCH(rollback, (void*)target, tdtype, ts0, ts1, s, rows, cols, (const int64_t*)index, n_index, axis, block,
               alpha, compact, threads < 1 ? 1 : threads);
}

// masked_cosine's finish on the CPU: from a unit_gram Gram [n, m, m] (float32, contiguous), per-unit cosines of
// deltas a and b into out [n] and the pooled cosine over all n units (returned), in fp64; 0 where a norm is 0.
// One pass instead of a dozen small torch ops, which cost more than the kernel for a few thousand units.
float gram_cosines(uintptr_t gram, int64_t n, int64_t m, int64_t a, int64_t b, uintptr_t out) {
  const float* g = (const float*)gram;
  float* o = (float*)out;
  if (n > 0 && (!g || !o)) throw std::invalid_argument("gram_cosines: null pointer");
  auto cosine = [](double dot, double aa, double bb) {
    const double den = std::sqrt(aa * bb);
    return den > 0.0 ? (float)(dot / den) : 0.0f;
  };
  double sd = 0.0, sa = 0.0, sb = 0.0;
  for (int64_t u = 0; u < n; ++u) {
    const float* x = g + u * m * m;
    const double dot = x[a * m + b], aa = x[a * m + a], bb = x[b * m + b];
    o[u] = cosine(dot, aa, bb);
    sd += dot, sa += aa, sb += bb;
  }
  return cosine(sd, sa, sb);
}

// One scan of n int64 unit ids: -1 if one is negative or >= n_units, 1 if they strictly increase (already sorted
// and duplicate-free, as selections usually are), else 0. Saves ops.py a sort and two reductions per call.
int index_order(uintptr_t index, int64_t n, int64_t n_units) {
  const int64_t* p = (const int64_t*)index;
  if (n > 0 && !p) throw std::invalid_argument("index_order: null index pointer");
  bool increasing = true;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < 0 || p[i] >= n_units) return -1;
    increasing = increasing && (i == 0 || p[i] > p[i - 1]);
  }
  return increasing ? 1 : 0;
}

// The read ceiling of the benchmarks: sum every 64-bit word of the given buffers with the same threads the kernels
// use. The buffers are read as one stream, in order, split into one contiguous share a thread; each thread reads
// with four independent sums and prefetches 1 KiB ahead of its position in that stream (into the next buffer near
// the end of one: scattered rows, the gather ceiling of masked_cosine, are read like the kernel reads its listed
// rows), as the kernels do; it only has to keep up with memory.
uint64_t stream_read(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& nbytes, int threads) {
  if (ptrs.size() != nbytes.size()) throw std::invalid_argument("stream_read: one byte count per buffer");
  const int64_t nb = (int64_t)ptrs.size();
  std::vector<int64_t> start(nb + 1, 0);  // first word of each buffer in the stream
  for (int64_t b = 0; b < nb; ++b) start[b + 1] = start[b] + nbytes[b] / 8;
  const int64_t n = start[nb];
  constexpr int64_t kAhead = 128;  // words
  uint64_t total = 0;
  py::gil_scoped_release nogil;
#pragma omp parallel reduction(+ : total) num_threads(threads < 1 ? 1 : threads)
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
    int64_t b = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    int64_t pb = b;  // prefetch cursor: buffer pb, kAhead words on in the stream
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int64_t pos = lo; pos < hi; ++b) {
      const uint64_t* x = (const uint64_t*)ptrs[b] - start[b];  // x[pos]: word pos of the stream
      const int64_t end = std::min(hi, start[b + 1]);
      int64_t i = pos;
      for (; i + 32 <= end; i += 32) {
        int64_t q = i + kAhead;
        while (pb + 1 < nb && q >= start[pb + 1]) ++pb;
        if (q < start[pb + 1])
          for (int l = 0; l < 4; ++l) __builtin_prefetch((const uint64_t*)ptrs[pb] + (q - start[pb]) + 8 * l);
        for (int j = 0; j < 8; ++j) a0 += x[i + j], a1 += x[i + 8 + j], a2 += x[i + 16 + j], a3 += x[i + 24 + j];
      }
      for (; i < end; ++i) a0 += x[i];
      pos = end;
    }
    total += a0 + a1 + a2 + a3;
  }
  return total;
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "lpt_kernels CPU kernels (C++/OpenMP, runtime ISA dispatch)";
  m.def("unit_gram", &unit_gram);
  m.def("act_stats", &act_stats);
  m.def("rollback", &rollback);
  m.def("set_isa", &set_isa, "Force an instruction-set variant: auto, base, avx2 or avx512.");
  m.def("isa", []() { return std::string(isa_name(g_isa)); }, "The instruction-set variant in use.");
  m.def("set_tuning", &set_tuning, "Force the vendor-specific tuning: auto (the CPU's), amd or intel.");
  m.def("tuning", []() { return std::string(amd_core() ? "amd" : "intel"); }, "The vendor tuning in effect.");
  m.def("gram_cosines", &gram_cosines, "Per-unit and pooled cosines of deltas a, b from a Gram [n, m, m].");
  m.def("index_order", &index_order, "Unit ids: -1 out of range, 1 strictly increasing, 0 otherwise.");
  add_diff_helpers(m);
  m.def("stream_read", &stream_read, "Benchmark read ceiling: sum the 64-bit words of the buffers.");
  m.def("best_isa", []() { return std::string(isa_name(g_best)); });
}
