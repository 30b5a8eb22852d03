#!/usr/bin/env python
"""The Triton kernels compiled for sm_90 (H100 / H200) on a machine without a GPU: registers, spills, shared memory,
resident programs per SM and the grid each op launches on the Qwen3-4B shapes — the inputs of the on-paper GPU table
in benchmarks/README.md.

    python benchmarks/triton_sm90.py               # the table
    python benchmarks/triton_sm90.py --near-bound  # JSON: fmas of the rows kernel with and without the near bound

Triton's own compiler runs (ASTSource -> TTIR -> PTX -> cubin with its bundled ptxas) for GPUTarget("cuda", 90, 32),
with the argument specialisations a real launch gets (ints equal to 1 are constants, pointers and multiples of 16
are marked 16-divisible); registers and spills are read from `ptxas -v` run with Triton's flags. The block sizes and
grids come from the backends' own planning functions (rows_meta, cols_meta, act_meta, fit_split), so the table
follows the code. TRITON_INTERPRET must be unset (the interpreter replaces the jit functions).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_sm90: unset TRITON_INTERPRET (the interpreter replaces the jit functions)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ug = importlib.import_module("lpt_kernels.backends.triton.unit_gram")
act = importlib.import_module("lpt_kernels.backends.triton.act_stats")
rb = importlib.import_module("lpt_kernels.backends.triton.rollback")
launch = importlib.import_module("lpt_kernels.backends.triton._launch")

CAPABILITY = 90
# (name, SMs, peak HBM bytes/s): the GPUs this project is lent
DEVICES = [("H100 SXM", 132, 3.35e12), ("H200", 132, 4.8e12)]
HIDDEN, INTER = 2560, 9728


class Ptr:
    def __init__(self, dtype):
        self.dtype = dtype


def _spec(fn, args: dict):
    """signature, constexprs and attrs as a launch would specialise `args` (name -> Ptr, int, float, tuple)."""
    names = fn.arg_names
    dns = {p.name for p in fn.params if p.do_not_specialize}
    sig, consts, attrs = {}, {}, {}

    def one(path, name, v):
        if isinstance(v, Ptr):
            attrs[path] = [["tt.divisibility", 16]]
            return "*" + v.dtype
        if isinstance(v, bool) or isinstance(v, float):
            return "fp32"
        if isinstance(v, int):
            if name not in dns and v == 1:
                consts[path] = 1
                return "constexpr"
            if name not in dns and v % 16 == 0:
                attrs[path] = [["tt.divisibility", 16]]
            return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        raise TypeError(f"{name}: {v!r}")

    for name, v in args.items():
        i = names.index(name)
        if isinstance(v, tuple):
            sig[name] = tuple(one((i, j), name, x) for j, x in enumerate(v))
        else:
            sig[name] = one((i,), name, v)
    return sig, consts, attrs


def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int):
    """Compile `fn` for sm_90; returns (CompiledKernel, ptxas facts: registers, spill bytes, shared bytes)."""
    sig, consts, attrs = _spec(fn, args)
    for k, v in constexprs.items():
        sig[k] = "constexpr"
        consts[(fn.arg_names.index(k),)] = v
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", CAPABILITY, 32), options=dict(num_warps=num_warps))
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([get_ptxas(CAPABILITY).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(CAPABILITY)}", ptx, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return k, dict(regs=regs, spill=int(spill.group(1)) + int(spill.group(2)) if spill else 0,
                   shared=k.metadata.shared)


def _gram_case(label, K, mode, axis, near, index_units=None, dtype="bf16"):
    MODE = ug.MODES[mode]
    M = K if MODE == 2 else K - 1
    L, R = (INTER, HIDDEN)  # gate/up rows (axis 0) or down_proj columns (axis 1): 9728 units of 2560 elements
    U = index_units or L
    flags = dict(K=K, M=M, MODE=MODE, HAS_INDEX=index_units is not None, NEAR=near, USE_REF=False, RN_LIB=True)
    ptrs = tuple(Ptr(dtype) for _ in range(K))
    if axis == 0:
        meta = ug.rows_meta(K, R)
        args = dict(ptrs=ptrs, s_line=(HIDDEN,) * K, s_red=(1,) * K, idx_ptr=Ptr("i64" if index_units else dtype),
                    fsum=Ptr("fp32"), fmax=Ptr("fp32"), icnt=Ptr("i64"), U=U, R=R, block=1, lines_per=1, atol=1e-6,
                    rtol=0.0)
        fn, tiles, max_split = ug._gram_rows_kernel, U, 1
    else:
        meta = ug.cols_meta(K, M, U, R)
        args = dict(ptrs=ptrs, s_line=(1,) * K, s_red=(INTER,) * K, idx_ptr=Ptr("i64" if index_units else dtype),
                    fsum=Ptr("fp32"), fmax=Ptr("fp32"), icnt=Ptr("i32"), UB=U, R=R, block=1, rows_per=64, atol=1e-6,
                    rtol=0.0)
        fn, tiles, max_split = ug._gram_cols_kernel, triton.cdiv(U, meta["BLOCK_C"]), triton.cdiv(R, meta["BLOCK_R"])
    nbytes = K * U * R * (2 if dtype == "bf16" else 4)
    return label, fn, args, {**flags, **{k: v for k, v in meta.items() if k != "num_warps"}}, meta["num_warps"], \
        tiles, max_split, nbytes


def _act_case(label, T, C):
    meta = act.act_meta(2, T, C)
    args = dict(x_ptr=Ptr("bf16"), s_t=C, s_c=1, mask_ptr=Ptr("bf16"), s_m=0, dpart=Ptr("fp64"), fmax=Ptr("fp32"),
                ipart=Ptr("i32"), T=T, C=C, rows_per=1, threshold=0.01)
    consts = dict(HAS_MASK=False, FOLD=act.FOLD, **{k: v for k, v in meta.items() if k != "num_warps"})
    return label, act._act_stats_kernel, args, consts, meta["num_warps"], triton.cdiv(C, meta["BLOCK_C"]), \
        triton.cdiv(T, meta["BLOCK_T"]), 2 * T * C


def _rollback_case(label, n_rows, alpha):
    raw = alpha == 1.0
    X = HIDDEN
    BLOCK_X = min(1024, triton.next_power_of_2(X))
    BLOCK_L = max(1, min(triton.next_power_of_2(n_rows), 4096 // BLOCK_X))
    n_xtiles = triton.cdiv(X, BLOCK_X)
    args = dict(t_ptr=Ptr("i16" if raw else "bf16"), t_line=HIDDEN, t_x=1, s_ptr=Ptr("i16" if raw else "bf16"),
                s_line=HIDDEN, s_x=1, idx_ptr=Ptr("i64"), n_lines=n_rows, X=X, block=1, alpha=alpha,
                n_xtiles=n_xtiles)
    consts = dict(COMPACT=False, IS_COPY=raw, RAW=raw, FMA64=False, BLOCK_L=BLOCK_L, BLOCK_X=BLOCK_X)
    programs = triton.cdiv(n_rows, BLOCK_L) * n_xtiles
    # bytes: source read + target written (+ target read when alpha < 1)
    return label, rb._rollback_kernel, args, consts, 4, programs, 1, n_rows * X * 2 * (2 if raw else 3)


CASES = [
    lambda: _gram_case("unit_gram K=2 axis 0 (gate/up rows)", 2, "consecutive", 0, True),
    lambda: _gram_case("unit_gram K=5 axis 0", 5, "consecutive", 0, True),
    lambda: _gram_case("unit_gram K=8 axis 0", 8, "consecutive", 0, True),
    lambda: _gram_case("unit_gram K=2 axis 1 (down_proj cols)", 2, "consecutive", 1, True),
    lambda: _gram_case("unit_gram K=5 axis 1", 5, "consecutive", 1, True),
    lambda: _gram_case("unit_gram K=8 axis 1", 8, "consecutive", 1, True),
    lambda: _gram_case("masked_cosine chain, 10% of rows", 3, "consecutive", 0, False, index_units=973),
    lambda: _act_case("act_stats_ [1e5, 9728] bf16", 100_000, INTER),
    lambda: _rollback_case("rollback_ 2% rows alpha=1 (raw)", 195, 1.0),
    lambda: _rollback_case("rollback_ 2% rows alpha=0.5", 195, 0.5),
]


def table():
    rows = []
    for make in CASES:
        label, fn, args, consts, warps, tiles, max_split, nbytes = make()
        _, facts = compile_sm90(fn, args, consts, warps)
        per_sm = launch.programs_per_sm(facts["regs"], warps, facts["shared"])
        sms = DEVICES[0][1]
        slots = sms * per_sm
        split = launch.fit_split(tiles, max_split, slots) if max_split > 1 else 1
        programs = tiles * split
        waves = -(-programs // slots)
        rows.append(dict(case=label, warps=warps, regs=facts["regs"], spill=facts["spill"], shared=facts["shared"],
                         per_sm=per_sm, warps_per_sm=per_sm * warps, programs=programs, waves=waves,
                         use=programs / (waves * slots), mbytes=nbytes / 1e6))
    head = ["case", "warps", "regs", "spill", "smem", "prog/SM", "warps/SM", "programs", "waves", "slots used", "MB"]
    cells = [head] + [[r["case"], str(r["warps"]), str(r["regs"]), str(r["spill"]), str(r["shared"]), str(r["per_sm"]),
                       str(r["warps_per_sm"]), str(r["programs"]), str(r["waves"]), f"{r['use']:.0%}",
                       f"{r['mbytes']:.1f}"] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    print(f"Triton {triton.__version__}, sm_{CAPABILITY} ({sm_arch_from_capability(CAPABILITY)}), {DEVICES[0][1]} SMs, "
          f"65536 registers and 2048 threads per SM")
    for j, c in enumerate(cells):
        print("  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(c)))
        if j == 0:
            print("  ".join("-" * x for x in w))
    return rows


def near_bound():
    """fma counts in the PTX of the rows kernel with the relative near-zero bound (USE_REF) and without any bound."""
    out = {}
    for name, near in (("with_bound", True), ("without", False)):
        args = dict(ptrs=(Ptr("fp32"), Ptr("fp32")), s_line=(64, 64), s_red=(1, 1), idx_ptr=Ptr("fp32"),
                    fsum=Ptr("fp32"), fmax=Ptr("fp32"), icnt=Ptr("i64"), U=64, R=64, block=1, lines_per=1,
                    atol=1e-3, rtol=1e-2)
        consts = dict(K=2, M=1, MODE=0, HAS_INDEX=False, NEAR=near, USE_REF=near, RN_LIB=True, BLOCK_N=256, V=8)
        if "RN_LIB" not in ug._gram_rows_kernel.arg_names:  # (an older tree: the contraction is the compiler's)
            consts.pop("RN_LIB")
        k, facts = compile_sm90(ug._gram_rows_kernel, args, consts, 1)
        ptx = k.asm["ptx"]
        out[name] = dict(fma=len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32", ptx)),
                         mul_rn=len(re.findall(r"\bmul\.rn\.f32", ptx)), ftz=len(re.findall(r"\.ftz\.", ptx)),
                         regs=facts["regs"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--near-bound", action="store_true", help="print the near-bound fma check as JSON")
    p.add_argument("--json", action="store_true", help="print the table rows as JSON")
    a = p.parse_args(argv)
    if a.near_bound:
        print(json.dumps(near_bound()))
    else:
        rows = table()
        if a.json:
            print(json.dumps(rows))


if __name__ == "__main__":
    main()
