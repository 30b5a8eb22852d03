// Argument checks shared by the pybind11 sources of lpt_kernels._C_cpu: a bad call raises a Python exception
// (std::invalid_argument -> ValueError) instead of touching memory.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "lpt/element.h"

namespace lpt {
namespace cpu {

inline void check_dtype(int d, const char* what) {
  if (d != lpt::kF32 && d != lpt::kBF16 && d != lpt::kF16)
    throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(d));
}

inline Tensor2D tensor(uintptr_t ptr, int dtype, int64_t s0, int64_t s1, const char* what) {
  check_dtype(dtype, what);
  if (!ptr) throw std::invalid_argument(std::string(what) + ": null data pointer");
  return Tensor2D{(const void*)ptr, dtype, s0, s1};
}

// A tensor argument. `elements` is its element count: a tensor with none (a zero-size dimension) may have a null
// data pointer (torch gives empty tensors one), which is fine as long as nothing reads it; any other null is refused.
inline Tensor2D tensor(uintptr_t ptr, int dtype, int64_t s0, int64_t s1, int64_t elements, const char* what) {
  check_dtype(dtype, what);
  if (!ptr && elements != 0) throw std::invalid_argument(std::string(what) + ": null data pointer");
  return Tensor2D{(const void*)ptr, dtype, s0, s1};
}

}  // namespace cpu
}  // namespace lpt
