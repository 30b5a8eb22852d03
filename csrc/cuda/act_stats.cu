// act_stats_: per-channel activation statistics accumulated in place into stats [5, C] float64, without any host
// synchronisation (safe inside a forward hook): partial results go straight into `stats` with double atomics.
#include "common.cuh"

namespace lpt {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kSub = 64;   // tokens per fp32 sub-chunk (also the width of one mask ballot)
constexpr int kBatch = 4;  // token loads issued before they are used

struct ActArgs {
  const void* x;
  int64_t T, C, sx0, sx1, chunk;
  double* stats;
  int64_t ss0, ss1;
  const unsigned char* mask;
  int64_t ms;
  float threshold;
};

// One thread per channel c (a warp reads 32 adjacent channels of a token row: coalesced when x is row-major), one
// CTA row per chunk of tokens. Per element: reads size(dtype) bytes (2 for bf16) and does one conversion plus
// element.h's act_update (abs, add, fma, max-select, compare, add) and a pointer step: ~12 instructions per 2 bytes,
// 6 per byte, below the ~9 per byte an H100 issues at 3.35 TB/s, so memory-bound (fp32 inputs: 3 per byte). Sums
// run in fp32 over 64 tokens and are then folded into fp64 registers, so precision does not depend on T. The mask
// of 64 tokens is fetched once per warp (a ballot), so loads of x never wait on a mask load; masked-out tokens are
// not read. Commit: 5 double atomics per channel per chunk. Chunks are sized from the kernel's measured occupancy
// so that the grid is whole waves of resident CTAs (fit_split).
template <int DT, bool MASK>
__global__ void __launch_bounds__(kThreads) act_stats_kernel(const ActArgs a) {
  const int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const bool active = c < a.C;  // inactive lanes still take part in the ballots
  const int64_t t0 = (int64_t)blockIdx.y * a.chunk, t1 = min(a.T, t0 + a.chunk);
  const int lane = threadIdx.x & 31;
  const int64_t step = a.sx0 * (DT == kF32 ? 4 : 2);
  const char* q = (const char*)a.x + (t0 * a.sx0 + (active ? c : 0) * a.sx1) * (DT == kF32 ? 4 : 2);
  double n = 0.0, sum_abs = 0.0, sum_sq = 0.0, count = 0.0;
  float mx = 0.0f;
  for (int64_t tb = t0; tb < t1; tb += kSub) {
    const int len = (int)min((int64_t)kSub, t1 - tb);
    uint64_t keep = len == kSub ? ~0ull : (1ull << len) - 1;
    if (MASK) {
      const bool m0 = lane < len && a.mask[(tb + lane) * a.ms];
      const bool m1 = lane + 32 < len && a.mask[(tb + lane + 32) * a.ms];
      keep = (uint64_t)__ballot_sync(0xffffffffu, m0) | (uint64_t)__ballot_sync(0xffffffffu, m1) << 32;
    }
    float f_abs = 0.0f, f_sq = 0.0f, f_count = 0.0f;
    if (active) {
      int i = 0;
      for (; i + kBatch <= len; i += kBatch, q += kBatch * step) {  // issue kBatch loads, then use them
        float x[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b)
          if (!MASK || ((keep >> (i + b)) & 1)) x[b] = load_f32<DT>(q + b * step, 0);  // masked-out: not read
#pragma unroll
        for (int b = 0; b < kBatch; ++b)
          if (!MASK || ((keep >> (i + b)) & 1)) act_update(x[b], a.threshold, f_abs, f_sq, mx, f_count);
      }
      for (; i < len; ++i, q += step)
        if (!MASK || ((keep >> i) & 1)) act_update(load_f32<DT>(q, 0), a.threshold, f_abs, f_sq, mx, f_count);
    }
    n += __popcll(keep);
    sum_abs += f_abs;
    sum_sq += f_sq;
    count += f_count;
  }
  if (!active || n == 0.0) return;
  double* s = a.stats + c * a.ss1;
  atomicAdd(s, n);
  atomicAdd(s + a.ss0, sum_abs);
  atomicAdd(s + 2 * a.ss0, sum_sq);
  atomic_max_nonneg(s + 3 * a.ss0, (double)mx);
  atomicAdd(s + 4 * a.ss0, count);
}

template <int DT, bool MASK>
int launch(ActArgs a, int device, int sms, cudaStream_t s) {
  int per_sm = 0;
  if (int rc = resident_ctas<act_stats_kernel<DT, MASK>>(device, kThreads, &per_sm)) return rc;
  const int64_t col_blocks = ceil_div(a.C, kThreads);
  int64_t chunks = clamp64(fit_split(col_blocks, ceil_div(a.T, kSub), (int64_t)sms * per_sm), 1, 65535);
  a.chunk = split(a.T, chunks, kSub, &chunks);
  act_stats_kernel<DT, MASK><<<dim3((unsigned)col_blocks, (unsigned)chunks), kThreads, 0, s>>>(a);
  return check_launch("act_stats_");
}

template <int DT>
int launch_dt(const ActArgs& a, int device, int sms, cudaStream_t s) {
  return a.mask ? launch<DT, true>(a, device, sms, s) : launch<DT, false>(a, device, sms, s);
}

}  // namespace
}  // namespace cuda
}  // namespace lpt

using namespace lpt;
using namespace lpt::cuda;

extern "C" int lpt_cuda_act_stats(const void* x, int dtype, int64_t T, int64_t C, int64_t sx0, int64_t sx1,
                                  double* stats, int64_t ss0, int64_t ss1, const void* mask, int64_t mask_stride,
                                  float threshold, int device, void* stream) {
  if (!valid_dtype(dtype)) return fail(LPT_CUDA_EINVAL, "act_stats_: x has dtype code %d", dtype);
  if (T < 0 || C < 0) return fail(LPT_CUDA_EINVAL, "act_stats_: negative shape [%lld, %lld]", (long long)T,
                                  (long long)C);
  if (T == 0 || C == 0) return LPT_CUDA_OK;
  if (!x || !stats) return fail(LPT_CUDA_EINVAL, "act_stats_: null x or stats");
  int sms = 0;
  if (int rc = sm_count(device, &sms)) return rc;

  ActArgs a{};
  a.x = x;
  a.T = T;
  a.C = C;
  a.sx0 = sx0;
  a.sx1 = sx1;
  a.stats = stats;
  a.ss0 = ss0;
  a.ss1 = ss1;
  a.mask = (const unsigned char*)mask;
  a.ms = mask_stride;
  a.threshold = threshold;
  if (ceil_div(C, kThreads) > 0x7fffffff)
    return fail(LPT_CUDA_EINVAL, "act_stats_: %lld channels is too many", (long long)C);
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == kF32) return launch_dt<kF32>(a, device, sms, s);
  if (dtype == kBF16) return launch_dt<kBF16>(a, device, sms, s);
  return launch_dt<kF16>(a, device, sms, s);
}
