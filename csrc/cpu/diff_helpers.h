// lpt diff's per-tensor bookkeeping on the CPU (diff_helpers.cpp), registered on lpt_kernels._C_cpu.
#pragma once

#include <pybind11/pybind11.h>

namespace lpt {
namespace cpu {

void add_diff_helpers(pybind11::module_& m);

}  // namespace cpu
}  // namespace lpt
