// pybind11 module lpt_kernels._C_cuda: thin wrappers over the C interface of lpt_cuda.h. Compiled by g++ with no
// torch and no CUDA headers; pointers and the stream handle arrive as Python ints (tensor.data_ptr(),
// torch.cuda.Stream.cuda_stream). A non-zero return code becomes ValueError (bad argument) or RuntimeError (CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "lpt_cuda.h"

namespace py = pybind11;

namespace {

void* ptr(uint64_t p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }

// The C call runs without the GIL (it only enqueues work); the exception is raised once the GIL is back.
template <class F>
void call(F&& f) {
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = f();
  }
  if (rc == LPT_CUDA_OK) return;
  if (rc == LPT_CUDA_EINVAL) throw py::value_error(lpt_cuda_last_error());
  throw std::runtime_error(lpt_cuda_last_error());
}

void unit_gram(const std::vector<uint64_t>& ptrs, const std::vector<int>& dtypes, const std::vector<int64_t>& strides0,
               const std::vector<int64_t>& strides1, int64_t rows, int64_t cols, int mode, int axis, int64_t block,
               uint64_t index, int64_t n_index, float atol, float rtol, uint64_t gram, uint64_t abs_sum,
               uint64_t abs_max, uint64_t zeros, uint64_t near_zeros, int device, uint64_t stream) {
  const size_t k = ptrs.size();
  if (dtypes.size() != k || strides0.size() != k || strides1.size() != k)
    throw py::value_error("unit_gram: ptrs, dtypes, strides0 and strides1 must have the same length");
  if (k < 1 || k > LPT_CUDA_MAX_INPUTS) throw py::value_error("unit_gram: expected 1 to 8 inputs");
  std::vector<const void*> p(k);
  for (size_t i = 0; i < k; ++i) p[i] = ptr(ptrs[i]);
  call([&] {
    return lpt_cuda_unit_gram((int)k, p.data(), dtypes.data(), strides0.data(), strides1.data(), rows, cols, mode, axis,
                              block, (const int64_t*)ptr(index), n_index, atol, rtol, (float*)ptr(gram),
                              (float*)ptr(abs_sum), (float*)ptr(abs_max), (int64_t*)ptr(zeros),
                              (int64_t*)ptr(near_zeros), device, ptr(stream));
  });
}

void act_stats(uint64_t x, int dtype, int64_t T, int64_t C, int64_t sx0, int64_t sx1, uint64_t stats, int64_t ss0,
               int64_t ss1, uint64_t mask, int64_t mask_stride, float threshold, int device, uint64_t stream) {
  call([&] {
    return lpt_cuda_act_stats(ptr(x), dtype, T, C, sx0, sx1, (double*)ptr(stats), ss0, ss1, ptr(mask), mask_stride,
                              threshold, device, ptr(stream));
  });
}

void rollback(uint64_t target, int target_dtype, int64_t rows, int64_t cols, int64_t ts0, int64_t ts1,
              uint64_t source, int source_dtype, int64_t ss0, int64_t ss1, uint64_t index, int64_t n_index, int axis,
              int64_t block, float alpha, bool compact, int device, uint64_t stream) {
  call([&] {
    return lpt_cuda_rollback(ptr(target), target_dtype, rows, cols, ts0, ts1, ptr(source), source_dtype, ss0, ss1,
                             (const int64_t*)ptr(index), n_index, axis, block, alpha, compact ? 1 : 0, device,
                             ptr(stream));
  });
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lpt_kernels CUDA backend (raw pointers, dtype codes 0 f32 / 1 bf16 / 2 f16, strides in elements)";
  m.attr("MAX_INPUTS") = LPT_CUDA_MAX_INPUTS;
  m.def("unit_gram", &unit_gram, py::arg("ptrs"), py::arg("dtypes"), py::arg("strides0"), py::arg("strides1"),
        py::arg("rows"), py::arg("cols"), py::arg("mode"), py::arg("axis"), py::arg("block"), py::arg("index"),
        py::arg("n_index"), py::arg("atol"), py::arg("rtol"), py::arg("gram"), py::arg("abs_sum"),
        py::arg("abs_max"), py::arg("zeros"), py::arg("near_zeros"), py::arg("device"), py::arg("stream"),
        "Per-unit Gram matrix and delta statistics (lpt_cuda_unit_gram); index 0 = all units.");
  m.def("act_stats", &act_stats, py::arg("x"), py::arg("dtype"), py::arg("T"), py::arg("C"), py::arg("sx0"),
        py::arg("sx1"), py::arg("stats"), py::arg("ss0"), py::arg("ss1"), py::arg("mask"), py::arg("mask_stride"),
        py::arg("threshold"), py::arg("device"), py::arg("stream"),
        "In-place activation statistics into stats [5, C] float64 (lpt_cuda_act_stats); mask 0 = none.");
  m.def("rollback", &rollback, py::arg("target"), py::arg("target_dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("ts0"), py::arg("ts1"), py::arg("source"), py::arg("source_dtype"), py::arg("ss0"), py::arg("ss1"),
        py::arg("index"), py::arg("n_index"), py::arg("axis"), py::arg("block"), py::arg("alpha"),
        py::arg("compact"), py::arg("device"), py::arg("stream"),
        "In-place rollback of the listed units of target toward source (lpt_cuda_rollback).");
}
