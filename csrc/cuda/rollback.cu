// rollback_: in place on the listed units, target = round(fmaf(alpha, source - target, target)) (element.h's lerp
// and store_from_f32, so the result is bit-identical to the CPU backend's; alpha == 1 copies round(source) and does
// not read the target, and with equal dtypes it copies the raw words: exact, NaN payloads included).
//
// Index space as in unit_gram: virtual row v = p*block + i (p-th listed unit, index i inside it) times j along the
// other dimension. Per element: reads the source (2 or 4 bytes), reads the target unless alpha == 1, writes the
// target; ~10 instructions per 4-12 bytes: memory-bound. Loads and stores are scalar; a warp touches 32 adjacent
// elements (64 or 128 contiguous bytes), i.e. whole sectors, in the layout the kernel is chosen for.
#include "common.cuh"

namespace lpt {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBatch = 4;  // elements per thread whose loads are issued before their stores

struct RbArgs {
  void* t;
  const void* s;
  int64_t tsa, tso, ssa, sso;  // strides along the axis / the other dimension, target and source
  const int64_t* index;
  int64_t block, L, nv, chunk;
  float alpha;
  int compact;
};

// Start offsets of virtual row v in target and source.
__device__ __forceinline__ void row_starts(const RbArgs& a, int64_t v, int64_t& to, int64_t& so) {
  const uint32_t p = (uint32_t)v / (uint32_t)a.block, i = (uint32_t)v - p * (uint32_t)a.block;  // v < 2^31 (host)
  const int64_t unit = a.index[p];
  to = (unit * a.block + i) * a.tsa;
  so = ((a.compact ? p : unit) * a.block + i) * a.ssa;
}

// kBatch elements e*step apart from (to, so): every load is issued before the first store (the compiler may not
// move a load of the source above a store to the target: it cannot know that they do not overlap).
template <int TD, int SD>
__device__ __forceinline__ void move(const RbArgs& a, int64_t to, int64_t so, int64_t tstep, int64_t sstep, int n) {
  if constexpr (TD == SD) {
    if (a.alpha == 1.0f) {  // the raw words: a conversion through fp32 would quiet NaNs (bf16 0x7f81 -> 0x7fc1)
      using Word = typename std::conditional<TD == kF32, uint32_t, uint16_t>::type;
      Word w[kBatch];
#pragma unroll
      for (int e = 0; e < kBatch; ++e)
        if (e < n) w[e] = ((const Word*)a.s)[so + e * sstep];
#pragma unroll
      for (int e = 0; e < kBatch; ++e)
        if (e < n) ((Word*)a.t)[to + e * tstep] = w[e];
      return;
    }
  }
  float s[kBatch], t[kBatch];
#pragma unroll
  for (int e = 0; e < kBatch; ++e) {
    t[e] = 0.0f;  // lerp ignores t when alpha == 1: the target is then not read
    if (e < n) s[e] = load_f32<SD>(a.s, so + e * sstep);
    if (e < n && a.alpha != 1.0f) t[e] = load_f32<TD>(a.t, to + e * tstep);
  }
#pragma unroll
  for (int e = 0; e < kBatch; ++e)
    if (e < n) store_from_f32<TD>(a.t, to + e * tstep, lerp(t[e], s[e], a.alpha));
}

// Target contiguous along j (axis 0 of a row-major tensor): CTA rows (y) walk virtual rows, threads walk j.
template <int TD, int SD>
__global__ void __launch_bounds__(kThreads) rollback_rows(const RbArgs a) {
  const int64_t step = (int64_t)gridDim.x * kThreads;
  for (int64_t v = blockIdx.y; v < a.nv; v += gridDim.y) {
    int64_t tr, sr;
    row_starts(a, v, tr, sr);
    for (int64_t j = (int64_t)blockIdx.x * kThreads + threadIdx.x; j < a.L; j += kBatch * step)
      move<TD, SD>(a, tr + j * a.tso, sr + j * a.sso, step * a.tso, step * a.sso,
                   (int)min((int64_t)kBatch, (a.L - j + step - 1) / step));
  }
}

// Target contiguous along the axis (axis 1 of a row-major tensor): a thread owns virtual row v, CTA rows (y) walk
// chunks of j; adjacent threads touch adjacent elements.
template <int TD, int SD>
__global__ void __launch_bounds__(kThreads) rollback_cols(const RbArgs a) {
  const int64_t v = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (v >= a.nv) return;
  int64_t tr, sr;
  row_starts(a, v, tr, sr);
  const int64_t j0 = (int64_t)blockIdx.y * a.chunk, j1 = min(a.L, j0 + a.chunk);
  for (int64_t j = j0; j < j1; j += kBatch)
    move<TD, SD>(a, tr + j * a.tso, sr + j * a.sso, a.tso, a.sso, (int)min((int64_t)kBatch, j1 - j));
}

template <int TD, int SD>
int launch(RbArgs a, bool rows, int device, int sms, cudaStream_t s) {
  if (rows) {
    const dim3 grid((unsigned)clamp64(ceil_div(a.L, kThreads * kBatch), 1, 65535), (unsigned)clamp64(a.nv, 1, 65535));
    rollback_rows<TD, SD><<<grid, kThreads, 0, s>>>(a);
  } else {
    int per_sm = 0;
    if (int rc = resident_ctas<rollback_cols<TD, SD>>(device, kThreads, &per_sm)) return rc;
    const int64_t col_blocks = ceil_div(a.nv, kThreads);
    int64_t chunks = clamp64(fit_split(col_blocks, ceil_div(a.L, 64), (int64_t)sms * per_sm), 1, 65535);
    a.chunk = split(a.L, chunks, 1, &chunks);
    rollback_cols<TD, SD><<<dim3((unsigned)col_blocks, (unsigned)chunks), kThreads, 0, s>>>(a);
  }
  return check_launch("rollback_");
}

template <int TD>
int launch_sd(int sd, const RbArgs& a, bool rows, int device, int sms, cudaStream_t s) {
  if (sd == kF32) return launch<TD, kF32>(a, rows, device, sms, s);
  if (sd == kBF16) return launch<TD, kBF16>(a, rows, device, sms, s);
  return launch<TD, kF16>(a, rows, device, sms, s);
}

}  // namespace
}  // namespace cuda
}  // namespace lpt

using namespace lpt;
using namespace lpt::cuda;

extern "C" int lpt_cuda_rollback(void* target, int target_dtype, int64_t rows, int64_t cols, int64_t ts0, int64_t ts1,
                                 const void* source, int source_dtype, int64_t ss0, int64_t ss1, const int64_t* index,
                                 int64_t n_index, int axis, int64_t block, float alpha, int compact, int device,
                                 void* stream) {
  if (!valid_dtype(target_dtype)) return fail(LPT_CUDA_EINVAL, "rollback_: target has dtype code %d", target_dtype);
  if (!valid_dtype(source_dtype)) return fail(LPT_CUDA_EINVAL, "rollback_: source has dtype code %d", source_dtype);
  if (axis != 0 && axis != 1) return fail(LPT_CUDA_EINVAL, "rollback_: axis %d is not 0 or 1", axis);
  if (rows < 0 || cols < 0) return fail(LPT_CUDA_EINVAL, "rollback_: negative shape [%lld, %lld]", (long long)rows,
                                        (long long)cols);
  const int64_t along = axis == 0 ? rows : cols, L = axis == 0 ? cols : rows;
  if (block < 1 || along % block != 0)
    return fail(LPT_CUDA_EINVAL, "rollback_: block %lld does not divide the extent %lld along axis %d",
                (long long)block, (long long)along, axis);
  if (n_index < 0) return fail(LPT_CUDA_EINVAL, "rollback_: n_index %lld < 0", (long long)n_index);
  if (along > 0x7fffffff || n_index * block > 0x7fffffff)  // 32-bit unit arithmetic in the kernels
    return fail(LPT_CUDA_EINVAL, "rollback_: more than 2^31-1 indices along axis %d", axis);
  if (n_index == 0 || L == 0) return LPT_CUDA_OK;
  if (!target || !source || !index) return fail(LPT_CUDA_EINVAL, "rollback_: null target, source or index");
  int sms = 0;
  if (int rc = sm_count(device, &sms)) return rc;

  RbArgs a{};
  a.t = target;
  a.s = source;
  a.tsa = axis == 0 ? ts0 : ts1;
  a.tso = L == 1 ? 1 : (axis == 0 ? ts1 : ts0);
  a.ssa = axis == 0 ? ss0 : ss1;
  a.sso = axis == 0 ? ss1 : ss0;
  a.index = index;
  a.block = block;
  a.L = L;
  a.nv = n_index * block;
  a.alpha = alpha;
  a.compact = compact != 0;
  const bool use_rows = a.tso == 1 || a.tsa != 1;  // the layout of the target (it is read and written)
  cudaStream_t s = (cudaStream_t)stream;
  if (target_dtype == kF32) return launch_sd<kF32>(source_dtype, a, use_rows, device, sms, s);
  if (target_dtype == kBF16) return launch_sd<kBF16>(source_dtype, a, use_rows, device, sms, s);
  return launch_sd<kF16>(source_dtype, a, use_rows, device, sms, s);
}
