// act_stats_ on the CPU: in-place accumulation of per-channel activation statistics over the tokens of x [T, C].
//
// Each thread owns a range of channels and streams every (unmasked) token row over it, one tile of channels at a
// time, with fp32 accumulators per channel in L1; every kRowBlock rows they are folded into the float64 stats, so
// the fp32 rounding error is bounded by the length of one block whatever the token count.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "load.h"

namespace lpt {
namespace cpu {
namespace LPT_ISA {
namespace {

constexpr int64_t kTile = 1024;     // channels per tile: 4 accumulators x 4 KiB + 4 KiB of converted input
constexpr int64_t kRowBlock = 256;  // tokens accumulated in fp32 before folding into float64

struct TileAcc {
  float abs_sum[kTile], sq_sum[kTile], abs_max[kTile], active[kTile];
};

}  // namespace

void act_stats(Tensor2D x, int64_t tokens, int64_t channels, const uint8_t* mask, double* stats, int64_t ss0,
               int64_t ss1, float threshold, int threads) {
  int64_t counted = 0;
  for (int64_t t = 0; t < tokens; ++t) counted += mask ? (mask[t] != 0) : 1;
#pragma omp parallel num_threads(threads)
  {
    int64_t lo, hi;
    split_range(channels, omp_get_num_threads(), omp_get_thread_num(), 16, &lo, &hi);
    alignas(64) float buf[kTile];
    auto* acc = new TileAcc;
    for (int64_t c0 = lo; c0 < hi; c0 += kTile) {
      const int64_t n = std::min(kTile, hi - c0);
      for (int64_t t0 = 0; t0 < tokens; t0 += kRowBlock) {
        std::memset(acc, 0, sizeof *acc);
        const int64_t t1 = std::min(tokens, t0 + kRowBlock);
        for (int64_t t = t0; t < t1; ++t) {
          if (mask && !mask[t]) continue;
          load_run(x, t * x.stride0 + c0 * x.stride1, x.stride1, n, buf);
          for (int64_t i = 0; i < n; ++i)
            act_update(buf[i], threshold, acc->abs_sum[i], acc->sq_sum[i], acc->abs_max[i], acc->active[i]);
        }
        for (int64_t i = 0; i < n; ++i) {
          double* col = stats + (c0 + i) * ss1;
          col[1 * ss0] += acc->abs_sum[i];
          col[2 * ss0] += acc->sq_sum[i];
          col[3 * ss0] = std::max(col[3 * ss0], (double)acc->abs_max[i]);
          col[4 * ss0] += acc->active[i];
        }
      }
      for (int64_t i = 0; i < n; ++i) stats[(c0 + i) * ss1] += (double)counted;
    }
    delete acc;
  }
}

}  // namespace LPT_ISA
}  // namespace cpu
}  // namespace lpt
