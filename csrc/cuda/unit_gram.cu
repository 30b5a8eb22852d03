// unit_gram: per-unit Gram matrix of the M deltas of K checkpoints, plus |d| sum, |d| max, exact-zero and near-zero
// counts, in one pass that reads every byte of every input once.
//
// Index space: a unit is `block` consecutive indices i along `axis` times every index j of the other dimension
// (extent L); input k holds element (i, j) at i*sa[k] + j*so[k]. Two kernels cover the two memory layouts:
//   gram_rows  j contiguous (so == 1: axis 0 of a row-major tensor): CTAs own (unit, split) tiles and stride along
//              the contiguous rows with 16-/8-byte vector loads, then reduce through warp shuffles + shared memory.
//   gram_cols  i contiguous (sa == 1: axis 1 of a row-major tensor): each thread owns one column of one unit and walks
//              a chunk of rows, so a warp reads 32 adjacent elements of a row; lanes of one unit are reduced by
//              shuffles, chunks by atomics.
// Both accumulate in fp32 registers (templated on M and the mode, so nothing is indexed at run time) and combine the
// partial results with atomics into zeroed outputs; a last tiny kernel mirrors the Gram triangle so the matrix is
// exactly symmetric. Input dtypes are dispatched per load (mixed dtypes are allowed; the branch is warp-uniform).
#include "common.cuh"

namespace lpt {
namespace cuda {
namespace {

// Threads and minimum resident CTAs of gram_rows for K inputs and M deltas. Up to 7 inputs: 256 x 2 (<= 128
// registers, no spills). The 8-input instances need 146-168 registers: as 256-thread CTAs they ran one per SM, each
// reading one unit's row and then reducing ~60 values with nothing overlapping it (about a third of HBM bandwidth).
// As 128-thread CTAs, four per SM (128 registers, no spills on sm_80/sm_90) with 7 deltas, three (168 registers; 128
// spills on sm_80) with 8 given deltas: one CTA's reduction overlaps the others' loads, and 12-16 warps keep 24-32 KB
// of 8-input loads in flight per SM instead of 16 KB.
template <int K, int M>
struct RowCfg {
  static constexpr int kThreads = K <= 7 ? 256 : 128;
  static constexpr int kMinCtas = K <= 7 ? 2 : (M <= 7 ? 4 : 3);
};
constexpr int kColThreads = 128;
constexpr int kColBatch = 4;  // rows whose loads gram_cols issues before using them
constexpr int kMax = LPT_CUDA_MAX_INPUTS;

struct GramArgs {
  const void* ptr[kMax];
  int dt[kMax];
  int64_t sa[kMax];        // stride (elements) along `axis`
  int64_t so[kMax];        // stride (elements) along the other dimension
  int64_t so_bytes[kMax];  // so * element size: the per-row pointer step of gram_cols
  const int64_t* index;    // unit ids or null
  int64_t block, L;
  // gram_rows: a unit is `rows` rows of `row_len` elements, row i starting at (unit*block + i)*sa (rows == 1 and
  // row_len == block*L when the whole unit is contiguous); CTA y covers one (row split, column split) tile.
  int64_t rows, row_len, rows_per_split, cols_per_split;
  int row_splits, vec;
  // gram_cols: nv = U*block virtual columns, rows chunked along y; `width` lanes share a unit (1, 2, 4, ..., 32).
  int64_t nv, rows_per_chunk;
  int width;
  float atol, rtol;
  float* gram;
  float* abs_sum;
  float* abs_max;
  unsigned long long* zeros;
  unsigned long long* near_zeros;
};

// Register accumulators of one thread: f = [Gram upper triangle (row-major) | abs_sum | abs_max], c = [zeros | near].
template <int M, int MODE>
struct Acc {
  static constexpr int K = MODE == kGiven ? M : M + 1;
  static constexpr int NT = M * (M + 1) / 2;
  static constexpr int NF = NT + 2 * M;
  static constexpr int NC = 2 * M;
  float f[NF];
  int c[NC];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int t = 0; t < NF; ++t) f[t] = 0.0f;
#pragma unroll
    for (int t = 0; t < NC; ++t) c[t] = 0;
  }

  // One element position of the K inputs: all the arithmetic is element.h's.
  __device__ __forceinline__ void add(const float (&w)[K], float atol, float rtol) {
    float d[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      d[m] = delta<MODE>(w, m);
      abs_update(d[m], f[NT + m], f[NT + M + m]);
      c[m] += is_zero(d[m]);
      c[M + m] += is_near_zero(d[m], delta_ref<MODE>(w, m), atol, rtol);
    }
    int t = 0;
#pragma unroll
    for (int a = 0; a < M; ++a)
#pragma unroll
      for (int b = a; b < M; ++b, ++t) f[t] = fmaf(d[a], d[b], f[t]);
  }

  // Reduce over `width` aligned lanes of the warp (all 32 lanes must call).
  __device__ __forceinline__ void warp_reduce(int width) {
#pragma unroll
    for (int t = 0; t < NF; ++t) f[t] = t < NT + M ? warp_sum(f[t], width) : warp_max(f[t], width);
#pragma unroll
    for (int t = 0; t < NC; ++t) c[t] = warp_sum(c[t], width);
  }
};

// Add value t of the f (or c) layout to unit position p of the zeroed outputs. Zeros are skipped (a no-op for sums,
// and maxima are of non-negative values): sparse updates leave many all-zero partials.
template <int M>
__device__ __forceinline__ void commit_f(const GramArgs& a, int64_t p, int t, float v) {
  constexpr int NT = M * (M + 1) / 2;
  if (v == 0.0f) return;
  if (t < NT) {
    int r = 0, c = t;
    while (c >= M - r) c -= M - r++;
    atomicAdd(&a.gram[(p * M + r) * M + r + c], v);  // upper triangle only; mirrored at the end
  } else if (t < NT + M) {
    atomicAdd(&a.abs_sum[p * M + (t - NT)], v);
  } else {
    atomic_max_nonneg(&a.abs_max[p * M + (t - NT - M)], v);
  }
}

template <int M>
__device__ __forceinline__ void commit_c(const GramArgs& a, int64_t p, int t, int v) {
  if (v == 0) return;
  atomicAdd((t < M ? a.zeros : a.near_zeros) + p * M + (t < M ? t : t - M), (unsigned long long)v);
}

template <int M, int MODE, int V, int THREADS>
__device__ __forceinline__ void row_loop(const GramArgs& a, int64_t unit, int64_t i0, int64_t i1, int64_t j0,
                                         int64_t j1, Acc<M, MODE>& acc) {
  constexpr int K = Acc<M, MODE>::K;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = unit * a.block + i;
    for (int64_t j = j0 + (int64_t)threadIdx.x * V; j < j1; j += THREADS * V) {
      float w[K][V];
      if constexpr (V == 4) {  // so == 1 and 4-aligned rows (checked on the host)
        uint4 raw[K];
#pragma unroll
        for (int k = 0; k < K; ++k) raw[k] = load_raw4(a.ptr[k], a.dt[k], row * a.sa[k] + j);
#pragma unroll
        for (int k = 0; k < K; ++k) raw4_to_f32(raw[k], a.dt[k], w[k]);
      } else {
        uint32_t raw[K];
#pragma unroll
        for (int k = 0; k < K; ++k) raw[k] = load_raw(a.ptr[k], a.dt[k], row * a.sa[k] + j * a.so[k]);
#pragma unroll
        for (int k = 0; k < K; ++k) w[k][0] = raw_to_f32(raw[k], a.dt[k]);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float x[K];
#pragma unroll
        for (int k = 0; k < K; ++k) x[k] = w[k][e];
        acc.add(x, a.atol, a.rtol);
      }
    }
  }
}

// Per element position: reads sum_k size(dtype_k) bytes (2K for bf16, 4K for fp32) and does K conversions, M
// subtractions, M(M+1)/2 FMAs and ~9M compare/select/add ops for the four statistics: from ~15 instructions per 4
// bytes (K=2 bf16) to ~100 per 16 bytes (K=8 bf16), i.e. 4-7 instructions per byte against the ~9 per byte an H100
// issues at 3.35 TB/s (132 SMs x 128 lanes x ~1.8 GHz): memory-bound, with vector loads keeping the load count at
// one instruction per 4 elements per input. Per-thread runs are capped at ~4096 elements (fp32 rounding), the
// per-CTA reduction (~NF+NC shuffles per warp, NF+NC atomics per CTA) is amortised over >= 4096 elements.
// At least two 256-thread CTAs per SM (<= 128 registers) keep >= 16 KB of loads in flight per SM; the 8-input
// instances run three or four 128-thread CTAs per SM instead (RowCfg).
template <int M, int MODE>
__global__ void __launch_bounds__(RowCfg<Acc<M, MODE>::K, M>::kThreads, RowCfg<Acc<M, MODE>::K, M>::kMinCtas)
    gram_rows(const GramArgs a) {
  using A = Acc<M, MODE>;
  constexpr int kThreads = RowCfg<A::K, M>::kThreads;
  const int64_t p = blockIdx.x;
  const int64_t unit = a.index ? a.index[p] : p;
  const int64_t rs = blockIdx.y % a.row_splits, cs = blockIdx.y / a.row_splits;
  const int64_t i0 = rs * a.rows_per_split, i1 = min(a.rows, i0 + a.rows_per_split);
  const int64_t j0 = cs * a.cols_per_split, j1 = min(a.row_len, j0 + a.cols_per_split);
  A acc;
  acc.init();
  if (a.vec) row_loop<M, MODE, 4, kThreads>(a, unit, i0, i1, j0, j1, acc);
  else row_loop<M, MODE, 1, kThreads>(a, unit, i0, i1, j0, j1, acc);

  // CTA reduction: shuffles within each warp, then one thread per statistic across the warps, then one atomic.
  constexpr int NW = kThreads / 32;
  __shared__ float sf[NW][A::NF];
  __shared__ int sc[NW][A::NC];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc.warp_reduce(32);
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < A::NF; ++t) sf[warp][t] = acc.f[t];
#pragma unroll
    for (int t = 0; t < A::NC; ++t) sc[warp][t] = acc.c[t];
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < A::NF) {
    float v = sf[0][t];
    for (int w = 1; w < NW; ++w) {
      const float x = sf[w][t];
      v = t < A::NT + M ? v + x : (x > v ? x : v);
    }
    commit_f<M>(a, p, t, v);
  } else if (t < A::NF + A::NC) {
    int v = 0;
    for (int w = 0; w < NW; ++w) v += sc[w][t - A::NF];
    commit_c<M>(a, p, t - A::NF, v);
  }
}

// Per element position: the same bytes and arithmetic as gram_rows, with one scalar load per input (a warp reads
// 32 adjacent elements of a row: 64 or 128 contiguous bytes, full sectors) and a pointer step per input. A row
// chunk is >= 64 rows (up to 2048), so the per-thread commit (NF+NC atomics, fewer after the lane reduction) costs
// well under one atomic per 100 bytes read. Loads of 4 rows are issued before they are used: 4K loads in flight.
template <int M, int MODE>
__global__ void __launch_bounds__(kColThreads) gram_cols(const GramArgs a) {
  using A = Acc<M, MODE>;
  constexpr int K = A::K;
  const int64_t v = (int64_t)blockIdx.x * kColThreads + threadIdx.x;
  const bool active = v < a.nv;
  const int64_t p = active ? (uint32_t)v / (uint32_t)a.block : 0;  // v < 2^31 (checked on the host)
  const int64_t unit = active && a.index ? a.index[p] : p;
  const int64_t col = unit * a.block + (v - p * a.block);
  const int64_t j0 = (int64_t)blockIdx.y * a.rows_per_chunk, j1 = min(a.L, j0 + a.rows_per_chunk);
  A acc;
  acc.init();
  if (active) {
    const char* q[K];
#pragma unroll
    for (int k = 0; k < K; ++k)
      q[k] = (const char*)a.ptr[k] + (col * a.sa[k] + j0 * a.so[k]) * (a.dt[k] == kF32 ? 4 : 2);
    const int n = (int)(j1 - j0);  // rows of this chunk (<= 2048 unless L > 2048 * 65535)
    int r = 0;
    for (; r + kColBatch <= n; r += kColBatch) {  // kColBatch*K loads in flight per thread, then the arithmetic
      uint32_t raw[kColBatch][K];
#pragma unroll
      for (int b = 0; b < kColBatch; ++b)
#pragma unroll
        for (int k = 0; k < K; ++k) raw[b][k] = load_raw(q[k] + b * a.so_bytes[k], a.dt[k], 0);
#pragma unroll
      for (int k = 0; k < K; ++k) q[k] += kColBatch * a.so_bytes[k];
#pragma unroll
      for (int b = 0; b < kColBatch; ++b) {
        float w[K];
#pragma unroll
        for (int k = 0; k < K; ++k) w[k] = raw_to_f32(raw[b][k], a.dt[k]);
        acc.add(w, a.atol, a.rtol);
      }
    }
    for (; r < n; ++r) {
      uint32_t raw[K];
#pragma unroll
      for (int k = 0; k < K; ++k) raw[k] = load_raw(q[k], a.dt[k], 0);
      float w[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        w[k] = raw_to_f32(raw[k], a.dt[k]);
        q[k] += a.so_bytes[k];
      }
      acc.add(w, a.atol, a.rtol);
    }
  }
  acc.warp_reduce(a.width);
  if (active && (threadIdx.x & (a.width - 1)) == 0) {
#pragma unroll
    for (int t = 0; t < A::NF; ++t) commit_f<M>(a, p, t, acc.f[t]);
#pragma unroll
    for (int t = 0; t < A::NC; ++t) commit_c<M>(a, p, t, acc.c[t]);
  }
}

// The outputs are accumulated with atomics: zero them first (one launch for all five).
__global__ void zero_outputs(float* gram, int64_t n_gram, float* abs_sum, float* abs_max, unsigned long long* zeros,
                             unsigned long long* near_zeros, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_gram; i += stride) gram[i] = 0.0f;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    abs_sum[i] = 0.0f;
    abs_max[i] = 0.0f;
    zeros[i] = 0;
    near_zeros[i] = 0;
  }
}

// Copy the accumulated upper triangle onto the lower one: G is exactly symmetric.
__global__ void mirror_gram(float* gram, int64_t U, int M) {
  const int64_t n = U * M * M, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t u = i / (M * M);
    const int r = (int)(i / M % M), c = (int)(i % M);
    if (r > c) gram[i] = gram[(u * M + c) * M + r];
  }
}

int small_grid(int64_t n, int sms) { return (int)clamp64(ceil_div(n, 256), 1, 4 * (int64_t)sms); }

// The grid of one kernel instance: whole waves of the CTAs that fit on the device (its measured occupancy, see
// fit_split), per-thread runs bounded for fp32 rounding. gram_rows: U units x splits of each unit's E elements, a CTA
// taking 16..4096 elements per thread; gram_cols: column blocks x row chunks of 64..2048 rows.
template <int M, int MODE>
int launch(GramArgs a, bool rows, int64_t U, int device, int sms, cudaStream_t s) {
  if (rows) {
    constexpr int T = RowCfg<Acc<M, MODE>::K, M>::kThreads;
    int per_sm = 0;
    if (int rc = resident_ctas<gram_rows<M, MODE>>(device, T, &per_sm)) return rc;
    const int64_t E = a.rows * a.row_len, min_cta = T * 16, max_cta = (int64_t)T * 4096;
    int64_t splits = std::max(ceil_div(E, max_cta), fit_split(U, ceil_div(E, min_cta), (int64_t)sms * per_sm));
    splits = clamp64(splits, 1, 65535);
    int64_t row_splits = std::min(splits, a.rows), col_splits = 1;
    a.rows_per_split = split(a.rows, row_splits, 1, &row_splits);
    a.cols_per_split = split(a.row_len, ceil_div(splits, row_splits), 4, &col_splits);
    if (row_splits * col_splits > 65535) a.cols_per_split = split(a.row_len, 1, 4, &col_splits);
    a.row_splits = (int)row_splits;
    gram_rows<M, MODE><<<dim3((unsigned)U, (unsigned)(row_splits * col_splits)), T, 0, s>>>(a);
  } else {
    int per_sm = 0;
    if (int rc = resident_ctas<gram_cols<M, MODE>>(device, kColThreads, &per_sm)) return rc;
    const int64_t col_blocks = ceil_div(a.nv, kColThreads);
    int64_t chunks = std::max(ceil_div(a.L, 2048), fit_split(col_blocks, ceil_div(a.L, 64), (int64_t)sms * per_sm));
    chunks = clamp64(chunks, 1, 65535);
    a.rows_per_chunk = split(a.L, chunks, 1, &chunks);
    gram_cols<M, MODE><<<dim3((unsigned)col_blocks, (unsigned)chunks), kColThreads, 0, s>>>(a);
  }
  return check_launch("unit_gram");
}

// M = 1..7 for consecutive/base (K = M+1 <= 8), 1..8 for given; base with M = 1 is consecutive (same delta and ref).
template <int MODE, int M = 1>
int dispatch(int m, const GramArgs& a, bool rows, int64_t U, int device, int sms, cudaStream_t s) {
  if constexpr (M > kMax || (MODE != kGiven && M + 1 > kMax)) {
    return fail(LPT_CUDA_EINVAL, "unit_gram: %d deltas is out of range", m);
  } else {
    if (m == M) return launch<M, (MODE == kBase && M == 1) ? kConsecutive : MODE>(a, rows, U, device, sms, s);
    return dispatch<MODE, M + 1>(m, a, rows, U, device, sms, s);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace lpt

using namespace lpt;
using namespace lpt::cuda;

extern "C" const char* lpt_cuda_last_error(void) { return last_error().c_str(); }

extern "C" int lpt_cuda_unit_gram(int k, const void* const* ptrs, const int* dtypes, const int64_t* strides0,
                                  const int64_t* strides1, int64_t rows, int64_t cols, int mode, int axis,
                                  int64_t block, const int64_t* index, int64_t n_index, float atol, float rtol,
                                  float* gram, float* abs_sum, float* abs_max, int64_t* zeros, int64_t* near_zeros,
                                  int device, void* stream) {
  // ---- validation of everything a kernel relies on -------------------------------------------------------------
  if (k < 1 || k > kMax) return fail(LPT_CUDA_EINVAL, "unit_gram: %d inputs, expected 1..%d", k, kMax);
  if (mode != kConsecutive && mode != kBase && mode != kGiven)
    return fail(LPT_CUDA_EINVAL, "unit_gram: mode %d is not 0 (consecutive), 1 (base) or 2 (given)", mode);
  const int M = num_deltas(mode, k);
  if (M < 1) return fail(LPT_CUDA_EINVAL, "unit_gram: mode %d needs at least 2 inputs, got %d", mode, k);
  if (axis != 0 && axis != 1) return fail(LPT_CUDA_EINVAL, "unit_gram: axis %d is not 0 or 1", axis);
  if (rows < 0 || cols < 0) return fail(LPT_CUDA_EINVAL, "unit_gram: negative shape [%lld, %lld]", (long long)rows,
                                        (long long)cols);
  const int64_t along = axis == 0 ? rows : cols, L = axis == 0 ? cols : rows;
  if (block < 1 || along % block != 0)
    return fail(LPT_CUDA_EINVAL, "unit_gram: block %lld does not divide the extent %lld along axis %d",
                (long long)block, (long long)along, axis);
  if (index && n_index < 0) return fail(LPT_CUDA_EINVAL, "unit_gram: n_index %lld < 0", (long long)n_index);
  if (along > 0x7fffffff || (index && n_index * block > 0x7fffffff))  // 32-bit unit arithmetic in the kernels
    return fail(LPT_CUDA_EINVAL, "unit_gram: more than 2^31-1 indices along axis %d", axis);
  const int64_t U = index ? n_index : along / block;
  if (U == 0) return LPT_CUDA_OK;
  if (!gram || !abs_sum || !abs_max || !zeros || !near_zeros) return fail(LPT_CUDA_EINVAL, "unit_gram: null output");

  GramArgs a{};
  int to_rows = 0, to_cols = 0;  // layout votes
  for (int i = 0; i < k; ++i) {
    if (!valid_dtype(dtypes[i])) return fail(LPT_CUDA_EINVAL, "unit_gram: input %d has dtype code %d", i, dtypes[i]);
    if (!ptrs[i] && L > 0) return fail(LPT_CUDA_EINVAL, "unit_gram: input %d is a null pointer", i);
    a.ptr[i] = ptrs[i];
    a.dt[i] = dtypes[i];
    a.sa[i] = axis == 0 ? strides0[i] : strides1[i];
    a.so[i] = axis == 0 ? strides1[i] : strides0[i];
    if (L == 1) a.so[i] = 1;  // the stride of an extent-1 dimension is arbitrary in torch
    a.so_bytes[i] = a.so[i] * dtype_size(dtypes[i]);
    to_rows += a.so[i] == 1;
    to_cols += a.sa[i] == 1 && a.so[i] != 1;
  }
  a.index = index;
  a.block = block;
  a.L = L;
  a.atol = atol;
  a.rtol = rtol;
  a.gram = gram;
  a.abs_sum = abs_sum;
  a.abs_max = abs_max;
  a.zeros = (unsigned long long*)zeros;
  a.near_zeros = (unsigned long long*)near_zeros;

  int sms = 0;
  if (int rc = sm_count(device, &sms)) return rc;
  cudaStream_t s = (cudaStream_t)stream;
  zero_outputs<<<small_grid(U * M * M, sms), 256, 0, s>>>(gram, U * M * M, abs_sum, abs_max, a.zeros, a.near_zeros,
                                                         U * M);
  if (int rc = check_launch("unit_gram (zero outputs)")) return rc;
  if (L == 0) return LPT_CUDA_OK;  // empty units: all statistics are zero

  // ---- layout: which kernel, row geometry (the grid is sized per kernel instance in launch) --------------------
  const bool use_rows = to_rows >= to_cols;
  if (use_rows) {
    bool merged = block == 1, vec = true;
    if (!merged) {
      merged = true;
      for (int i = 0; i < k; ++i) merged = merged && a.so[i] == 1 && a.sa[i] == L;
    }
    a.rows = merged ? 1 : block;
    a.row_len = merged ? block * L : L;
    for (int i = 0; i < k; ++i) {
      const int64_t row_align = a.rows == 1 ? block * a.sa[i] : a.sa[i];  // every row start must be 4-aligned
      vec = vec && a.so[i] == 1 && row_align % 4 == 0 &&
            (uintptr_t)ptrs[i] % (uintptr_t)(4 * dtype_size(dtypes[i])) == 0;
    }
    a.vec = vec && a.row_len % 4 == 0;
  } else {
    a.nv = U * block;
    a.width = block % 32 == 0 ? 32 : (32 % block == 0 ? (int)block : 1);
  }

  int rc;
  if (mode == kConsecutive) rc = dispatch<kConsecutive>(M, a, use_rows, U, device, sms, s);
  else if (mode == kBase) rc = dispatch<kBase>(M, a, use_rows, U, device, sms, s);
  else rc = dispatch<kGiven>(M, a, use_rows, U, device, sms, s);
  if (rc || M == 1) return rc;
  mirror_gram<<<small_grid(U * M * M, sms), 256, 0, s>>>(gram, U, M);
  return check_launch("unit_gram (mirror)");
}
