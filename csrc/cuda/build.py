"""Build the optional CUDA extension lpt_kernels._C_cuda with nvcc and the host C++ compiler directly.

torch.utils.cpp_extension's CUDAExtension needs a CUDA build of torch; this needs only nvcc, a C++ compiler and
pybind11. The kernels (csrc/cuda/*.cu) are compiled by nvcc, the bindings by c++, and the shared library is linked
against the static CUDA runtime (no runtime library path needed; a shared libcudart with an rpath otherwise).

    build_cuda_extension(out_path, build_temp, archs)      # from setup.py (LPT_BUILD_CUDA=1)
    python csrc/cuda/build.py OUT.so [--archs "80;90"] [--build-temp DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent  # csrc/cuda
INCLUDE = HERE.parent / "include"  # csrc/include


def _cuda_home() -> Path:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where its own binary lives.
        real = Path(nvcc).resolve()
        for cand in (real.parent.parent, Path("/usr/local/cuda")):
            if (cand / "include" / "cuda_runtime.h").exists():
                return cand
    if Path("/usr/local/cuda/include/cuda_runtime.h").exists():
        return Path("/usr/local/cuda")
    raise RuntimeError("CUDA toolkit not found: set CUDA_HOME or put nvcc on PATH")


def _nvcc(cuda_home: Path) -> str:
    exe = cuda_home / "bin" / "nvcc"
    return str(exe) if exe.exists() else (shutil.which("nvcc") or "nvcc")


def _cudart(cuda_home: Path) -> tuple[list[str], str]:
    """Link arguments for the CUDA runtime and a description of the choice."""
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        d = cuda_home / sub
        if (d / "libcudart_static.a").exists():
            # --exclude-libs keeps the runtime's symbols local to this library, so they never interpose with (or
            # are interposed by) the libcudart that torch loads into the same process.
            return [f"-L{d}", "-lcudart_static", "-ldl", "-lpthread", "-lrt", "-Wl,--exclude-libs,ALL"], "static"
        if (d / "libcudart.so").exists():
            return [f"-L{d}", "-lcudart", f"-Wl,-rpath,{d}"], f"shared (rpath {d})"
    raise RuntimeError(f"no libcudart_static.a or libcudart.so under {cuda_home}")


def _norm_arch(a: str) -> str:
    """'80', '8.0', 'sm_80', 'compute_90a', '90a' -> '80' / '90a'."""
    a = a.strip().lower().replace("sm_", "").replace("compute_", "").replace(".", "")
    if not a or not a[:2].isdigit():
        raise ValueError(f"bad CUDA arch {a!r}: expected e.g. 80 or 9.0")
    return a


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def _stale(obj: Path, deps: list[Path]) -> bool:
    return not obj.exists() or any(d.stat().st_mtime > obj.stat().st_mtime for d in deps)


def build_cuda_extension(out_path: str, build_temp: str, archs: list[str]) -> None:
    """Compile csrc/cuda/*.cu (nvcc) and bindings.cpp (c++) into build_temp and link the module at out_path."""
    archs = sorted({_norm_arch(a) for a in archs}, key=lambda a: (int(a[:2]), a))
    if not archs:
        raise ValueError("no CUDA architecture given")
    cuda_home = _cuda_home()
    nvcc, cxx = _nvcc(cuda_home), os.environ.get("CXX", "c++")
    tmp = Path(build_temp) / "lpt_cuda"
    tmp.mkdir(parents=True, exist_ok=True)
    headers = [*HERE.glob("*.h"), *HERE.glob("*.cuh"), *INCLUDE.rglob("*.h")]

    # One cubin per arch (sm_XX), plus PTX of the highest so newer GPUs can JIT it.
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    # A mismatch of the gencode list must rebuild the objects: it is part of their name.
    tag = "_".join(archs)
    jobs = []
    for cu in sorted(HERE.glob("*.cu")):
        obj = tmp / f"{cu.stem}.sm{tag}.o"
        cmd = [nvcc, "-O3", "-std=c++17", "--threads=0", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
               f"-I{INCLUDE}", f"-I{HERE}", *gencode, "-c", str(cu), "-o", str(obj)]
        jobs.append((obj, [cu, *headers], cmd))

    import pybind11  # build-time dependency

    bind_obj = tmp / "bindings.o"
    jobs.append((bind_obj, [HERE / "bindings.cpp", HERE / "lpt_cuda.h"],
                 [cxx, "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", f"-I{pybind11.get_include()}",
                  f"-I{sysconfig.get_paths()['include']}", f"-I{HERE}", "-c", str(HERE / "bindings.cpp"),
                  "-o", str(bind_obj)]))

    todo = [cmd for obj, deps, cmd in jobs if _stale(obj, deps)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        list(pool.map(_run, todo))  # raises the first failure

    link, _ = _cudart(cuda_home)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([cxx, "-shared", "-o", str(out), *[str(obj) for obj, _, _ in jobs], *link])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="path of the extension, e.g. lpt_kernels/_C_cuda" + (
        sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    ap.add_argument("--archs", default=os.environ.get("LPT_CUDA_ARCHS", "80;90"),
                    help='";"- or ","-separated compute capabilities (default: $LPT_CUDA_ARCHS or "80;90")')
    ap.add_argument("--build-temp", default="build/cuda", help="object directory (default: build/cuda)")
    args = ap.parse_args(argv)
    archs = [a for a in args.archs.replace(",", ";").split(";") if a.strip()]
    build_cuda_extension(args.out, args.build_temp, archs)
    print(f"built {args.out} for sm_{', sm_'.join(_norm_arch(a) for a in archs)} "
          f"(cudart {_cudart(_cuda_home())[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
