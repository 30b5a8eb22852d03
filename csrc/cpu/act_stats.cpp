// act_stats_ on the CPU: in-place accumulation of per-channel activation statistics over the tokens of x [T, C].
//
// Each thread owns a range of channels. For a block of kRowBlock (unmasked) tokens it walks its channels strip by
// strip (kP pairs of fp32 vectors in registers per statistic: lpt/element.h's act_update lane-wise), running down the
// block's rows, then adds the strip into per-thread fp32 channel sums (in the lane order of its loads), which are
// folded into fp64 every kFoldRows tokens, so the fp32 rounding error is that of a few hundred terms whatever the
// token count. The block's row streams are prefetched in software. At the end each thread adds its totals into
// `stats`, in channel order.
//
// x with unit channel stride is read in place (bf16: strip_bf16, on 16-bit lanes; fp16 and fp32: load_pair<DT>); other
// strides go through an fp32 buffer per block.
// Channels that do not fill a strip use the scalar act_update.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "load.h"

namespace lpt {
namespace cpu {
namespace LPT_ISA {
namespace {

constexpr int kP = kVRegs >= 32 ? 2 : 1;  // pairs of vectors per strip: 4 statistics x 2kP accumulators in registers
constexpr int64_t kG = 2 * kW * kP;       // channels per strip
// Tokens accumulated in registers per strip: the block's rows are as many concurrent streams through memory. On a
// Zen 3 (AVX2), [8192, 9728] bf16 ran at 0.59-0.63 of the read ceiling with 32 and at 0.59-0.90 (mostly ~0.7) with
// 16, and a plain read in this order at 0.65 of a sequential one with 32, at 1.0 with 16.
constexpr int64_t kRowBlock = 16;
// With AVX-512 on a Zen 4: 8 (0.59-0.61 -> 0.65-0.69 of the read ceiling in alternated runs; 4: 0.46, 32: 0.38).
constexpr int64_t kRowBlockAmd = kVRegs >= 32 ? 8 : kRowBlock;
constexpr int64_t kFoldRows = 256;       // tokens accumulated in fp32 channel sums before folding into fp64
constexpr int64_t kPrefetch = 512;       // bytes ahead in each row stream
static_assert(kFoldRows % kRowBlock == 0 && kFoldRows % kRowBlockAmd == 0,
              "channel sums fold at row block boundaries");
constexpr int kStats = 4;                // abs sum, square sum, active count (folded), abs max (not)

// Per-thread totals of channels [lo, lo + n), group by group of kW channels with all statistics of a group together:
// s32 [group][kStats][kW] (fp32 sums of the current fold period, then the maxima), s64 [group][3][kW].
struct ChanTotals {
  int64_t n;
  Scratch<float, 2> b32;
  Scratch<double, 3> b64;
  float* s32;
  double* s64;
  explicit ChanTotals(int64_t n_)
      : n(n_), b32((n_ + kW - 1) / kW * kStats * kW), b64((n_ + kW - 1) / kW * 3 * kW), s32(b32.data()),
        s64(b64.data()) {}
  float* f32(int64_t c, int st) { return s32 + ((c / kW) * kStats + st) * kW + c % kW; }
  double* f64(int64_t c, int st) { return s64 + ((c / kW) * 3 + st) * kW + c % kW; }
  void fold() {
    for (int64_t g = 0; g < (n + kW - 1) / kW; ++g)
      for (int i = 0; i < 3 * kW; ++i) s64[g * 3 * kW + i] += s32[g * kStats * kW + i], s32[g * kStats * kW + i] = 0.0f;
  }
};

// The rows of a block as pointers, worked out once per block for all of its strips (a row's address from a token id
// and a stride, per row and strip, was ~1/4 of the loop's instructions, some on the vector ports).
struct BlockArgs {
  const char* const* rows;  // start of each block row (x, or the fp32 buffer)
  const char* const* pf;    // the rows to prefetch in, one per block row (nullptr: no prefetch)
  int64_t n;                // block rows
  int64_t cb;               // byte offset of the strip in a row
  int64_t pb;               // byte offset of the prefetch in its row
};

LPT_VINLINE void add_to(float* p, const vf& v) { store_vf(p, load_vf(p) + v); }

// |x| > threshold for lanes |x| (sign bit cleared, NaN included) as integer operations on the bit patterns, which
// run on any of a Zen core's four vector pipes where a float compare and a blend take two of its two FP pipes:
// |x| is active when its bits lie in [lo, inf's] (non-negative floats order as their bits; NaN's lie above inf's),
// i.e. when bits + shift < below as signed int32, with shift moving lo to INT32_MIN.
struct ActiveBits {
  uint32_t shift;
  int32_t below;
};
// The smallest |x| bit pattern that is active; above inf's when none is.
inline uint32_t active_lo(float threshold) {
  if (threshold != threshold) return 0xffffffffu;  // NaN: nothing is above it
  if (threshold < 0.0f) return 0;                  // every non-NaN |x|
  uint32_t t;
  memcpy(&t, &threshold, 4);
  return (t & 0x7fffffffu) + 1;  // -0 as +0; inf: inf + 1, an empty range
}
inline ActiveBits active_bits(float threshold) {
  const uint32_t inf = 0x7f800000u, lo = active_lo(threshold);
  if (lo > inf) return {0, INT32_MIN};
  const uint32_t shift = 0x80000000u - lo;
  return {shift, (int32_t)(inf + 1 + shift)};
}

// One strip of kG channels over the block's rows, then into the totals at local channel j (a multiple of kW).
template <int DT>
void strip(const BlockArgs& a, float threshold, ChanTotals& tot, int64_t j) {
  constexpr int kLines = (kG * (DT == kF32 ? 4 : 2) + 63) / 64;
  vf as[2 * kP], sq[2 * kP], mx[2 * kP], ac[2 * kP];
  for (int u = 0; u < 2 * kP; ++u) as[u] = sq[u] = mx[u] = ac[u] = vf{};
#if defined(__AVX512F__)
  const vf one = vf{} + 1.0f;
#else
  vi ai[2 * kP] = {};  // active counts, integer (see active_bits)
  const ActiveBits ab = active_bits(threshold);
#endif
  for (int64_t i = 0; i < a.n; ++i) {
    if (a.pf) {
      const char* pf = a.pf[i] + a.pb;
      for (int l = 0; l < kLines; ++l) __builtin_prefetch(pf + 64 * l);
    }
    const char* p = a.rows[i] + a.cb;
    vf x[2 * kP];
    for (int q = 0; q < kP; ++q) load_pair<DT>(p, 2 * kW * q, x[2 * q], x[2 * q + 1]);
    for (int u = 0; u < 2 * kP; ++u) {
      const vf ax = vabs(x[u]);  // act_update, lane-wise
      as[u] += ax;
      sq[u] += x[u] * x[u];
      mx[u] = vmax(ax, mx[u]);
#if defined(__AVX512F__)
      ac[u] = ax > threshold ? ac[u] + one : ac[u];  // a masked add (+= of a select is a blend and an add)
#else
      ai[u] -= (vi)((vu)ax + ab.shift) < ab.below;
#endif
    }
  }
#if !defined(__AVX512F__)
  for (int u = 0; u < 2 * kP; ++u) ac[u] = __builtin_convertvector(ai[u], vf);
#endif
  for (int u = 0; u < 2 * kP; ++u) {
    float* t = tot.f32(j + u * kW, 0);
    add_to(t, as[u]);
    add_to(t + kW, sq[u]);
    add_to(t + 2 * kW, ac[u]);
    store_vf(t + 3 * kW, vmax(mx[u], load_vf(t + 3 * kW)));
  }
}

// bf16: the count and the maximum on |x|'s 16-bit patterns, 2kW channels in one register, each 16-bit operation
// doing the work of two on fp32 lanes: 11 vector operations a register of 2kW channels where strip<kBF16> takes 14
// (16 with AVX2), and none of the count's and maximum's on the FP adder, which bounds strip<kBF16> on a Zen 4 (its
// adds, maxima and masked adds: 7 of the 14, on the one pipe pair that takes them). c = bits + 0x7f wraps NaN's
// patterns (above inf's) below every number's, so the signed maximum of c skips NaN as act_update does, and
// c > below counts the active lanes: a bf16 |x| is above the threshold iff its pattern is at least ceil(lo / 2^16)
// (its low 16 bits are zero), and at most inf's. The square is of |x| (the same product as x * x).
typedef uint16_t vuh __attribute__((vector_size(4 * kW)));
typedef int16_t vsh __attribute__((vector_size(4 * kW)));

inline int16_t active_below_bf16(float threshold) {
  const uint32_t lo = active_lo(threshold), lo16 = lo > 0x7f800000u ? 0x7f81u : (lo + 0xffffu) >> 16;
  return lo16 > 0x7f80u ? INT16_MAX : (int16_t)(lo16 + 0x7e);
}

// ac - (c > below) and max(c, mx), lane-wise on 16-bit lanes: with AVX-512 a compare into a mask register and a
// masked subtraction (the vector-extension form would also move the mask into a vector).
LPT_VINLINE void count_max16(vsh c, vsh below, vsh& ac, vsh& mx) {
#if defined(__AVX512BW__)
  const __m512i ci = (__m512i)c;
  ac = (vsh)_mm512_mask_sub_epi16((__m512i)ac, _mm512_cmpgt_epi16_mask(ci, (__m512i)below), (__m512i)ac,
                                  _mm512_set1_epi16(-1));
  mx = (vsh)_mm512_max_epi16(ci, (__m512i)mx);
#else
  ac -= c > below;
  mx = c > mx ? c : mx;
#endif
}

// PF: prefetch (a loop of its own). The unrolled loops over the registers let GCC keep the accumulators in registers
// from the clears to the stores: rolled, it homed them on the stack (12 stores to clear, 12 to spill after the rows,
// reloaded by the stores into the channel sums), and [8192, 9728] bf16 ran at 0.65-0.69 of the read ceiling on a
// Zen 4 instead of 0.79-0.87.
template <bool PF>
LPT_VINLINE void strip_bf16_t(const BlockArgs& a, float threshold, ChanTotals& tot, int64_t j) {
  constexpr int kLines = (kG * 2 + 63) / 64;
  const vsh below = vsh{} + active_below_bf16(threshold);
  vf as[2 * kP] = {}, sq[2 * kP] = {};
  vsh mx[kP] = {}, ac[kP] = {};  // kRowBlock rows: the counts fit 16 bits
  for (int64_t i = 0; i < a.n; ++i) {
    if (PF)
      for (int l = 0; l < kLines; ++l) __builtin_prefetch(a.pf[i] + a.pb + 64 * l);
#pragma GCC unroll 4
    for (int q = 0; q < kP; ++q) {
      vuh x;
      memcpy(&x, a.rows[i] + a.cb + q * sizeof x, sizeof x);
      const vuh b = x & 0x7fff;  // |x|
      const vf lo = (vf)((vu)b << 16), hi = (vf)((vu)b & 0xffff0000u);  // bf16_to_f32: even, odd channels
      as[2 * q] += lo;
      as[2 * q + 1] += hi;
      sq[2 * q] += lo * lo;
      sq[2 * q + 1] += hi * hi;
      count_max16((vsh)(b + 0x7f), below, ac[q], mx[q]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < kP; ++q) {
    const vuh top = (vuh)(mx[q] - 0x7f);  // max |x|'s pattern; a NaN's where no number was seen, which vmax drops
    const vf m[2] = {(vf)((vu)top << 16), (vf)((vu)top & 0xffff0000u)};
    const vf n[2] = {__builtin_convertvector((vi)((vu)ac[q] & 0xffffu), vf),
                     __builtin_convertvector((vi)((vu)ac[q] >> 16), vf)};
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const int u = 2 * q + h;
      float* t = tot.f32(j + u * kW, 0);
      add_to(t, as[u]);
      add_to(t + kW, sq[u]);
      add_to(t + 2 * kW, n[h]);
      store_vf(t + 3 * kW, vmax(m[h], load_vf(t + 3 * kW)));
    }
  }
}

void strip_bf16(const BlockArgs& a, float threshold, ChanTotals& tot, int64_t j) {
  if (a.pf) strip_bf16_t<true>(a, threshold, tot, j);
  else strip_bf16_t<false>(a, threshold, tot, j);
}

using StripFn = void (*)(const BlockArgs&, float, ChanTotals&, int64_t);

inline float load_elem(const Tensor2D& t, int64_t i) {
  switch (t.dtype) {
    case kF32: return load_f32<kF32>(t.data, i);
    case kBF16: return load_f32<kBF16>(t.data, i);
    default: return load_f32<kF16>(t.data, i);
  }
}

}  // namespace

void act_stats(Tensor2D x, int64_t tokens, int64_t channels, const uint8_t* mask, double* stats, int64_t ss0,
               int64_t ss1, float threshold, int threads) {
  std::vector<int64_t> row_ids;  // unmasked tokens (only with a mask)
  int64_t counted = tokens;
  if (mask) {
    for (int64_t t = 0; t < tokens; ++t)
      if (mask[t]) row_ids.push_back(t);
    counted = (int64_t)row_ids.size();
  }
  const int64_t* rows = mask ? row_ids.data() : nullptr;
  const bool direct = x.stride1 == 1;
  const int64_t es = direct ? dtype_size(x.dtype) : 4;
  StripFn fn = &strip<kF32>;
  if (direct && x.dtype == kBF16) fn = &strip_bf16;
  if (direct && x.dtype == kF16) fn = &strip<kF16>;
  const int64_t rb = amd_core() ? kRowBlockAmd : kRowBlock, pfd = kPrefetch;
  threads = threads_for(counted * channels, threads);
#pragma omp parallel num_threads(threads)
  {
    int64_t lo, hi;
    split_range(channels, omp_get_num_threads(), omp_get_thread_num(), kG, &lo, &hi);
    const int64_t full = lo + (hi - lo) / kG * kG;
    ChanTotals tot(hi - lo);
    std::vector<float> buf(direct ? 0 : rb * kG);  // [block row][kG] fp32
    const char* cur[kRowBlock];   // this block's rows
    const char* next[kRowBlock];  // the next block's rows (the last row where there are fewer), for the prefetch
    const char* bufp[kRowBlock];  // the rows of buf
    for (int64_t i = 0; i < rb; ++i) bufp[i] = (const char*)(buf.data() + i * kG);
    auto row = [&](int64_t i) { return (const char*)x.data + (rows ? rows[i] : i) * x.stride0 * es; };
    for (int64_t r0 = 0; r0 < counted; r0 += rb) {
      const int64_t r1 = std::min(counted, r0 + rb);
      if (direct) {
        for (int64_t i = r0; i < r1; ++i) {
          cur[i - r0] = row(i);
          next[i - r0] = row(i + rb < counted ? i + rb : i);
        }
      }
      for (int64_t c = lo; c < full; c += kG) {
        if (direct) {
          // Prefetch pfd bytes ahead in every row of the block, wrapping into the next block's rows.
          int64_t pc = c + pfd / es;
          const bool wrap = pc >= full;
          if (wrap) pc = lo + (pc - full);
          fn(BlockArgs{cur, pfd > 0 ? (wrap ? next : cur) : nullptr, r1 - r0, c * es, pc * es}, threshold, tot,
             c - lo);
        } else {
          for (int64_t i = r0; i < r1; ++i)
            load_run(x, (rows ? rows[i] : i) * x.stride0 + c * x.stride1, x.stride1, kG, buf.data() + (i - r0) * kG);
          fn(BlockArgs{bufp, nullptr, r1 - r0, 0, 0}, threshold, tot, c - lo);
        }
      }
      for (int64_t c = full; c < hi; ++c) {  // channels that do not fill a strip: scalar
        float as = 0.0f, sq = 0.0f, mx = 0.0f, ac = 0.0f;
        for (int64_t i = r0; i < r1; ++i)
          act_update(load_elem(x, (rows ? rows[i] : i) * x.stride0 + c * x.stride1), threshold, as, sq, mx, ac);
        *tot.f32(c - lo, 0) += as;
        *tot.f32(c - lo, 1) += sq;
        *tot.f32(c - lo, 2) += ac;
        float* m = tot.f32(c - lo, 3);
        *m = std::max(*m, mx);
      }
      if (r1 % kFoldRows == 0 || r1 == counted) tot.fold();
    }
    // Into stats. The strips of a 16-bit x keep their totals in load_pair's lane order (a pair of groups holds the
    // even channels of its 2kW, then the odd ones), put back in channel order here rather than once per block.
    const bool paired = direct && x.dtype != kF32;
    for (int64_t c0 = lo; c0 < hi; c0 += 2 * kW) {
      const int64_t n = std::min<int64_t>(2 * kW, hi - c0);
      const bool in_pairs = paired && c0 < full;
      for (int64_t l = 0; l < n; ++l) {
        const int64_t slot = c0 - lo + (in_pairs ? (l & 1) * kW + l / 2 : l);
        const double* s = tot.f64(slot, 0);
        double* col = stats + (c0 + l) * ss1;
        col[0] += (double)counted;
        col[1 * ss0] += s[0];
        col[2 * ss0] += s[kW];
        if (counted) col[3 * ss0] = std::max(col[3 * ss0], (double)*tot.f32(slot, 3));
        col[4 * ss0] += s[2 * kW];
      }
    }
  }
}

}  // namespace LPT_ISA
}  // namespace cpu
}  // namespace lpt
