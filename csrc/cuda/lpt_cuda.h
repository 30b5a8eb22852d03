// Plain C interface of the CUDA backend: raw device pointers, dtype codes (lpt::DType: 0 f32, 1 bf16, 2 f16), shapes
// and strides in elements, a device ordinal and a cudaStream_t passed as void*. No torch and no CUDA headers, so the
// pybind11 bindings compile with g++ alone and the library never depends on a torch version.
//
// Every function validates its scalar arguments, enqueues its kernels on `stream` and returns without synchronising
// with the host. Values inside device buffers (e.g. index ranges) are NOT checked here: lpt_kernels.ops validates
// them before it calls a backend. The caller must have made `device` current (torch.cuda.device guard); `device` is
// only used to size the grid.
//
// Return codes: LPT_CUDA_OK, LPT_CUDA_EINVAL (a bad argument: the Python side raises ValueError) or LPT_CUDA_ERUNTIME
// (a CUDA error, e.g. no driver, a launch failure: RuntimeError). lpt_cuda_last_error() gives the message of the
// last failure of the calling thread.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LPT_CUDA_OK 0
#define LPT_CUDA_EINVAL 1
#define LPT_CUDA_ERUNTIME 2
#define LPT_CUDA_MAX_INPUTS 8

const char* lpt_cuda_last_error(void);

// unit_gram over k (1..8) inputs of one shape [rows, cols]; input i is ptrs[i] with dtypes[i], strides0[i],
// strides1[i]. mode: 0 consecutive, 1 base, 2 given (M = k-1, k-1, k deltas). Unit u covers [u*block, (u+1)*block)
// along `axis`. index: null (U = shape[axis]/block units, in order) or int64 device array of n_index unit ids (U =
// n_index). Outputs are contiguous, written entirely (no need to zero them): gram [U,M,M] f32 (exactly symmetric),
// abs_sum [U,M] f32, abs_max [U,M] f32, zeros [U,M] int64, near_zeros [U,M] int64 (|d| <= atol + rtol*|ref|).
int lpt_cuda_unit_gram(int k, const void* const* ptrs, const int* dtypes, const int64_t* strides0,
                       const int64_t* strides1, int64_t rows, int64_t cols, int mode, int axis, int64_t block,
                       const int64_t* index, int64_t n_index, float atol, float rtol, float* gram, float* abs_sum,
                       float* abs_max, int64_t* zeros, int64_t* near_zeros, int device, void* stream);

// act_stats_: x [T, C] (dtype, strides sx0/sx1) accumulated in place into stats [5, C] float64 (strides ss0/ss1):
// row 0 += tokens counted, row 1 += sum|x|, row 2 += sum x^2, row 3 = max(row 3, max|x|), row 4 += count(|x| >
// threshold). mask: null or a [T] array of 1-byte bools (stride mask_stride); tokens whose byte is 0 are skipped.
int lpt_cuda_act_stats(const void* x, int dtype, int64_t T, int64_t C, int64_t sx0, int64_t sx1, double* stats,
                       int64_t ss0, int64_t ss1, const void* mask, int64_t mask_stride, float threshold, int device,
                       void* stream);

// rollback_: for each listed unit (index: n_index unique int64 unit ids on the device), in place on target [rows,
// cols]: t = round_to_target_dtype(fmaf(alpha, s - t, t)) (alpha == 1 stores round(s): an exact copy, target is not
// read). compact == 0: source has target's shape and unit u is read at the same place; compact != 0: source's extent
// along `axis` is n_index*block and the i-th listed unit is read from position i. Nothing else is touched.
int lpt_cuda_rollback(void* target, int target_dtype, int64_t rows, int64_t cols, int64_t ts0, int64_t ts1,
                      const void* source, int source_dtype, int64_t ss0, int64_t ss1, const int64_t* index,
                      int64_t n_index, int axis, int64_t block, float alpha, int compact, int device, void* stream);

#ifdef __cplusplus
}  // extern "C"
#endif
