"""Build of the native extensions.

- lpt_kernels._C_cpu (always): the kernel sources in csrc/cpu are compiled once per instruction-set level
  (baseline, x86-64-v3 = AVX2/FMA/F16C, x86-64-v4 = AVX-512) into separate namespaces and linked into one module that
  picks the best level at run time, so a wheel never depends on -march=native.
- lpt_kernels._C_cuda (only with LPT_BUILD_CUDA=1; archs from LPT_CUDA_ARCHS, default "80;90"): built with nvcc
  directly by csrc/cuda/build.py, since torch's CUDAExtension needs a CUDA build of torch.
"""
import importlib.util
import os
import platform
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = ["csrc/cpu/unit_gram.cpp", "csrc/cpu/act_stats.cpp", "csrc/cpu/rollback.cpp"]
COMMON_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
if platform.machine() in ("x86_64", "AMD64"):
    ISA_VARIANTS = [("base", ["-march=x86-64"]), ("avx2", ["-march=x86-64-v3"]),
                    ("avx512", ["-march=x86-64-v4", "-mprefer-vector-width=512"])]
else:
    ISA_VARIANTS = [("base", [])]


class BuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name == "lpt_kernels._C_cuda":
            return self._build_cuda(ext)
        if ext.name == "lpt_kernels._C_cpu":
            def compile_one(job):
                (isa, flags), src = job
                return self.compiler.compile(
                    [src], output_dir=os.path.join(self.build_temp, isa), macros=[("LPT_ISA", isa)],
                    include_dirs=["csrc/include", "csrc/cpu"], extra_postargs=COMMON_FLAGS + flags)
            jobs = [(v, src) for v in ISA_VARIANTS for src in KERNELS]
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # compilers run as subprocesses
                ext.extra_objects = [o for objs in pool.map(compile_one, jobs) for o in objs]
        super().build_extension(ext)

    def _build_cuda(self, ext):
        spec = importlib.util.spec_from_file_location("lpt_cuda_build", os.path.join(HERE, "csrc/cuda/build.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        archs = [a for a in os.environ.get("LPT_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a]
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        mod.build_cuda_extension(out, os.path.join(self.build_temp, "cuda"), archs)


ext_modules = [
    Pybind11Extension("lpt_kernels._C_cpu", ["csrc/cpu/bindings.cpp", "csrc/cpu/diff_helpers.cpp"],
                      include_dirs=["csrc/include", "csrc/cpu"],
                      extra_compile_args=COMMON_FLAGS, extra_link_args=["-fopenmp"], cxx_std=17),
]
if os.environ.get("LPT_BUILD_CUDA", "0") == "1":
    ext_modules.append(Extension("lpt_kernels._C_cuda", sources=[]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
