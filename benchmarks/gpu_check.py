#!/usr/bin/env python
"""The GPU check in one command, for the short windows a GPU is lent (under 10 minutes on an H100/H200):

    python benchmarks/gpu_check.py [--skip-build] [--skip-tests] [--skip-bench] [--quick] [--budget 570]

1. builds the CUDA extension (lpt_kernels/_C_cuda) with csrc/cuda/build.py for the device's architecture;
2. runs the test suite's GPU cases: every kernel test parametrised on the `triton` and `cuda` backends (on the real
   device, not the interpreter; property tests with fewer examples), and tests/test_gpu.py: a tensor past 2^31
   elements, no host synchronisation on the index paths, and a second-device case when two GPUs exist;
3. runs bench_ops.py's GPU section (Qwen3-4B shapes, inputs rotated past the L2; unit_gram K=2 and 5 on both axes,
   masked_cosine, act_stats_ at 8192 and 1e5 tokens, rollback_), printing each kernel's GB/s, % of the device's
   peak HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s) and of a measured copy ceiling.

Each phase runs in a subprocess with a time limit taken from what is left of --budget (seconds), so the whole check
returns in time and says which phase ran out. The output is what to paste into the issue's note.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_unit_gram.py", "tests/test_masked_cosine.py", "tests/test_act_stats.py",
                "tests/test_rollback.py", "tests/test_validation.py", "tests/test_torch_library.py",
                "tests/test_gpu.py"]


def _phase(name, cmd, limit, env=None):
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd)}  (limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=max(limit, 1)).returncode
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    except subprocess.TimeoutExpired:
        status = "OUT OF TIME"
    dt = time.perf_counter() - t0
    print(f"=== {name}: {status} in {dt:.0f} s", flush=True)
    return status, dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=570.0, help="seconds for the whole check (default 570)")
    p.add_argument("--skip-build", action="store_true", help="use the CUDA extension already built")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--quick", action="store_true", help="bench_ops --quick (smaller tensors, fewer reps)")
    p.add_argument("--examples", type=int, default=6, help="hypothesis examples per property test (default 6)")
    a = p.parse_args(argv)
    start = time.perf_counter()

    def left():
        return a.budget - (time.perf_counter() - start)

    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check", file=sys.stderr)
        return 2
    n = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    arch = f"{props.major}{props.minor}"
    print(f"gpu_check: {n} x {props.name} (sm_{arch}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB) | torch {torch.__version__} | python {sys.version.split()[0]}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LPT_PROPERTY_EXAMPLES"] = str(a.examples)
    results = {}

    if not a.skip_build:
        out = ROOT / "lpt_kernels" / ("_C_cuda" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
        results["build"] = _phase("build", [sys.executable, "csrc/cuda/build.py", str(out), "--archs", arch,
                                            "--build-temp", "build/cuda"], min(240.0, left()), env)
    if not a.skip_tests:
        # -k: the GPU parametrisations of the kernel tests (ids carry the backend name) and every test_gpu case
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *KERNEL_TESTS,
               "-k", "triton or cuda or test_gpu"]
        results["tests"] = _phase("tests", cmd, left() - (150.0 if not a.skip_bench else 10.0), env)
    if not a.skip_bench:
        cmd = [sys.executable, "benchmarks/bench_ops.py", "--gpu-only", "--no-compile"]
        cmd += ["--quick"] if a.quick else []
        results["bench"] = _phase("bench", cmd, left() - 5.0, env)

    print(f"\ngpu_check: {time.perf_counter() - start:.0f} s in all (budget {a.budget:.0f} s)")
    for k, (status, dt) in results.items():
        print(f"  {k:6s} {status} ({dt:.0f} s)")
    return 0 if all(s == "ok" for s, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
