// unit_gram on the CPU: one pass over K inputs giving, per unit, the Gram matrix of the M deltas and their abs sum,
// abs max, exact-zero and near-zero counts.
//
// The statistics of M deltas are NG = M(M+1)/2 Gram entries plus 4M per-delta values, accumulated lane-wise in fp32 /
// int32 vectors (each lane does lpt/element.h's arithmetic on one element) over strips of consecutive elements of a
// row, and folded into fp64 at a bounded rate, so the fp32 rounding error is that of a few hundred terms at most.
//
// - axis 0 (a unit is `block` rows): each thread streams whole rows of the K inputs side by side, strip after strip,
//   with the accumulators in registers, and folds them into fp64 lanes every kFold strips, prefetching kPrefetch0
//   (kPrefetch0Amd) bytes ahead in software. Listed (gathered) units prefetch the next unit's row while the last row
//   of a unit is read (into L2 on AMD, with a short prefetch within the row into L1).
// - axis 1 (a unit is `block` columns): each thread owns a range of columns. For a block of row_block() rows it walks
//   its columns strip by strip (all in one call), running down the block's rows with the accumulators in registers,
//   then adds the strip into per-column 32-bit sums (L2-resident, laid out group by group, the two counts packed in
//   one int32); those are folded into fp64 every kFoldRows rows. The block's row streams are prefetched in software.
//   Listed columns are gathered into buffers, or on AMD, where they touch a third of a row's lines or more, computed
//   as all columns in place (dense_columns).
//
// The near-zero test is specialised on the tolerances (NearZero): with atol = rtol = 0 it is the zero test and is not
// computed twice; with rtol = 0 the bound is the constant atol; only rtol > 0 needs |w_ref| per element, and there the
// product rtol * |w_ref| is rounded before atol is added (vmul_rn: never an fma, the contract of every backend).
//
// Up to kStaticM deltas (K <= 5) the accumulators are sized at compile time and live in registers (StaticKern); more
// deltas (K = 6..8) go through passes over an L1 buffer of each strip's deltas, a few accumulators a pass (DynKern:
// M and the mode known at run time, to keep the build small). The
// hot loop (strips<DT>) is instantiated per dtype, the drivers around it are dtype-free. Inputs of one dtype with
// unit inner stride (the common case) are read in place (load_pair / load_vec_p); mixed dtypes, other strides and
// listed columns go through small fp32 buffers (load_run / load_gather). Inputs all contiguous along axis 0 instead
// (transposed views) are handled as their transposes. Elements that do not fill a strip use lpt/element.h's scalar
// functions.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "load.h"

namespace lpt {
namespace cpu {
namespace LPT_ISA {
namespace {

constexpr int kMaxInputs = 8;
constexpr int kMaxM = 8;             // deltas (given mode, 8 inputs)
constexpr int kMaxNG = kMaxM * (kMaxM + 1) / 2;
constexpr int kStaticM = 4;          // register-resident accumulators up to this many deltas (K <= 5)
constexpr int64_t kRun = 512;        // buffered axis 0: elements per input per step (a multiple of every strip)
// axis 0: strips accumulated in fp32 before folding into fp64 (a strip's pair adds 2 terms to a lane). 160 takes a
// 2560-element row (Qwen3-4B's hidden size) in one call with AVX2: K = 2's roof 17.4 -> 18.3 GB/s on a Zen 3 (128).
constexpr int64_t kFold = 160;
// axis 1: most rows accumulated in registers per strip (see row_block). 16 on the Xeon with AVX-512; with AVX2 on a
// Zen 3, 8 (16 row streams at K = 2) took K = 2 from 0.56-0.64 of the read ceiling to 0.75-0.78 (4: 0.66). With
// AVX-512 on a Zen 4, K = 2 takes 4 (kRowBlockAmd2): 0.37-0.44 -> 0.68-0.77 (8: 0.49, 2: 0.59), one thread 0.33 ->
// 0.85; K >= 3 takes 32 (kRowBlockAmd, 96-160 row streams, which the software prefetch keeps fed): its flush into
// the L2-resident column sums (22 read-modify-writes of a line per strip at K = 5) then comes every 32 rows instead
// of 8: K = 5 0.35-0.37 -> 0.50-0.54 (16: 0.47, 64: 0.51), K = 3 0.50 -> 0.54 (column tiles that keep the sums in
// L1 lost more to 512-byte row pieces than they saved: K = 2 0.70 -> 0.41-0.50, K = 5 0.37 -> 0.35-0.42). With AVX2
// on a Zen 3, K >= 3 takes 4 (alternated runs, 8 rows -> 4: down_proj K = 3 0.57 -> 0.83, K = 4 0.46 -> 0.67, K = 5
// 0.38 both (16 the same, 2 0.39); o_proj-shaped [2560, 4096] K = 3 0.45 -> 0.55, K = 5 0.30 -> 0.32), K = 2 keeps 8
// (4: 0.85 -> 0.81).
constexpr int64_t kRowBlock = kVRegs >= 32 ? 16 : 8;
constexpr int64_t kRowBlockAmd2 = kVRegs >= 32 ? 4 : 8;
constexpr int64_t kRowBlockAmd = kVRegs >= 32 ? 32 : 4;
// K > 5 on AMD: DynKern's passes over a strip of rb rows end in an add of every statistic into the column sums; on a
// Zen 3, K = 6 down_proj columns 0.24 (4 rows) -> 0.27 (8; 16 0.25, 32 0.24) of the read ceiling.
constexpr int64_t kRowBlockDyn = 8;
constexpr int kMaxStreams = 40;      // axis 1: most row streams (inputs x rows) of a register block
constexpr int64_t kFoldRows = 256;   // axis 1: rows accumulated in fp32 column sums before folding into fp64
// axis 1: bytes ahead in each row stream; 128 in AMD's 32-row blocks (K = 5 0.53 -> 0.57 of the read ceiling in
// alternated runs, 192 the same, 64 0.47: with 96-160 streams a step, a few steps ahead is already ~1 us ahead);
// 256 with AVX2 on AMD (kPrefetchAmd2; on a Zen 3, down_proj columns K = 2 0.84 -> 0.86, K = 4 0.46 -> 0.50, K = 5
// 0.30-0.32 -> 0.32-0.34 at 8 rows a block, K = 3 0.59 both, and 0.83 / 0.82 at 4 rows; 128: K = 2 0.57).
constexpr int64_t kPrefetch = 512;
constexpr int64_t kPrefetchAmd = 128;
constexpr int64_t kPrefetchAmd2 = 256;
// axis 0: bytes ahead in each input's row. The hardware prefetchers alone left K = 5 at ~10.5 GB/s on page-cache
// mappings (4 KiB pages, 5 streams a thread); 1 KiB ahead made it 14.3 (512: 12.7, 2048: 13.3), anonymous memory too.
// With AVX-512 on a Zen 4, 512 (kPrefetch0Amd): K = 2 0.75 -> 0.83 of the read ceiling, K = 5 0.65 -> 0.67 (256:
// 0.74 and 0.63; 2048: 0.72 at K = 2), in alternated runs.
constexpr int64_t kPrefetch0 = 1024;
constexpr int64_t kPrefetch0Amd = kVRegs >= 32 ? 512 : kPrefetch0;
constexpr int64_t kPrefetchListedAmd = 512;  // axis 0, listed rows on AMD: bytes ahead within the row (see axis0)
// axis 0, K > 5 (DynKern, whose passes read one new input at a time): bytes ahead in each input as a pass reads it.
// On a Zen 3, K = 6 rows 0.35 -> 0.43 of the read ceiling against a burst of prefetches at each call's start (1536,
// 2560 and 4096 bytes ahead the same).
constexpr int64_t kPrefetchDyn = 2048;
static_assert(kFoldRows % kRowBlock == 0 && kFoldRows % kRowBlockAmd2 == 0 && kFoldRows % kRowBlockAmd == 0 &&
                  kFoldRows % kRowBlockDyn == 0,
              "column sums fold at row block boundaries");

// Axis 1 rows per register block for k inputs (direct: read in place; else gathered into chunk buffers, which hold
// the block's rows). Fewer rows cost more flushes per element; more cost misses on the Xeon, since the block's
// k * rows row streams are read side by side (measured on 2560 x 9728 bf16 there: k = 2 best at 16 rows, k = 5 at
// 8; k = 5 at 16 rows took 1.5x as long from memory, at 4 as long). A power of two dividing kFoldRows.
inline int64_t row_block(int k, bool direct) {
  if (k > 5 && amd_core()) return kRowBlockDyn;
  if (direct && k >= 3 && amd_core()) return kRowBlockAmd;
  int64_t rb = k <= 2 && amd_core() ? kRowBlockAmd2 : kRowBlock;
  while (rb > 2 && rb * k > kMaxStreams) rb /= 2;
  return rb;
}
constexpr int kMaxStrip = 32;  // widest strip (elements)

// The two counts of a delta share one int32 lane, zeros in the high half and near zeros in the low half: a zero adds
// kZeroOne, a near zero 1 (with atol = rtol = 0 a zero is the one test and adds kZeroOne + 1). Register lanes count at
// most kMaxLaneCount elements between folds, the packed column sums of axis 1 kFoldRows.
constexpr int32_t kZeroOne = 1 << 16;
constexpr int64_t kMaxLaneCount = std::max(2 * kFold, kFoldRows);
static_assert(kMaxLaneCount < kZeroOne, "packed counts must not overflow their 16 bits");

// Runtime description of the call.
struct Ctx {
  int m, mode, k;
  float atol, rtol;
};

constexpr int num_inputs(int mode, int m) { return mode == kGiven ? m : m + 1; }

// How the vector kernels count near zeros (|d| <= atol + rtol * |w_ref|): kNzZero when atol = rtol = 0 (the same
// count as the exact zeros, for any d including NaN and -0), kNzAbs when the bound is the constant atol (rtol = 0,
// or given mode, whose reference is 0), kNzRel otherwise.
enum NearZero : int { kNzZero = 0, kNzAbs = 1, kNzRel = 2 };

// ---- scalar path (strip tails): lpt/element.h per element ---------------------------------------------------------

template <int W>
struct Lanes {
  float g[kMaxNG][W];
  float s[kMaxM][W];
  float mx[kMaxM][W];
  int32_t z[kMaxM][W];
  int32_t nz[kMaxM][W];
  void clear() { std::memset(this, 0, sizeof *this); }
};

template <int MODE, int W>
void step_t(Lanes<W>& a, const float* w, int l, int M, float atol, float rtol) {
  float d[kMaxM];
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

// One element with loaded values w[0..K-1] into lane l.
template <int W>
void step(Lanes<W>& a, const float* w, int l, const Ctx& c) {
  if (c.mode == kConsecutive) step_t<kConsecutive>(a, w, l, c.m, c.atol, c.rtol);
  else if (c.mode == kBase) step_t<kBase>(a, w, l, c.m, c.atol, c.rtol);
  else step_t<kGiven>(a, w, l, c.m, c.atol, c.rtol);
}

// Element i of an input (any dtype), widened.
inline float load_elem(const Tensor2D& t, int64_t i) {
  switch (t.dtype) {
    case kF32: return load_f32<kF32>(t.data, i);
    case kBF16: return load_f32<kBF16>(t.data, i);
    default: return load_f32<kF16>(t.data, i);
  }
}

// Per-unit fp64 totals.
struct Totals {
  double g[kMaxNG];
  double s[kMaxM];
  float mx[kMaxM];
  int64_t z[kMaxM];
  int64_t nz[kMaxM];
  // Only the entries of M deltas, which are all that is read: a memset of the whole struct was a `rep stos` (~30
  // cycles to start) twice a unit on axis 0, ~1/20 of a 2560-element row's time at K = 2.
  void clear(int M) {
    for (int p = 0; p < M * (M + 1) / 2; ++p) g[p] = 0.0;
    for (int m = 0; m < M; ++m) s[m] = 0.0, mx[m] = 0.0f, z[m] = 0, nz[m] = 0;
  }
  template <int W>
  void add_lane(const Lanes<W>& a, int l, int M) {
    for (int p = 0; p < M * (M + 1) / 2; ++p) g[p] += a.g[p][l];
    for (int m = 0; m < M; ++m) {
      s[m] += a.s[m][l];
      mx[m] = std::max(mx[m], a.mx[m][l]);
      z[m] += a.z[m][l];
      nz[m] += a.nz[m][l];
    }
  }
  void store(const GramOut& out, int64_t u, int M) const {
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

// Scalar tail of one row segment: elements [i0, i1) of rows that start at element offsets off[k].
inline void tail_row(Totals& tot, const Tensor2D* ws, const int64_t* off, int64_t step_, int64_t i0, int64_t i1,
                     const Ctx& c) {
  Lanes<1> lanes;
  lanes.clear();
  for (int64_t i = i0; i < i1; ++i) {
    float w[kMaxInputs];
    for (int k = 0; k < c.k; ++k) w[k] = load_elem(ws[k], off[k] + i * step_);
    step(lanes, w, 0, c);
  }
  tot.add_lane(lanes, 0, c.m);
}

// ---- vector accumulators ------------------------------------------------------------------------------------------

// fp64 lanes of the sums and counts, fp32 lanes of the maxima: one axis-0 unit's running totals.
template <int NM>
struct VTot {
  static constexpr int NG = NM * (NM + 1) / 2;
  vd g[NG], s[NM], z[NM], nz[NM];
  vf mx[NM];
  int64_t zc[NM], nzc[NM];  // counts kept in scalar registers (VAcc's SC)
  void clear() {
    for (auto& v : g) v = vd{};
    for (int m = 0; m < NM; ++m) s[m] = z[m] = nz[m] = vd{}, mx[m] = vf{}, zc[m] = nzc[m] = 0;
  }
  void reduce_into(Totals& t, int M) const {
    for (int p = 0; p < M * (M + 1) / 2; ++p) t.g[p] += hsum(g[p]);
    for (int m = 0; m < M; ++m) {
      t.s[m] += hsum(s[m]);
      t.mx[m] = std::max(t.mx[m], hmax(mx[m]));
      t.z[m] += (int64_t)hsum(z[m]) + zc[m];
      t.nz[m] += (int64_t)hsum(nz[m]) + nzc[m];
    }
  }
};

// Per-column totals of axis 1 (tensor columns, or listed positions when gathering). Strips are added into 32-bit sums
// (c32: stat index NG gram entries, M abs sums, M packed counts (int32, see kZeroOne), then M maxima) once per row
// block; every kFoldRows rows the sums are folded into fp64 (c64: NG gram entries, M abs sums, M zero counts, M
// near-zero counts). Both are laid out group by group of kW columns, all statistics of a group together
// ([group][stat][kW]), so that adding a strip touches a few contiguous lines rather than one line in each of NS
// arrays (which fall into the same L1 sets and thrash).
struct ColTotals {
  int M, NG, NS, ZC, MX;  // NS statistics a column; c32's packed counts at ZC, maxima at MX
  int64_t n;
  int lane[kW];             // lane of column col % kW: load_vec_p's order (strips of one vector of a 16-bit dtype read
                           // in place) or the element order
  Scratch<float, 0> s32;   // c32: [groups][NS][kW]
  Scratch<double, 1> s64;  // c64: [groups][NS][kW]
  float* c32;
  double* c64;
  ColTotals(int M_, int64_t n_, bool perm_)
      : M(M_), NG(M_ * (M_ + 1) / 2), NS(NG + 3 * M_), ZC(NG + M_), MX(NG + 2 * M_), n(n_),
        s32((n_ + kW - 1) / kW * NS * kW), s64((n_ + kW - 1) / kW * NS * kW), c32(s32.data()), c64(s64.data()) {
    for (int e = 0; e < kW; ++e) lane[e] = perm_ ? p_lane(e) : e;
  }

  int64_t at(int64_t col, int st) const { return ((col / kW) * NS + st) * kW + lane[col % kW]; }
  float* f32(int64_t col, int st) { return c32 + at(col, st); }
  const float* f32(int64_t col, int st) const { return c32 + at(col, st); }
  const double* f64(int64_t col, int st) const { return c64 + at(col, st); }

  template <int W>
  void add_lane(const Lanes<W>& a, int l, int64_t col) {
    for (int p = 0; p < NG; ++p) *f32(col, p) += a.g[p][l];
    for (int m = 0; m < M; ++m) {
      *f32(col, NG + m) += a.s[m][l];
      int32_t zc;
      memcpy(&zc, f32(col, ZC + m), 4);
      zc += a.z[m][l] * kZeroOne + a.nz[m][l];
      memcpy(f32(col, ZC + m), &zc, 4);
      float* mx = f32(col, MX + m);
      *mx = std::max(*mx, a.mx[m][l]);
    }
  }

  // c64 += c32 (the packed counts unpacked), c32 = 0 (not the maxima) over the groups of columns [lo, hi) (lo a
  // multiple of kW). An empty range folds nothing: a thread left without columns (lo = hi = n) would otherwise fold
  // the last, partial group, which another thread is still adding into.
  void fold(int64_t lo, int64_t hi) {
    if (lo >= hi) return;
    for (int64_t g = lo / kW; g < (hi + kW - 1) / kW; ++g) {
      float* a = c32 + g * NS * kW;
      double* b = c64 + g * NS * kW;
      for (int i = 0; i < ZC * kW; ++i) b[i] += a[i], a[i] = 0.0f;
      for (int i = ZC * kW; i < MX * kW; ++i) {
        uint32_t zc;
        memcpy(&zc, a + i, 4);
        b[i] += zc >> 16, b[i + M * kW] += zc & (kZeroOne - 1), a[i] = 0.0f;
      }
    }
  }

  // Another part's folded totals added into these over the groups of kW columns [g0, g1): sums and counts (c64)
  // added, maxima (c32) taken.
  void merge(const ColTotals& o, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int i = 0; i < NS * kW; ++i) c64[g * NS * kW + i] += o.c64[g * NS * kW + i];
      for (int i = MX * kW; i < NS * kW; ++i)
        c32[g * NS * kW + i] = std::max(c32[g * NS * kW + i], o.c32[g * NS * kW + i]);
    }
  }

  // The outputs of units [u0, u1) (all their columns folded).
  void store_units(int64_t u0, int64_t u1, int64_t block, const GramOut& out) const {
    if (block == 1) {  // one column a unit (MLP neurons): its totals are the unit's, no per-unit Totals to sum into
      for (int64_t u = u0; u < u1; ++u) {
        const double* t = f64(u, 0);
        int p = 0;
        for (int a = 0; a < M; ++a) {
          for (int b = a; b < M; ++b, ++p) {
            const float g = (float)(0.0 + t[p * kW]);  // 0.0 + : as Totals sums from +0
            out.gram[(u * M + a) * M + b] = g;
            out.gram[(u * M + b) * M + a] = g;
          }
          out.abs_sum[u * M + a] = (float)(0.0 + t[(NG + a) * kW]);
          out.zeros[u * M + a] = (int64_t)t[(NG + M + a) * kW];
          out.near_zeros[u * M + a] = (int64_t)t[(NG + 2 * M + a) * kW];
          out.abs_max[u * M + a] = std::max(0.0f, *f32(u, MX + a));
        }
      }
      return;
    }
    for (int64_t u = u0; u < u1; ++u) {
      Totals t;
      t.clear(M);
      for (int64_t col = u * block; col < (u + 1) * block; ++col) {
        for (int p = 0; p < NG; ++p) t.g[p] += *f64(col, p);
        for (int m = 0; m < M; ++m) {
          t.s[m] += *f64(col, NG + m);
          t.z[m] += (int64_t)*f64(col, NG + M + m);
          t.nz[m] += (int64_t)*f64(col, NG + 2 * M + m);
          t.mx[m] = std::max(t.mx[m], *f32(col, MX + m));
        }
      }
      t.store(out, u, M);
    }
  }
};

LPT_VINLINE void col_add(float* p, const vf& v) { store_vf(p, load_vf(p) + v); }
LPT_VINLINE void col_add(float* p, const vi& v) {
  vi x;
  memcpy(&x, p, sizeof x);
  x += v;
  memcpy(p, &x, sizeof x);
}
LPT_VINLINE void col_max(float* p, const vf& v) { store_vf(p, vmax(v, load_vf(p))); }

enum UpdatePart : int { kAll = 0, kGram = 1, kStats0 = 2, kStats1 = 3 };

// Accumulators of one strip: U sets of kW lanes per statistic, sized by M at compile time. The two counts of a delta
// share one int32 lane (see kZeroOne), so that K = 5 keeps its 22 accumulators and its inputs in the 32 registers
// (separate counts spilled 4 of them to the stack). With SC (axis 0, where a unit's counts are not per lane; AVX-512
// on AMD), the counts are instead the popcounts of the compare masks, added in scalar registers: a mask's move to a
// general register and the popcount leave the vector pipes, where the masked adds took 8 of K = 5's 47 operations a
// vector (on a Zen 4, 6 adds + 6 FMAs + 6 compares + 6 masked adds issue in 14.4 cycles, with mask moves and
// popcounts instead in 12.2: the FMA pipe pair's 12).
template <int M, int MODE, int NZ, int U, bool SC = false>
struct VAcc {
  static constexpr int NG = M * (M + 1) / 2;
  static constexpr int K = num_inputs(MODE, M);
  static constexpr int kU = U;
  vf g[NG][U], s[M][U], mx[M][U];
  vi z[M][U];  // zeros * kZeroOne + near zeros
  int64_t zc[M], nzc[M];  // with SC: zeros, near zeros

  LPT_VINLINE void clear() {
    for (int u = 0; u < U; ++u) {
      for (int p = 0; p < NG; ++p) g[p][u] = vf{};
      for (int m = 0; m < M; ++m) s[m][u] = mx[m][u] = vf{}, z[m][u] = vi{};
    }
    for (int m = 0; m < M; ++m) zc[m] = nzc[m] = 0;
  }
  LPT_VINLINE vi zeros(int m, int u) const { return (vi)((vu)z[m][u] >> 16); }
  LPT_VINLINE vi near_zeros(int m, int u) const { return z[m][u] & (kZeroOne - 1); }

  // Set u from the loaded inputs w[0..K-1]: lpt/element.h's delta, delta_ref, abs_update, is_zero and is_near_zero,
  // lane-wise (thr0: the near-zero bound of a given delta, atol + rtol * 0).
  // PART (see kAll): kAll every statistic; kGram the Gram entries; kStats0 / kStats1 the sums, maxima and counts of
  // the first / second half of the deltas.
  template <int PART = kAll>
  LPT_VINLINE void update(const vf* w, int u, float atol, float rtol, float thr0) {
#if defined(__AVX512F__)
    const vf zero = {};
    const vi one = vi{} + 1, zero_one = vi{} + (NZ == kNzZero ? kZeroOne + 1 : kZeroOne);
#endif
    vf d[M];
    for (int m = 0; m < M; ++m) d[m] = MODE == kConsecutive ? w[m + 1] - w[m] : MODE == kBase ? w[m + 1] - w[0] : w[m];
    int p = 0;
    for (int x = 0; x < M && (PART == kAll || PART == kGram); ++x)
      for (int y = x; y < M; ++y, ++p) g[p][u] += d[x] * d[y];
    vf thr_base = {};
    if (MODE == kBase && NZ == kNzRel) thr_base = vmul_rn(vf{} + rtol, vabs(w[0])) + atol;
    constexpr int m0 = PART == kStats1 ? M / 2 : 0, m1 = PART == kGram ? 0 : PART == kStats0 ? M / 2 : M;
    for (int m = m0; m < m1; ++m) {
      const vf a = vabs(d[m]);
      s[m][u] += a;
      mx[m][u] = vmax(a, mx[m][u]);
#if defined(__AVX512F__)  // compares into mask registers and masked adds, or with SC popcounts
      if (SC) {
        zc[m] += __builtin_popcount(_mm512_cmp_ps_mask(d[m], zero, _CMP_EQ_OQ));
        if (NZ == kNzAbs) {
          nzc[m] += __builtin_popcount(_mm512_cmp_ps_mask(a, zero + thr0, _CMP_LE_OQ));
        } else if (NZ == kNzRel) {
          const vf thr = MODE == kBase ? thr_base : vmul_rn(vf{} + rtol, vabs(w[m])) + atol;
          nzc[m] += __builtin_popcount(_mm512_cmp_ps_mask(a, thr, _CMP_LE_OQ));
        }
        continue;
      }
      z[m][u] = d[m] == zero ? z[m][u] + zero_one : z[m][u];
      if (NZ == kNzAbs) {
        z[m][u] = a <= thr0 ? z[m][u] + one : z[m][u];
      } else if (NZ == kNzRel) {
        const vf thr = MODE == kBase ? thr_base : vmul_rn(vf{} + rtol, vabs(w[m])) + atol;
        z[m][u] = a <= thr ? z[m][u] + one : z[m][u];
      }
#else  // lane masks counted by count_both / count_pair; d == 0 exactly when the bits of |d| are 0
      const vi eq = (vi)a == vi{};
      if (NZ == kNzZero) {
        z[m][u] = count_both(z[m][u], eq);
      } else if (NZ == kNzAbs) {
        z[m][u] = count_pair(z[m][u], eq, (vi)a < vi{} + below_bits(thr0));
      } else {
        const vf thr = MODE == kBase ? thr_base : vmul_rn(vf{} + rtol, vabs(w[m])) + atol;
        z[m][u] = count_pair(z[m][u], eq, (vi)(a <= thr));
      }
#endif
    }
  }

  // The strip at byte offset off of the K rows q (dtype DT, unit stride): kW*U elements, or with PAIR a pair of
  // vectors into the same single set (U == 1; see StaticKern::G0).
  template <int DT, bool PAIR, int PART = kAll>
  LPT_VINLINE void load_update(const char* const* q, int64_t off, float atol, float rtol, float thr0) {
    vf a[K], b[K];
    if (U == 2 || PAIR) {
      for (int k = 0; k < K; ++k) load_pair<DT>(q[k] + off, 0, a[k], b[k]);
      update<PART>(a, 0, atol, rtol, thr0);
      update<PART>(b, U - 1, atol, rtol, thr0);
    } else {
      for (int k = 0; k < K; ++k) a[k] = load_vec_p<DT>(q[k] + off, 0);  // only axis 1 comes here
      update<PART>(a, 0, atol, rtol, thr0);
    }
  }

  LPT_VINLINE void fold(VTot<M>& t) const {
    for (int u = 0; u < U; ++u) {
      for (int p = 0; p < NG; ++p) t.g[p] += widen(g[p][u]);
      for (int m = 0; m < M; ++m) {
        t.s[m] += widen(s[m][u]);
        t.mx[m] = vmax(mx[m][u], t.mx[m]);
        if (SC) continue;
        t.z[m] += widen(zeros(m, u));
        t.nz[m] += widen(near_zeros(m, u));
      }
    }
    for (int m = 0; m < M && SC; ++m) t.zc[m] += zc[m], t.nzc[m] += NZ == kNzZero ? zc[m] : nzc[m];
  }

  // Into the column totals at columns col .. col + kW*U (col a multiple of kW; lanes in element order first, see
  // load_pair).
  template <int DT>
  LPT_VINLINE void flush(ColTotals& t, int64_t col) const {
    float* c = t.f32(col, 0);
    float* c2 = c + t.NS * kW;  // the next group of kW columns
    auto add = [&](int st, vf x, vf y) {
      if (U == 2) pair_order<DT>(x, y), col_add(c2 + st * kW, y);
      col_add(c + st * kW, x);
    };
    for (int p = 0; p < NG; ++p) add(p, g[p][0], g[p][U - 1]);
    for (int m = 0; m < M; ++m) {
      add(NG + m, s[m][0], s[m][U - 1]);
      vf x = (vf)z[m][0], y = (vf)z[m][U - 1];  // packed counts: moved as bits, added as int32
      if (U == 2) pair_order<DT>(x, y), col_add(c2 + (NG + M + m) * kW, (vi)y);
      col_add(c + (NG + M + m) * kW, (vi)x);
      x = mx[m][0], y = mx[m][U - 1];
      if (U == 2) pair_order<DT>(x, y), col_max(c2 + (NG + 2 * M + m) * kW, y);
      col_max(c + (NG + 2 * M + m) * kW, x);
    }
  }
};

// ---- kernels: the hot loop of one accumulator kind ---------------------------------------------------------------
//
// strips<DT>: n steps over the K inputs, pointers q[k] advancing by st bytes a step, one strip (G elements of
// dtype DT, unit stride) per step; then the accumulators are folded into vt (axis 0) or added into the column totals
// at col (axis 1). With prefetch, also prefetches pfo bytes ahead of every step. One instantiation per dtype; the
// drivers below are dtype-free and call it through a pointer.
struct StripArgs {
  const char* const* q;
  int64_t st;
  int64_t pfo;
  int64_t n;
  bool prefetch;
  int64_t pf_steps = INT64_MAX;  // with prefetch: the first pf_steps steps prefetch pfo ahead
  int64_t pf_next = 0;           // with prefetch: bytes to the next listed row, prefetched into L2 every step
};

// Axis 1 read in place: a block of n rows, strips of columns [col0, col1) (multiples of G on from col0).
struct ColArgs {
  const char* const* q;  // each input at the block's first row, column `base`
  int64_t st;            // row stride (bytes)
  int64_t n;             // rows
  int64_t col0, col1;
  int64_t wrap;          // bytes from the block's first row to the next block's (where the prefetch runs on)
  int64_t base = 0;      // the column q points at
  int64_t pf = kPrefetch;  // bytes ahead in each row stream
};
using ColsFn = void (*)(const ColArgs&, const Ctx&, ColTotals&);

// Registers, M <= kStaticM. Two sets of accumulators when they (and the inputs) fit the registers: then a strip is
// a pair of vectors (load_pair), else one vector.
template <int M, int MODE, int NZ>
struct StaticKern {
  static constexpr int U = 2 * (M * (M + 1) / 2 + 3 * M) + 5 <= kVRegs ? 2 : 1;
  static constexpr int64_t G = kW * U;  // strip width
  // Axis 0 strips are always a pair of vectors: with one set of accumulators (U == 1) both vectors of a pair add
  // into the same lanes. A unit there sums over all its elements, so which lane takes which element is free, and a
  // pair costs one load and one operation per vector for 16-bit dtypes (load_pair) instead of a widening load
  // (a shuffle) and a shift. Axis 1 keeps lanes = columns.
  static constexpr int64_t G0 = 2 * kW;
  // Axis 0 in three passes over each run of kFold strips (<= 5 KB an input with AVX2: in L1 for the second and
  // third) where one pass's accumulators and inputs do not fit the registers: K = 5 with 16 registers (22
  // accumulators; in one pass 40 of the loop's 159 instructions a 16-position step were spill loads and stores).
  static constexpr bool kSplit = U == 1 && M >= 4 && kVRegs < 32;
  static_assert(G <= kMaxStrip && G0 <= kMaxStrip, "tails and gather buffers hold one strip");
  using Tot = VTot<M>;

  // n steps of one strip (a pair of vectors with PAIR) into acc, the pointers p[k] advancing by st bytes a step; with
  // PREFETCH, also prefetches pfo bytes ahead of the first pf_steps steps, and pf_next bytes ahead (into L2) of every
  // step if pf_next != 0.
  template <int DT, bool PAIR, bool PREFETCH, int PART = kAll, class Acc>
  static LPT_VINLINE void run_rows(Acc& acc, const char* const* p, int64_t n, int64_t st, int64_t pfo, const Ctx& c,
                                   int64_t pf_steps = INT64_MAX, int64_t pf_next = 0) {
    constexpr int K = num_inputs(MODE, M);
    constexpr int kLines = ((PAIR ? G0 : kW * Acc::kU) * (DT == kF32 ? 4 : 2) + 63) / 64;
    const float atol = c.atol, rtol = c.rtol, thr0 = near_bound(0.0f, atol, rtol);
    for (int64_t j = 0, off = 0; j < n; ++j, off += st) {
      if (PREFETCH) {
        if (j < pf_steps)
          for (int k = 0; k < K; ++k)
            for (int l = 0; l < kLines; ++l) __builtin_prefetch(p[k] + off + pfo + 64 * l);
        if (pf_next)
          for (int k = 0; k < K; ++k)
            for (int l = 0; l < kLines; ++l) __builtin_prefetch(p[k] + off + pf_next + 64 * l, 0, 2);
      }
      acc.template load_update<DT, PAIR, PART>(p, off, atol, rtol, thr0);
    }
  }

  template <int DT, bool AXIS0, bool SC = false>
  static void strips(const StripArgs& a, const Ctx& c, Tot* vt, ColTotals* ct, int64_t col) {
    VAcc<M, MODE, NZ, U, SC> acc;
    acc.clear();
    if (AXIS0 && kSplit) {
      // the Gram entries while the strips come from memory, then the per-delta statistics half by half from L1
      if (a.prefetch) run_rows<DT, true, true, kGram>(acc, a.q, a.n, a.st, a.pfo, c);
      else run_rows<DT, true, false, kGram>(acc, a.q, a.n, a.st, 0, c);
      run_rows<DT, true, false, kStats0>(acc, a.q, a.n, a.st, 0, c);
      run_rows<DT, true, false, kStats1>(acc, a.q, a.n, a.st, 0, c);
    } else if (a.prefetch) {
      run_rows<DT, AXIS0, true>(acc, a.q, a.n, a.st, a.pfo, c, a.pf_steps, a.pf_next);
    } else {
      run_rows<DT, AXIS0, false>(acc, a.q, a.n, a.st, 0, c);
    }
    if (vt) acc.fold(*vt);
    else if (!SC) acc.template flush<DT>(*ct, col);
  }

  // Axis 1 in place: each strip of the block runs down its rows in registers and is added into the column totals,
  // all in one call (a call a strip cost K = 5 a third of its time in set-up and spills). Prefetches a.pf bytes
  // ahead in every row, past col1 into the next block's rows from col0 on. With ONE, strips of one vector (one set of
  // accumulators) whatever U (see cols_fn).
  template <int DT, bool ONE = false>
  static void cols(const ColArgs& a, const Ctx& c, ColTotals& ct) {
    constexpr int K = num_inputs(MODE, M), UC = ONE ? 1 : U;
    constexpr int64_t es = DT == kF32 ? 4 : 2;
    for (int64_t col = a.col0; col < a.col1; col += kW * UC) {
      const int64_t pc = col + a.pf / es;
      const int64_t pfo = pc < a.col1 ? (pc - col) * es : a.wrap + (a.col0 + pc - a.col1 - col) * es;
      const char* p[K];
      for (int k = 0; k < K; ++k) p[k] = a.q[k] + (col - a.base) * es;
      VAcc<M, MODE, NZ, UC> acc;
      acc.clear();
      run_rows<DT, false, true>(acc, p, a.n, a.st, pfo, c);
      acc.template flush<DT>(ct, col);
    }
  }
};

// M > kStaticM (K > 5), M and the mode known at run time: too many accumulators for the registers at once, so a
// strip's steps go through passes over L1, each with its few accumulators in registers: one pass a delta (its abs
// sum, maximum and counts; the delta stored into a buffer), then the Gram entries from that buffer, one delta against
// itself and those after it a pass. Each pass adds its accumulators into vt (axis 0) or the column totals (axis 1) as
// it ends. On a Zen 3 (AVX2) from memory, K = 6 rows 0.14-0.18 -> 0.38-0.40 and columns 0.04-0.05 -> 0.22-0.25 of
// the read ceiling against the earlier kernel (every accumulator in L1, updated every step; alternated processes).
// The element math is StaticKern's, with kNzRel's bound for every mode but given (lpt/element.h).
struct DynKern {
  static constexpr int64_t G = kW, G0 = kW;
  static constexpr int64_t kSteps = 512 / kW;  // steps a round of passes: a delta's buffer is 2 KB, all 16 KB in L1
  using Tot = VTot<kMaxM>;

  // Where a pass's accumulators go: a unit's fp64 lanes (axis 0) or the fp32 column totals of a strip (axis 1).
  struct UnitSink {
    Tot& t;
    LPT_VINLINE void gram(int p, vf g) { t.g[p] += widen(g); }
    LPT_VINLINE void stats(int m, int, vf s, vf mx, vi z, vi nz) {
      t.s[m] += widen(s);
      t.mx[m] = vmax(mx, t.mx[m]);
      t.z[m] += widen(z);
      t.nz[m] += widen(nz);
    }
  };
  struct ColSink {
    float* p;  // the strip's column totals (ColTotals::f32)
    LPT_VINLINE void gram(int i, vf g) { col_add(p + i * kW, g); }
    LPT_VINLINE void stats(int m, int M, vf s, vf mx, vi z, vi nz) {
      const int NG = M * (M + 1) / 2;
      col_add(p + (NG + m) * kW, s);
      col_add(p + (NG + M + m) * kW, z * kZeroOne + nz);
      col_max(p + (NG + 2 * M + m) * kW, mx);
    }
  };

  // Delta m over steps [0, n) into the sink and d: x the input, r its reference (REF: d = x - r; else d = x). The
  // near-zero bound is rtol * |r| + atol with REL, else the constant near_bound(0, atol, rtol): the same bound
  // whenever rtol = 0 and atol is finite (a non-finite r then makes d non-finite, never within a finite atol).
  template <int DT, bool REF, bool REL, class Sink>
  static LPT_VINLINE void delta_pass(const char* x, const char* r, int64_t st, int64_t n, int64_t pfd, float* d,
                                     const Ctx& c, Sink& sink, int m) {
    const vf zero = {}, rtol = zero + c.rtol, atol = zero + c.atol, thr0 = zero + near_bound(0.0f, c.atol, c.rtol);
    vf s = {}, mx = {};
    vi z = {}, nz = {};
    for (int64_t j = 0; j < n; ++j) {
      if (pfd) __builtin_prefetch(x + j * st + pfd);
      vf dj = load_vec_p<DT>(x + j * st, 0), thr = thr0;
      if (REF) {
        const vf rj = load_vec_p<DT>(r + j * st, 0);
        dj -= rj;
        if (REL) thr = vmul_rn(rtol, vabs(rj)) + atol;
      }
      store_vf(d + j * kW, dj);
      const vf a = vabs(dj);
      s += a;
      mx = vmax(a, mx);
      z -= (vi)(dj == zero);  // a true lane is -1
      nz -= (vi)(a <= thr);
    }
    sink.stats(m, c.m, s, mx, z, nz);
  }

  // Gram entries (x, x .. x + NY - 1) over steps [0, n) of the buffer d into the sink: one load of delta x and one
  // fma a further delta, NY accumulators.
  template <int NY, class Sink>
  static LPT_VINLINE void gram_pass(const float* d, int64_t n, int x, int M, Sink& sink) {
    const float* dx = d + x * kSteps * kW;
    vf g[NY];
    for (auto& v : g) v = vf{};
    for (int64_t j = 0; j < n * kW; j += kW) {
      const vf vx = load_vf(dx + j);
      for (int y = 0; y < NY; ++y) g[y] += vx * load_vf(dx + y * kSteps * kW + j);
    }
    const int p = x * M - x * (x - 1) / 2;  // entry (x, x) in Totals' order
    for (int y = 0; y < NY; ++y) sink.gram(p + y, g[y]);
  }

  template <int DT, bool REF, bool REL, class Sink>
  static LPT_VINLINE void delta_passes(const char* const* q, int64_t st, int64_t n, int64_t pfd, float* d,
                                       const Ctx& c, Sink& sink) {
    for (int m = 0; m < c.m; ++m)
      delta_pass<DT, REF, REL>(q[REF ? m + 1 : m], q[c.mode == kConsecutive ? m : 0], st, n, pfd,
                               d + m * kSteps * kW, c, sink, m);
  }

  // Steps [0, n) of one strip (inputs at q[k] + j * st) into the sink, kSteps at a time; pfd != 0: each delta's
  // input is prefetched pfd bytes ahead as it is read.
  template <int DT, class Sink>
  static void run_steps(const char* const* q_in, int64_t st, int64_t n, int64_t pfd, const Ctx& c, Sink& sink) {
    alignas(64) float d[kMaxM * kSteps * kW];
    const bool rel = (c.rtol != 0.0f || !std::isfinite(c.atol));
    for (int64_t j0 = 0; j0 < n; j0 += kSteps) {
      const int64_t nj = std::min(kSteps, n - j0);
      const char* q[kMaxInputs];
      for (int k = 0; k < c.k; ++k) q[k] = q_in[k] + j0 * st;
      if (c.mode == kGiven) delta_passes<DT, false, false>(q, st, nj, pfd, d, c, sink);
      else if (rel) delta_passes<DT, true, true>(q, st, nj, pfd, d, c, sink);
      else delta_passes<DT, true, false>(q, st, nj, pfd, d, c, sink);
      for (int x = 0; x < c.m; ++x) {
        switch (c.m - x) {
          case 1: gram_pass<1>(d, nj, x, c.m, sink); break;
          case 2: gram_pass<2>(d, nj, x, c.m, sink); break;
          case 3: gram_pass<3>(d, nj, x, c.m, sink); break;
          case 4: gram_pass<4>(d, nj, x, c.m, sink); break;
          case 5: gram_pass<5>(d, nj, x, c.m, sink); break;
          case 6: gram_pass<6>(d, nj, x, c.m, sink); break;
          case 7: gram_pass<7>(d, nj, x, c.m, sink); break;
          default: gram_pass<8>(d, nj, x, c.m, sink); break;
        }
      }
    }
  }

  // Axis 0 as StaticKern's (SC has no meaning here: counts in lanes). With a.prefetch, each input kPrefetchDyn
  // bytes ahead as it is read, or with a.pf_next the next listed row's span into L2 first.
  template <int DT, bool AXIS0, bool SC = false>
  static void strips(const StripArgs& a, const Ctx& c, Tot* vt, ColTotals* ct, int64_t col) {
    for (int k = 0; a.prefetch && a.pf_next && k < c.k; ++k)
      for (int64_t o = 0; o < a.n * a.st; o += 64) __builtin_prefetch(a.q[k] + a.pf_next + o, 0, 2);
    const int64_t pfd = a.prefetch && !a.pf_next ? kPrefetchDyn : 0;
    if (vt) {
      UnitSink sink{*vt};
      run_steps<DT>(a.q, a.st, a.n, pfd, c, sink);
    } else {
      ColSink sink{ct->f32(col, 0)};
      run_steps<DT>(a.q, a.st, a.n, pfd, c, sink);
    }
  }

  // Axis 1 as StaticKern's, one vector a strip (ONE has no meaning here).
  template <int DT, bool ONE = false>
  static void cols(const ColArgs& a, const Ctx& c, ColTotals& ct) {
    constexpr int64_t es = DT == kF32 ? 4 : 2;
    for (int64_t col = a.col0; col < a.col1; col += kW) {
      const int64_t pc = col + a.pf / es;
      const int64_t pfo = pc < a.col1 ? (pc - col) * es : a.wrap + (a.col0 + pc - a.col1 - col) * es;
      const char* p[kMaxInputs];
      for (int k = 0; k < c.k; ++k) {
        p[k] = a.q[k] + (col - a.base) * es;
        for (int64_t j = 0; j < a.n; ++j) __builtin_prefetch(p[k] + j * a.st + pfo);
      }
      ColSink sink{ct.f32(col, 0)};
      run_steps<DT>(p, a.st, a.n, 0, c, sink);
    }
  }
};

template <class Kern>
using StripsFn = void (*)(const StripArgs&, const Ctx&, typename Kern::Tot*, ColTotals*, int64_t);

// ---- axis 0 -------------------------------------------------------------------------------------------------------

// fn != nullptr: all inputs of one dtype (es bytes) with unit inner stride, read in place by fn; otherwise each row
// goes through fp32 buffers of kRun elements.
template <class Kern>
void axis0(const Tensor2D* ws, int64_t cols, int64_t block, const int64_t* index, int64_t n_units, const Ctx& c,
           const GramOut& out, int threads, StripsFn<Kern> fn, int64_t es) {
  constexpr int64_t G = Kern::G0;
  const bool buffered = fn == nullptr;
  if (buffered) fn = &Kern::template strips<kF32, true>, es = 4;
  const int64_t nstrips = cols / G;
  bool pf_rows = index != nullptr && !buffered;
  const int64_t pf_ahead = amd_core() ? kPrefetch0Amd : kPrefetch0;
  for (int k = 0; k < c.k; ++k) pf_rows = pf_rows && ws[k].stride0 == ws[0].stride0;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> storage(buffered ? kMaxInputs * kRun : 0);
    const char* q[kMaxInputs];
    const int64_t st = G * es;
    if (buffered)
      for (int k = 0; k < c.k; ++k) q[k] = (const char*)(storage.data() + k * kRun);
    typename Kern::Tot vt;
    Totals tot;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < n_units; ++u) {
      const int64_t unit = index ? index[u] : u;
      tot.clear(c.m);
      vt.clear();
      for (int64_t r = unit * block; r < (unit + 1) * block; ++r) {
        int64_t off[kMaxInputs];
        for (int k = 0; k < c.k; ++k) off[k] = r * ws[k].stride0;
        if (!buffered) {
          // Prefetch pf_ahead bytes ahead in every input's row (running on into the next row). Listed rows are
          // scattered: the last row of a unit streams the next listed row in alongside (one row stride for all
          // inputs, as direct axis 1 requires too). On Intel that is the one prefetch; on AMD it goes into L2, with
          // kPrefetchListedAmd bytes ahead within the row into L1 as well: masked_cosine on 10% of gate_proj's rows
          // 0.44-0.48 -> 0.61-0.73 of the read ceiling on a Zen 4 (in alternated runs; into L1 like Intel's: 0.44).
          int64_t pfo = pf_ahead, pf_next = 0, pf_steps = INT64_MAX;
          if (pf_rows && r + 1 == (unit + 1) * block && u + 1 < n_units) {
            pf_next = (index[u + 1] * block - r) * ws[0].stride0 * es;
            if (amd_core()) pfo = kPrefetchListedAmd;
            else pfo = pf_next, pf_next = 0;
          }
          const char* p[kMaxInputs];
          for (int64_t j = 0; j < nstrips; j += kFold) {
            for (int k = 0; k < c.k; ++k) p[k] = (const char*)ws[k].data + (off[k] + j * G) * es;
            if (pf_next) pf_steps = ((nstrips - j) * st - pfo) / st;  // not past the row's end
            fn(StripArgs{p, st, pfo, std::min(kFold, nstrips - j), pfo != 0, pf_steps, pf_next}, c, &vt, nullptr, 0);
          }
          if (nstrips * G < cols) tail_row(tot, ws, off, 1, nstrips * G, cols, c);
        } else {
          for (int64_t c0 = 0; c0 < cols; c0 += kRun) {
            const int64_t n = std::min(kRun, cols - c0);
            int64_t o[kMaxInputs];
            for (int k = 0; k < c.k; ++k) {
              o[k] = off[k] + c0 * ws[k].stride1;
              load_run(ws[k], o[k], ws[k].stride1, n, storage.data() + k * kRun);
            }
            fn(StripArgs{q, st, 0, n / G, false}, c, &vt, nullptr, 0);
            for (int64_t i = n / G * G; i < n; ++i) {  // tail, element by element (strides may differ)
              int64_t oi[kMaxInputs];
              for (int k = 0; k < c.k; ++k) oi[k] = o[k] + i * ws[k].stride1;
              tail_row(tot, ws, oi, 0, 0, 1, c);
            }
          }
        }
      }
      vt.reduce_into(tot, c.m);
      tot.store(out, u, c.m);
    }
  }
}

// ---- axis 1 -------------------------------------------------------------------------------------------------------

// cols != nullptr: all columns, inputs of one dtype (es bytes) with unit inner stride, read in place by cols;
// otherwise (listed units, mixed dtypes, other strides) the columns are gathered into fp32 buffers first: with
// gcols (the fp32 in-place kernel), a row block's rows chunk by chunk of kChunk columns, each row of an input read
// front to back (a few forward streams, which the hardware prefetchers follow), then run through gcols; without it
// (Intel's AVX-512: see run), one strip of the block's rows at a time. gw: the strip width (columns) of
// cols and gcols.
template <class Kern>
void axis1(const Tensor2D* ws, int64_t rows, int64_t block, const int64_t* index, int64_t n_units, const Ctx& c,
           const GramOut& out, int threads, ColsFn cols, int64_t es, ColsFn gcols, int64_t gw) {
  // Listed columns per gathered chunk: the block's chunk buffers (rows x K x kChunk fp32: 96 KB for K = 3, 160 KB
  // for K = 5, at 8 rows) stay in L2, and 10% of a 9728-column row is one chunk (512: two pieces a row, 1.2-1.3x as
  // long). Gathering one strip of all the block's rows at a time instead read 24 row streams (K = 3, 8 rows) a few
  // elements each, which no prefetcher followed: masked_cosine on 10% of down_proj's columns ran at 0.16 of its
  // memory ceiling on a Zen 3 core.
  constexpr int64_t kChunk = 1024;
  const bool gather = cols == nullptr;
  const int64_t G = gather && !gcols ? Kern::G : gw;
  const StripsFn<Kern> fn = &Kern::template strips<kF32, false>;
  if (gather) es = 4;
  const int64_t ncol = n_units * block;
  std::vector<int64_t> col_ids(gather ? ncol : 0);  // listed columns, unit by unit
  for (int64_t u = 0; gather && u < n_units; ++u)
    for (int64_t j = 0; j < block; ++j) col_ids[u * block + j] = (index ? index[u] : u) * block + j;
  // Listed columns are gathered by int32 positions per input where they fit in 32 bits: with the ISA's gather
  // instruction where it pays (see load_pos), else a load each. A column of 10% of a bf16 row is one element per
  // 64-byte line, and the int64 gather (an index, a multiply, a load, a widening and a store per element) was what
  // bounded masked_cosine on columns on the Xeon.
  std::vector<int32_t> col_pos(gather ? c.k * ncol : 0);  // [input][listed column]
  bool vgather = gather, pos0[kMaxInputs] = {};  // vgather: positions fit; pos0: a listed position 0 (see gather_vec)
  for (int k = 0; k < c.k && vgather; ++k)
    for (int64_t j = 0; j < ncol && vgather; ++j) {
      const int64_t pos = col_ids[j] * ws[k].stride1;
      vgather = pos < (int64_t(1) << 31);
      col_pos[k * ncol + j] = (int32_t)pos;
      pos0[k] = pos0[k] || pos == 0;
    }
  // n listed columns from j of row r of input k into dst (fp32)
  const bool vinstr = gather_instructions_pay();
  auto gather_row = [&](int k, int64_t r, int64_t j, int64_t n, float* dst) {
    const int64_t off = r * ws[k].stride0;
    if (!vgather)
      load_gather(ws[k], off, ws[k].stride1, &col_ids[j], n, dst);
    else if (!vinstr || (off == 0 && pos0[k]))  // never element offset 0: see gather_vec
      load_pos(ws[k], off, &col_pos[k * ncol + j], n, dst);
    else
      load_gather_vec(ws[k], off, &col_pos[k * ncol + j], n, dst);
  };
  const int64_t rb = row_block(c.k, !gather);
  const int64_t pf_direct = !amd_core()  ? kPrefetch
                            : kVRegs < 32 ? kPrefetchAmd2
                            : rb == kRowBlockAmd ? kPrefetchAmd : kPrefetch;
  // Rows [ra, rz) (row block boundaries) of columns [lo, hi) (lo a multiple of G) into tot.
  auto rows_into = [&](ColTotals& tot, int64_t ra, int64_t rz, int64_t lo, int64_t hi) {
    const int64_t full = lo + (hi - lo) / G * G;
    std::vector<float> storage(!gather ? 0 : gcols ? rb * c.k * kChunk : rb * kMaxInputs * G);
    const char* q[kMaxInputs];
    const int64_t st = gather ? kMaxInputs * G * 4 : ws[0].stride0 * es;  // direct: one row stride
    for (int64_t r0 = ra; r0 < rz; r0 += rb) {
      const int64_t r1 = std::min(rz, r0 + rb);
      if (!gather) {
        for (int k = 0; k < c.k; ++k) q[k] = (const char*)ws[k].data + r0 * ws[k].stride0 * es;
        cols(ColArgs{q, st, r1 - r0, lo, full, rb * st, 0, pf_direct}, c, tot);
      } else if (gcols) {
        for (int64_t c0 = lo; c0 < full; c0 += kChunk) {  // [row][input][chunk]
          const int64_t w = std::min(full - c0, kChunk);
          for (int64_t r = r0; r < r1; ++r)
            for (int k = 0; k < c.k; ++k) gather_row(k, r, c0, w, storage.data() + ((r - r0) * c.k + k) * w);
          for (int k = 0; k < c.k; ++k) q[k] = (const char*)(storage.data() + k * w);
          gcols(ColArgs{q, c.k * w * 4, r1 - r0, c0, c0 + w, 0, c0}, c, tot);
        }
      } else {  // [row][input][G]
        for (int64_t col = lo; col < full; col += G) {
          for (int64_t r = r0; r < r1; ++r)
            for (int k = 0; k < c.k; ++k) gather_row(k, r, col, G, storage.data() + ((r - r0) * kMaxInputs + k) * G);
          for (int k = 0; k < c.k; ++k) q[k] = (const char*)(storage.data() + k * G);
          fn(StripArgs{q, st, 0, r1 - r0, false}, c, nullptr, &tot, col);
        }
      }
      if (full < hi) {  // columns that do not fill a strip: scalar, one lane per column
        Lanes<kMaxStrip> lanes;
        lanes.clear();
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t col = full; col < hi; ++col) {
            float w[kMaxInputs];
            for (int k = 0; k < c.k; ++k)
              w[k] = load_elem(ws[k], r * ws[k].stride0 + (gather ? col_ids[col] : col) * ws[k].stride1);
            step(lanes, w, (int)(col - full), c);
          }
        }
        for (int64_t col = full; col < hi; ++col) tot.add_lane(lanes, (int)(col - full), col);
      }
      if ((r1 - ra) % kFoldRows == 0 || r1 == rz) tot.fold(lo, hi);
    }
  };
  const bool perm = !gather && es == 2 && G == kW;
  if (gather && rows >= 4 * rb * threads) {
    // Gathers split the rows: each thread reads its rows' listed columns front to back, consecutive rows one after
    // the other (a few forward streams), into its own column totals, summed at the end. Split by columns, each
    // thread read every row's half in 10 KB pieces: masked_cosine on 10% of down_proj's columns took 1.5x as long.
    std::vector<ColTotals*> parts(threads, nullptr);
#pragma omp parallel num_threads(threads)
    {
      const int nt = omp_get_num_threads(), t = omp_get_thread_num();
      ColTotals mine(c.m, ncol, perm);
      parts[t] = &mine;
      int64_t ra, rz;
      split_range(rows, nt, t, rb, &ra, &rz);
      rows_into(mine, ra, rz, 0, ncol);
#pragma omp barrier
      int64_t g0, g1;  // this thread's groups of kW columns: the other parts' totals added into part 0's
      split_range((ncol + kW - 1) / kW, nt, t, 1, &g0, &g1);
      for (int p = 1; p < nt; ++p) parts[0]->merge(*parts[p], g0, g1);
#pragma omp barrier
      int64_t u0, u1;
      split_range(n_units, nt, t, 1, &u0, &u1);
      parts[0]->store_units(u0, u1, block, out);
#pragma omp barrier  // (every part stays alive until part 0's units are stored)
    }
    return;
  }
  ColTotals tot(c.m, ncol, perm);
  std::vector<int64_t> ends(threads, 0);  // each thread's last column + 1
#pragma omp parallel num_threads(threads)
  {
    int64_t lo, hi;
    split_range(ncol, omp_get_num_threads(), omp_get_thread_num(), G, &lo, &hi);
    ends[omp_get_thread_num()] = hi;
    rows_into(tot, 0, rows, lo, hi);
    // The units inside this thread's columns (the store is ~100 cycles a unit: 2% of a down_proj call, a sixth of
    // one over 256 rows); those that straddle two threads' columns after all have folded.
    tot.store_units((lo + block - 1) / block, hi / block, block, out);
  }
  for (int64_t e : ends)
    if (e % block && e < ncol) tot.store_units(e / block, e / block + 1, block, out);
}

// ---- dispatch -----------------------------------------------------------------------------------------------------

// Axis 0 read in place: counts by popcount (VAcc's SC) on AMD's AVX-512, where a mask's move to a general register
// is off the vector pipes (on Intel it shares port 0 with the FMAs).
template <class Kern, int DT>
StripsFn<Kern> axis0_fn() {
#if defined(__AVX512F__)
  if (amd_core()) return &Kern::template strips<DT, true, true>;
#endif
  return &Kern::template strips<DT, true>;
}

// Axis 1: strips of one vector on AMD's AVX-512 (one set of accumulators: down_proj columns K = 2 0.75-0.82 ->
// 0.90, K = 3 0.39-0.49 -> 0.74-0.75 of the read ceiling on a Zen 4, in alternated processes; rows, where both
// sets take the two vectors of one 64-byte line, ran the same), else the kernel's U sets (two vectors, a line).
inline bool one_set() { return kVRegs >= 32 && amd_core(); }
template <class Kern, int DT>
ColsFn cols_fn() {
#if defined(__AVX512F__)
  if (one_set()) return &Kern::template cols<DT, true>;
#endif
  return &Kern::template cols<DT>;
}

// Listed columns that touch at least a third of a row's 64-byte lines: read in place on AMD's AVX-512, whose gathers
// of listed elements fell behind reading every column (down_proj, K = 3, on a Zen 4: 10% of the columns 7.7 ms
// gathered vs 6.3 ms for all of them in place, 2% (48% of the lines) 7.5 vs 6.3, 1% (27%) 5.2 vs 7.1). Not with
// AVX2: on a Zen 3 the 10% case ran at 0.55 of the read ceiling in place against 0.80 gathered.
bool dense_columns(const int64_t* index, int64_t n_units, int64_t block, int64_t cols, int64_t es) {
  if (kVRegs < 32 || !amd_core()) return false;
  std::vector<char> line((cols * es + 63) / 64, 0);
  int64_t touched = 0;
  for (int64_t u = 0; u < n_units; ++u)
    for (int64_t col = index[u] * block; col < (index[u] + 1) * block; ++col) {
      char& l = line[col * es / 64];
      touched += !l;
      l = 1;
    }
  return 3 * touched >= (int64_t)line.size();
}

// Listed column units computed as all units in place by cols (see dense_columns), then the listed ones copied out.
template <class Kern>
void dense_axis1(const Tensor2D* ws, int64_t rows, int64_t cols, int64_t block, const int64_t* index,
                 int64_t n_units, const Ctx& c, const GramOut& out, int threads, ColsFn colfn, int64_t es,
                 int64_t gw) {
  const int64_t n_all = cols / block, m = c.m, mm = m * m;
  std::vector<float> gram(n_all * mm), abs_sum(n_all * m), abs_max(n_all * m);
  std::vector<int64_t> zeros(n_all * m), near_zeros(n_all * m);
  axis1<Kern>(ws, rows, block, nullptr, n_all, c,
              GramOut{gram.data(), abs_sum.data(), abs_max.data(), zeros.data(), near_zeros.data()}, threads, colfn,
              es, nullptr, gw);
  for (int64_t u = 0; u < n_units; ++u) {
    const int64_t a = index[u];
    std::copy_n(&gram[a * mm], mm, out.gram + u * mm);
    std::copy_n(&abs_sum[a * m], m, out.abs_sum + u * m);
    std::copy_n(&abs_max[a * m], m, out.abs_max + u * m);
    std::copy_n(&zeros[a * m], m, out.zeros + u * m);
    std::copy_n(&near_zeros[a * m], m, out.near_zeros + u * m);
  }
}

template <class Kern>
void run(const Tensor2D* ws, int64_t rows, int64_t cols, int axis, int64_t block, const int64_t* index,
         int64_t n_units, const Ctx& c, const GramOut& out, int threads, bool direct) {
  StripsFn<Kern> fn = nullptr;  // axis 0
  ColsFn colfn = nullptr;        // axis 1
  if (direct) {  // one dtype, unit inner stride
    switch (ws[0].dtype) {
      case kBF16: fn = axis0_fn<Kern, kBF16>(), colfn = cols_fn<Kern, kBF16>(); break;
      case kF16: fn = axis0_fn<Kern, kF16>(), colfn = cols_fn<Kern, kF16>(); break;
      default: fn = axis0_fn<Kern, kF32>(), colfn = cols_fn<Kern, kF32>(); break;
    }
  }
  const int64_t es = dtype_size(ws[0].dtype);
  if (axis == 0) return axis0<Kern>(ws, cols, block, index, n_units, c, out, threads, fn, es);
  bool one_stride = true;  // direct axis 1 walks the K inputs with one row stride
  for (int k = 0; k < c.k; ++k) one_stride = one_stride && ws[k].stride0 == ws[0].stride0;
  const int64_t gw = one_set() ? kW : Kern::G;  // strip width of cols_fn's kernels
  if (index && direct && one_stride && dense_columns(index, n_units, block, cols, es))
    return dense_axis1<Kern>(ws, rows, cols, block, index, n_units, c, out, threads, colfn, es, gw);
  // Chunked gathers where the gather instruction does not pay or without AVX-512 (measured on a Zen 3); the
  // strip-by-strip gathers on Intel's AVX-512, where they were measured (0.75-0.90 of the read ceiling).
  axis1<Kern>(ws, rows, block, index, n_units, c, out, threads, index || !one_stride ? nullptr : colfn, es,
              kVRegs >= 32 && gather_instructions_pay() ? nullptr : cols_fn<Kern, kF32>(), gw);
}

template <int MODE, int NZ>
void run_nz(const Tensor2D* ws, int64_t rows, int64_t cols, int axis, int64_t block, const int64_t* index,
            int64_t n_units, const Ctx& c, const GramOut& out, int threads, bool direct) {
  switch (c.m) {
    case 1: return run<StaticKern<1, MODE, NZ>>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
    case 2: return run<StaticKern<2, MODE, NZ>>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
    case 3: return run<StaticKern<3, MODE, NZ>>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
    case 4: return run<StaticKern<4, MODE, NZ>>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
  }
}

template <int MODE>
void run_mode(const Tensor2D* ws, int64_t rows, int64_t cols, int axis, int64_t block, const int64_t* index,
              int64_t n_units, const Ctx& c, const GramOut& out, int threads, bool direct) {
  if (c.atol == 0.0f && c.rtol == 0.0f) return run_nz<MODE, kNzZero>(ws, rows, cols, axis, block, index, n_units, c,
                                                                      out, threads, direct);
  // given mode's reference is 0: its bound is atol whatever rtol
  constexpr int kNz = MODE == kGiven ? kNzAbs : kNzRel;
  if (c.rtol == 0.0f) return run_nz<MODE, kNzAbs>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
  run_nz<MODE, kNz>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
}

}  // namespace

void unit_gram(const Tensor2D* ws_in, int k, int64_t rows, int64_t cols, int axis, int64_t block, int mode,
               const int64_t* index, int64_t n_units, float atol, float rtol, GramOut out, int threads) {
  const Ctx c{num_deltas(mode, k), mode, k, atol, rtol};
  // Inputs all contiguous along axis 0 but not along axis 1 (transposed views): work on their transposes.
  Tensor2D ws[kMaxInputs];
  bool rows_unit = true, cols_unit = true, one_dtype = true;
  for (int i = 0; i < k; ++i) {
    ws[i] = ws_in[i];
    rows_unit = rows_unit && ws[i].stride1 == 1;
    cols_unit = cols_unit && ws[i].stride0 == 1;
    one_dtype = one_dtype && ws[i].dtype == ws[0].dtype;
  }
  if (!rows_unit && cols_unit) {
    for (int i = 0; i < k; ++i) std::swap(ws[i].stride0, ws[i].stride1);
    std::swap(rows, cols);
    axis = 1 - axis;
    rows_unit = true;
  }
  const bool direct = rows_unit && one_dtype;
  // The work is that of the listed units only (a few units of a large tensor, e.g. masked_cosine of one unit, must not
  // pay an OpenMP fork/join: on a busy machine that waits a scheduler slice, ~8 ms, for a ~70 us call).
  threads = threads_for(n_units * block * (axis == 0 ? cols : rows) * k, threads);
  if (c.m > kStaticM) {
    run<DynKern>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
  } else if (mode == kConsecutive) {
    run_mode<kConsecutive>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
  } else if (mode == kBase) {
    run_mode<kBase>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
  } else {
    run_mode<kGiven>(ws, rows, cols, axis, block, index, n_units, c, out, threads, direct);
  }
}

}  // namespace LPT_ISA
}  // namespace cpu
}  // namespace lpt
