// Loads for the CPU kernels: strided / gathered runs widened to fp32 (the generic paths), and fixed-width vectors
// (GCC vector extensions) read straight from contiguous memory of one dtype (the fast paths).
// Part of each ISA variant's translation unit (everything here has internal linkage), so it compiles for that ISA.
#pragma once

#include <stdint.h>
#include <string.h>

#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "kernels.h"
#include "lpt/element.h"

#define LPT_VINLINE inline __attribute__((always_inline))

// The vector helpers below are internal and always inlined; GCC's notes on the (unused) ABI of passing vectors wider
// than the ISA's registers by value are noise here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lpt {
namespace cpu {
namespace {

inline int64_t dtype_size(int dt) { return dt == kF32 ? 4 : 2; }

// Split [0, n) into `parts` contiguous ranges whose boundaries are multiples of `align`; range p of them.
inline void split_range(int64_t n, int parts, int p, int64_t align, int64_t* lo, int64_t* hi) {
  const int64_t chunks = (n + align - 1) / align;
  const int64_t per = chunks / parts, extra = chunks % parts;
  const int64_t c0 = p * per + (p < extra ? p : extra);
  const int64_t c1 = c0 + per + (p < extra ? 1 : 0);
  *lo = c0 * align < n ? c0 * align : n;
  *hi = c1 * align < n ? c1 * align : n;
}

// Threads worth starting for `work` elements: small calls (tests, decode-time hooks) run on one thread.
inline int threads_for(int64_t work, int threads) {
  constexpr int64_t kPerThread = 1 << 16;
  const int64_t useful = work / kPerThread + 1;
  return useful < threads ? (int)useful : threads;
}

// ---- fixed-width vectors ----------------------------------------------------------------------------------------
// One vector is one register of the ISA this unit is compiled for. Lanes are independent: every lane does exactly the
// per-element arithmetic of lpt/element.h (the same IEEE operations in the same order), so a lane's results equal the
// scalar functions'; only the order of the final additions across lanes and rows differs.

#if defined(__AVX512F__)
constexpr int kW = 16;
constexpr int kVRegs = 32;
#elif defined(__AVX__)
constexpr int kW = 8;
constexpr int kVRegs = 16;
#else
constexpr int kW = 4;
constexpr int kVRegs = 16;
#endif

typedef float vf __attribute__((vector_size(4 * kW)));
typedef int32_t vi __attribute__((vector_size(4 * kW)));
typedef uint32_t vu __attribute__((vector_size(4 * kW)));
typedef uint16_t vh __attribute__((vector_size(2 * kW)));
typedef double vd __attribute__((vector_size(8 * kW)));  // two registers: the fp64 totals of one vf

// bf16_to_f32 lane-wise, on lanes holding the bf16 bits in their low half.
LPT_VINLINE vf bf16_vec(vu h) { return (vf)(h << 16); }

// f16_to_f32 lane-wise: the same bit operations and selects as lpt/element.h.
LPT_VINLINE vf f16_vec(vu h) {
  const vu sign = (h & 0x8000u) << 16;
  const vu em = h & 0x7fffu;
  const vu normal = (em << 13) + (112u << 23);
  const vu sub = (vu)(__builtin_convertvector((vi)em, vf) * 5.9604644775390625e-08f);
  const vu special = (em << 13) | 0x7f800000u;
  const vu r = em < 0x0400u ? sub : (em >= 0x7c00u ? special : normal);
  return (vf)(sign | r);
}

// kW consecutive 16-bit values zero-extended into 32-bit lanes.
LPT_VINLINE vu load_u16(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vu)_mm512_maskz_cvtepu16_epi32((__mmask16)0xffff, _mm256_loadu_si256((const __m256i*)p));
#elif defined(__AVX2__)
  return (vu)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
#elif defined(__SSE2__)
  return (vu)_mm_unpacklo_epi16(_mm_loadl_epi64((const __m128i*)p), _mm_setzero_si128());
#else
  vh h;
  memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vu);
#endif
}

// kW contiguous elements p[i .. i+kW) of dtype DT, widened to fp32 (load_f32<DT> lane-wise), for 16-bit dtypes in
// the lane order p_lane: one in-lane byte shuffle of a broadcast load (the broadcast is done by the load port), one
// vector operation where a widening load and a shift take two, and so does AVX-512's word permute into element order
// (vpermw issues two on Intel cores: 1 vpermw + 3 adds took 2.6 cycles here, 1 vpshufb + 3 adds 2.05). The 256-bit
// broadcast of AVX-512 puts elements [0, 8) in 128-bit lanes 0 and 2 and [8, 16) in lanes 1 and 3, so the lanes hold
// elements [0, 4), [8, 12), [4, 8), [12, 16); AVX2's 128-bit broadcast gives the element order.
LPT_VINLINE constexpr int p_lane(int e) { return kW == 16 ? (e & 3) | (e & 4) << 1 | (e & 8) >> 1 : e; }

template <int DT>
LPT_VINLINE vf load_vec_p(const void* p, int64_t i) {
  if (DT == kF32) {
    vf v;
    memcpy(&v, (const float*)p + i, sizeof v);
    return v;
  }
  const uint16_t* h = (const uint16_t*)p + i;
#if defined(__AVX512BW__) || defined(__AVX2__)
  // each 16-bit value into the high half of its 32-bit lane (bf16) or the low half (fp16), zeros elsewhere
  constexpr int kHi = DT == kBF16 ? 2 : 0, kLaneSwitch = kW / 8;  // lanes from this one take the second 8 bytes
  alignas(64) static const struct Ctl {
    uint8_t b[4 * kW];
    constexpr Ctl() : b() {
      for (int l = 0; l < 4 * kW; ++l) {
        const int lane = l / 16, j = l % 16 / 4, at = l % 4;
        b[l] = at == kHi || at == kHi + 1 ? (lane >= kLaneSwitch ? 8 : 0) + 2 * j + at - kHi : 0x80;
      }
    }
  } ctl;
#if defined(__AVX512BW__)
  const __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)h));
  const vu w = (vu)_mm512_shuffle_epi8(x, _mm512_load_si512(ctl.b));
#else
  const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)h));
  const vu w = (vu)_mm256_shuffle_epi8(x, _mm256_load_si256((const __m256i*)ctl.b));
#endif
  return DT == kBF16 ? (vf)w : f16_vec(w);
#else
  const vu x = load_u16(h);
  return DT == kBF16 ? bf16_vec(x) : f16_vec(x);
#endif
}

// kW contiguous elements p[i .. i+kW) of dtype DT, widened to fp32 (load_f32<DT> lane-wise), in order.
template <int DT>
LPT_VINLINE vf load_vec(const void* p, int64_t i) {
#if defined(__AVX512BW__)
  if (DT == kBF16) {  // one word permute puts each bf16 into the high half of its lane (zeroing the low halves)
    const __m512i idx = _mm512_set_epi32(0xf000f, 0xe000e, 0xd000d, 0xc000c, 0xb000b, 0xa000a, 0x90009, 0x80008,
                                         0x70007, 0x60006, 0x50005, 0x40004, 0x30003, 0x20002, 0x10001, 0);
    const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
    return (vf)_mm512_maskz_permutexvar_epi16((__mmask32)0xaaaaaaaau, idx, _mm512_castsi256_si512(h));
  }
  if (DT == kF16) return f16_vec(load_u16((const uint16_t*)p + i));
#endif
  return load_vec_p<DT>(p, i);  // the element order but on AVX-512
}

// 2*kW contiguous elements p[i .. i+2kW) widened to fp32 with one load per kW*4 bytes. For 16-bit dtypes the
// elements come de-interleaved: a holds the even ones (i, i+2, ...), b the odd ones; for fp32, a then b in order.
// pair_order() puts a strip's lanes back in element order.
template <int DT>
LPT_VINLINE void load_pair(const void* p, int64_t i, vf& a, vf& b) {
  if (DT == kF32) {
    a = load_vec<kF32>(p, i);
    b = load_vec<kF32>(p, i + kW);
    return;
  }
  vu x;
  memcpy(&x, (const uint16_t*)p + i, sizeof x);
  if (DT == kBF16) {
    a = (vf)(x << 16);          // bf16_to_f32 of the low halves
    b = (vf)(x & 0xffff0000u);  // bf16_to_f32 of the high halves, already in place
  } else {
    a = f16_vec(x & 0xffffu);
    b = f16_vec(x >> 16);
  }
}

// Lanes of a pair (a, b) from load_pair<DT> in element order: elements [0, kW) into a, [kW, 2kW) into b.
template <int DT>
LPT_VINLINE void pair_order(vf& a, vf& b) {
  if (DT == kF32) return;
  vi lo, hi;
  for (int l = 0; l < kW; ++l) {
    lo[l] = (l & 1 ? kW : 0) + l / 2;
    hi[l] = (l & 1 ? kW : 0) + kW / 2 + l / 2;
  }
  const vf x = __builtin_shuffle(a, b, lo), y = __builtin_shuffle(a, b, hi);
  a = x;
  b = y;
}
template <int DT>
LPT_VINLINE void pair_order(vi& a, vi& b) {
  vf x = (vf)a, y = (vf)b;
  pair_order<DT>(x, y);
  a = (vi)x;
  b = (vi)y;
}

// kW elements p[i .. i+kW) of dtype DT from fp32 lanes: lpt/element.h's store_from_f32<DT> lane-wise (the same
// bit operations: round to nearest even, NaN quieted, fp16 overflow to inf and subnormals).
template <int DT>
LPT_VINLINE void store_vec(void* p, int64_t i, vf v) {
  if (DT == kF32) {
    memcpy((float*)p + i, &v, sizeof v);
    return;
  }
  const vu x = (vu)v, k0 = vu{};
  vu r;
  if (DT == kBF16) {
    const vu rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    r = (x & 0x7fffffffu) > 0x7f800000u ? (x >> 16) | 0x40u : rounded;
  } else {
    const vu ax = x & 0x7fffffffu;
    const vu sub = (vu)((vf)ax + 0.5f) - 0x3f000000u;
    const vu normal = (ax + 0xc8000000u + 0xfffu + ((ax >> 13) & 1u)) >> 13;
    const vu special = ax > 0x7f800000u ? k0 + 0x7e00u : k0 + 0x7c00u;
    r = ax < 0x38800000u ? sub : normal;
    r = ax >= 0x477ff000u ? special : r;
    r |= (x >> 16) & 0x8000u;
  }
  const vh h = __builtin_convertvector(r, vh);
  memcpy((uint16_t*)p + i, &h, sizeof h);
}

// a * b + c rounded once, lane-wise: lpt/element.h's fused lerp. Hardware FMA where the ISA has it; the baseline
// (no vector FMA) does it lane by lane with the same fused operation.
LPT_VINLINE vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  vf r;
  for (int l = 0; l < kW; ++l) r[l] = __builtin_fmaf(a[l], b[l], c[l]);
  return r;
#endif
}

// a * b rounded lane-wise on its own: lpt/element.h's mul_rn (the near-zero bound is never an fma, on any ISA). The
// empty asm hides the product from -ffp-contract and emits nothing.
LPT_VINLINE vf vmul_rn(vf a, vf b) {
  vf p = a * b;
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+v"(p));
#elif defined(__aarch64__)
  __asm__("" : "+w"(p));
#else
  volatile vf v = p;
  p = v;
#endif
  return p;
}

// |x| with the sign bit cleared. Observably the same as lpt/element.h's x < 0 ? -x : x in every statistic here:
// the two differ only on -0 (gives +0: same sums, maxima and comparisons) and on the sign of a NaN (still NaN).
LPT_VINLINE vf vabs(vf x) { return (vf)((vu)x & 0x7fffffffu); }
// abs_max update, a > m ? a : m: a NaN a leaves m. This is exactly what the x86 max instructions compute (the
// first operand if it is greater, else the second, so also for NaNs and signed zeros), one instruction where GCC
// makes a compare, a blend and a move of the select (it may not swap the operands of a max without -ffast-math).
LPT_VINLINE vf vmax(vf a, vf m) {
#if defined(__AVX512F__)
  return (vf)_mm512_max_ps((__m512)a, (__m512)m);
#elif defined(__AVX__)
  return (vf)_mm256_max_ps((__m256)a, (__m256)m);
#elif defined(__SSE__)
  return (vf)_mm_max_ps((__m128)a, (__m128)m);
#else
  return a > m ? a : m;
#endif
}
// ---- counts of two tests in one int32 lane ------------------------------------------------------------------------
// Two 16-bit counters per lane (unit_gram: exact zeros in the high half, near zeros in the low half), counted from
// lane masks (all ones where a test holds): one 16-bit subtraction of the masks adds 1 to each counter whose test
// holds. Without AVX-512's mask registers this takes a blend and a subtraction where a select per test took an add
// and a blend each (vpblendvb and the compares share Zen 3's two FP pipes with the arithmetic).
typedef int16_t vs __attribute__((vector_size(4 * kW)));
LPT_VINLINE vi count_both(vi z, vi mask) { return (vi)((vs)z - (vs)mask); }
LPT_VINLINE vi count_pair(vi z, vi hi_mask, vi lo_mask) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const vi m = (vi)_mm256_blend_epi16((__m256i)lo_mask, (__m256i)hi_mask, 0xaa);
#else
  const vi m = (hi_mask & (int32_t)0xffff0000) | (lo_mask & 0xffff);
#endif
  return count_both(z, m);
}

// a <= thr for lanes a with the sign bit cleared (|d|, NaN included) and a constant thr, as one integer compare of
// the bit patterns, (vi)a < b with b = below_bits(thr): non-negative floats order as their bits, and a NaN's bits lie
// above inf's, so NaN is never near. An integer compare runs on any of the four vector pipes of a Zen core, a float
// compare on two.
inline int32_t below_bits(float thr) {
  if (!(thr >= 0.0f)) return INT32_MIN;  // NaN or negative: no a is below (-0 compares >= 0 and means +0)
  uint32_t u;
  memcpy(&u, &thr, 4);
  return (int32_t)(u & 0x7fffffffu) + 1;  // <= 0x7f800001: no overflow
}

LPT_VINLINE vd widen(vf x) { return __builtin_convertvector(x, vd); }
LPT_VINLINE vd widen(vi x) { return __builtin_convertvector(x, vd); }

LPT_VINLINE vd load_vd(const double* p) {
  vd v;
  memcpy(&v, p, sizeof v);
  return v;
}
LPT_VINLINE void store_vd(double* p, const vd& v) { memcpy(p, &v, sizeof v); }
LPT_VINLINE vf load_vf(const float* p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
LPT_VINLINE void store_vf(float* p, const vf& v) { memcpy(p, &v, sizeof v); }

// Horizontal sum of the fp64 lanes / max of the fp32 lanes (the lanes hold no NaN: see vmax), as a tree: log2(kW)
// dependent steps instead of kW. Axis 0 reduces ~NG + 4M of these per unit (a row of 2560 elements for gate_proj):
// a serial chain of 16 fp64 additions each (~64 cycles) cost K = 5 as much as its whole row pass.
LPT_VINLINE double hsum(const vd& v) {
  double t[kW];
  memcpy(t, &v, sizeof t);
  for (int w = kW / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}
LPT_VINLINE float hmax(const vf& v) {
  float t[kW];
  memcpy(t, &v, sizeof t);
  for (int w = kW / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] = t[l + w] > t[l] ? t[l + w] : t[l];
  return t[0];
}

// ---- per-call totals ---------------------------------------------------------------------------------------------

// n zeroed elements of scratch memory that stay with the thread (OpenMP's pool threads and the caller) between calls,
// up to kKeep bytes per Tag; larger requests get memory of their own. Fresh per-call vectors of channel or column
// totals (0.1-1 MB for 9728 channels or columns) cost their page faults on every call: ~65 us for an act_stats_ of
// one token, 30x its arithmetic. Tag tells apart the buffers one thread holds at once.
template <class T, int Tag>
class Scratch {
 public:
  explicit Scratch(size_t n) {
    constexpr size_t kKeep = size_t(4) << 20;
    std::vector<T>& kept = keep();
    if (n * sizeof(T) <= kKeep) {
      if (kept.size() < n) kept.resize(n);
      p_ = kept.data();
    } else {
      own_.resize(n);
      p_ = own_.data();
    }
    if (n) memset((void*)p_, 0, n * sizeof(T));
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }

 private:
  static std::vector<T>& keep() {
    static thread_local std::vector<T> v;
    return v;
  }
  std::vector<T> own_;
  T* p_ = nullptr;
};

// ---- runs of elements widened to fp32 (any stride, any dtype) ---------------------------------------------------

// out[i] = t[off + i * step], i < n. Unit stride: whole vectors (load_vec), then the scalar load_f32 for the rest.
template <int DT>
void load_run_t(const void* p, int64_t off, int64_t step, int64_t n, float* out) {
  if (step == 1) {
    int64_t i = 0;
    for (; i + kW <= n; i += kW) store_vf(out + i, load_vec<DT>(p, off + i));
    for (; i < n; ++i) out[i] = load_f32<DT>(p, off + i);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = load_f32<DT>(p, off + i * step);
  }
}

// out[i] = t[off + at[i] * step], i < n (a gather of listed positions).
template <int DT>
void load_gather_t(const void* p, int64_t off, int64_t step, const int64_t* at, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = load_f32<DT>(p, off + at[i] * step);
}

// kW elements base[pos[l]] (positions in elements, int32) widened to fp32, with the ISA's gather instruction (the
// scalar load_f32 per lane without one). The 16-bit dtypes gather the 32-bit word that ends with the element (the
// element in its high half), so nothing past an element is read; the word of the element at offset 0 would start
// before the tensor, so callers keep that position out (everything else lies within the tensor's storage).
template <int DT>
LPT_VINLINE vf gather_vec(const void* base, const int32_t* pos) {
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
  const __m512i ix = _mm512_loadu_si512((const void*)pos);
  if (DT == kF32) return (vf)_mm512_i32gather_ps(ix, base, 4);
  const vu x = (vu)_mm512_i32gather_epi32(ix, (const char*)base - 2, 2);
#else
  const __m256i ix = _mm256_loadu_si256((const __m256i*)pos);
  if (DT == kF32) return (vf)_mm256_i32gather_ps((const float*)base, ix, 4);
  const vu x = (vu)_mm256_i32gather_epi32((const int*)((const char*)base - 2), ix, 2);
#endif
  return DT == kBF16 ? (vf)(x & 0xffff0000u) : f16_vec(x >> 16);
#else
  vf v;
  for (int l = 0; l < kW; ++l) v[l] = load_f32<DT>(base, pos[l]);
  return v;
#endif
}

// out[i] = t[off + pos[i]], i < n, element by element (int32 positions: no multiply per element). AMD cores take
// longer for a gather instruction than for its loads one by one (Zen 3: ~14 cycles a vpgatherdd of 8, ~1 cycle an
// element here), so there the gathers go this way.
// Each listed element is prefetched kGatherAhead elements before it is loaded: the listed columns of a row are a
// forward stream with gaps, which the hardware prefetchers followed poorly (masked_cosine on 10% of down_proj's
// columns, ~3 elements a line: 1.15-1.25x as long without, on a Zen 3); only the lines read are fetched.
constexpr int64_t kGatherAhead = 64;
template <int DT>
void load_pos_t(const void* p, int64_t off, const int32_t* pos, int64_t n, float* out) {
  constexpr int64_t ES = DT == kF32 ? 4 : 2;
  const char* base = (const char*)p + off * ES;
  int64_t i = 0;
  for (; i + kGatherAhead + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) {
      __builtin_prefetch(base + pos[i + j + kGatherAhead] * ES);
      out[i + j] = load_f32<DT>(p, off + pos[i + j]);
    }
  for (; i < n; ++i) out[i] = load_f32<DT>(p, off + pos[i]);
}
inline void load_pos(const Tensor2D& t, int64_t off, const int32_t* pos, int64_t n, float* out) {
  switch (t.dtype) {
    case kF32: load_pos_t<kF32>(t.data, off, pos, n, out); break;
    case kBF16: load_pos_t<kBF16>(t.data, off, pos, n, out); break;
    default: load_pos_t<kF16>(t.data, off, pos, n, out); break;
  }
}
inline bool gather_instructions_pay() { return !amd_core(); }

// out[i] = t[off + pos[i]], i < n (a multiple of kW), by gather_vec; off + pos[i] must not be 0 (see gather_vec).
inline void load_gather_vec(const Tensor2D& t, int64_t off, const int32_t* pos, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += kW) {
    switch (t.dtype) {
      case kF32: store_vf(out + i, gather_vec<kF32>((const float*)t.data + off, pos + i)); break;
      case kBF16: store_vf(out + i, gather_vec<kBF16>((const uint16_t*)t.data + off, pos + i)); break;
      default: store_vf(out + i, gather_vec<kF16>((const uint16_t*)t.data + off, pos + i)); break;
    }
  }
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

}  // namespace
}  // namespace cpu
}  // namespace lpt
