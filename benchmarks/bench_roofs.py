#!/usr/bin/env python
"""Compute roofs of the CPU kernels: each inner loop with its data in the core's L2, one thread, per ISA level.

    python benchmarks/bench_roofs.py [--isa all|base|avx2|avx512] [--seconds 0.4] [--asm] [--csv out.csv]

A memory-bound kernel is one whose compute roof (GB/s of minimum bytes when no byte has to come from memory) is
above the memory ceiling; the two are measured here side by side:

- roof 1T: the kernel (the extension's own entry point, lpt_kernels._C_cpu, so that Python's per-call validation is
  not counted) on Qwen3-4B-strided inputs small enough to stay in one core's L2 (~1 MB a call; about half the L2
  where it is smaller than 2 MiB), one thread, the minimum over many calls (a minimum survives time-slicing on a
  shared machine; medians do not). roof 2C = 2 x roof 1T: two cores each working on their own L2-resident half
  (the kernels split work statically, so the halves do not interact), the figure to hold against a 2-thread memory
  ceiling;
- memory ceiling: lpt_kernels._C_cpu.stream_read of 256 MB (beyond any L3 here), 1 and 2 threads, minimum;
- per call: the fixed cost of the public op (validation, dispatch, output allocation, thread start) on a
  one-row input, which bounds the small calls (rollback_ of 2% of a tensor, masked_cosine) beside bytes / ceiling.

With --asm, the instructions of each kernel's hot loop are counted in the built extension (objdump): per loop
iteration, per element position and per input byte, with the vector operations that compete for the SIMD ports
(512-bit operations issue on two ports on Intel cores since Skylake-SP, and on Zen 4's four 256-bit pipes two at a
time), so that a roof can be read as "bounded by its instruction count". The counts are static (one pass of the loop
body): valgrind cannot run AVX-512 code and perf has no hardware counters in most VMs.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

import lpt_kernels
from lpt_kernels import _C_cpu as C
from lpt_kernels.backends import cpu as cpu_backend

HIDDEN, INTER = 2560, 9728
ATOL = 1e-6
THRESHOLD = 0.01
BF16 = 1  # the extension's dtype code


@dataclass
class Roof:
    name: str
    nbytes: int                 # minimum bytes of one call
    call: Callable[[], None]    # one call of the extension, one thread
    public: Optional[Callable[[], None]] = None  # the public op on a one-row input (fixed cost per call)
    asm: str = ""               # regex of the hot loop's function in the extension (for --asm)
    elems: int = 0              # element positions per hot-loop iteration on AVX-512 (for --asm)
    inputs: int = 1             # input tensors read per element position
    counted: int = 0            # bytes the roof counts per element position (0: 2 per input; rollback_: 3 x 2)
    pick: str = "most_ps"       # which innermost loop is the hot one: most fp32 vector ops, or the smallest with an fma


def chain(n, shape, gen, density=0.25):
    w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    out = [w]
    for _ in range(n - 1):
        d = torch.randn(shape, generator=gen).mul_(1e-3) * (torch.rand(shape, generator=gen) < density)
        w = (w.float() + d).to(torch.bfloat16)
        out.append(w)
    return out


def gram_call(ws, axis, index=None, atol=ATOL, threads=1):
    rows, cols = ws[0].shape
    m = len(ws) - 1
    n = index.numel() if index is not None else ws[0].shape[axis]
    g, s, x = torch.empty(n, m, m), torch.empty(n, m), torch.empty(n, m)
    z, nz = torch.empty(n, m, dtype=torch.int64), torch.empty(n, m, dtype=torch.int64)
    args = ([w.data_ptr() for w in ws], [BF16] * len(ws), [w.stride(0) for w in ws], [w.stride(1) for w in ws],
            rows, cols, axis, 1, 0, index.data_ptr() if index is not None else 0, n, atol, 0.0,
            g.data_ptr(), s.data_ptr(), x.data_ptr(), z.data_ptr(), nz.data_ptr(), threads)
    keep = (ws, index, g, s, x, z, nz)
    return lambda: (keep, C.unit_gram(*args))[1]


def l2_bytes() -> int:
    """One core's L2 (sysfs), or 2 MiB where sysfs does not say."""
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            level, kind = open(f"{d}/level").read().strip(), open(f"{d}/type").read().strip()
            size = open(f"{d}/size").read().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data"):
            return int(size[:-1]) * {"K": 2**10, "M": 2**20}.get(size[-1], 1) if not size.isdigit() else int(size)
    return 2 * 2**20


# The axis-0 loop the kernels run here: with counts by popcount (unit_gram.cpp's SC) on AMD's AVX-512.
SC = "true" if cpu_backend.tuning() == "amd" else "false"


def scaled(n: int, f: float, multiple: int = 1, least: int = 1) -> int:
    return max(least, int(n * f) // multiple * multiple)


def build(gen) -> List[Roof]:
    roofs = []
    # The cases are sized for a 2 MiB L2 (~1 MB a call); a smaller L2 (Zen 3: 512 KiB) scales them down to about
    # half of it, or the roof measured is the L3's.
    f = min(1.0, l2_bytes() / (2 * 2**20))
    # unit_gram axis 0: whole rows of gate_proj (2560 bf16), as many rows as make ~1 MB.
    for k, rows in ((2, scaled(96, f)), (5, scaled(40, f))):
        ws = chain(k, (rows, HIDDEN), gen)
        one = [w[:1] for w in ws]
        roofs.append(Roof(f"unit_gram K={k} axis0 rows", k * rows * HIDDEN * 2, gram_call(ws, 0),
                          lambda one=one: lpt_kernels.unit_gram(one, atol=ATOL, backend="cpu"),
                          asm=rf"StaticKern<{k - 1}, 0, 1>::strips<1, true, {SC}>", elems=32, inputs=k))
    # unit_gram axis 1: 256 rows (one fold period) x 1024 (K=2) or 384 (K=5) columns of down_proj-strided tensors (row
    # stride 9728), ~1 MB: 1024 columns at K=5 (2.6 MB) spill a 2 MB L2 and measured the L3 instead (7.6 vs 13 GB/s).
    for k, ncols in ((2, scaled(1024, f, 32, 32)), (5, scaled(384, f, 32, 32))):
        full = chain(k, (256, INTER), gen)
        ws = [w[:, :ncols] for w in full]
        one = [w[:, :16] for w in full]
        roofs.append(Roof(f"unit_gram K={k} axis1 cols", k * 256 * ncols * 2, gram_call(ws, 1),
                          lambda one=one: lpt_kernels.unit_gram(one, axis=1, atol=ATOL, backend="cpu"),
                          asm=rf"StaticKern<{k - 1}, 0, 1>::cols<1>", elems=32 if k == 2 else 16,
                          inputs=k))
    # ... and K=5 on 2560 copies of one row (row stride 0): the block's rows and the column sums stay in L1, so this is
    # the loop with its accumulation and folds but without the L2 traffic, the roof its instruction count allows.
    ws = [w[:1, :384].expand(2560, 384) for w in chain(5, (1, INTER), gen)]
    roofs.append(Roof("unit_gram K=5 axis1 cols, rows in L1", 5 * 2560 * 384 * 2, gram_call(ws, 1),
                      asm=r"StaticKern<4, 0, 1>::cols<1>", elems=16, inputs=5))
    # K=6 (the runtime-sized kernel, passes over L1): rows and columns as K=5's.
    ws = chain(6, (scaled(32, f), HIDDEN), gen)
    roofs.append(Roof("unit_gram K=6 axis0 rows", 6 * ws[0].numel() * 2, gram_call(ws, 0), inputs=6))
    ws = [w[:, : scaled(320, f, 32, 32)] for w in chain(6, (256, INTER), gen)]
    roofs.append(Roof("unit_gram K=6 axis1 cols", 6 * ws[0].numel() * 2, gram_call(ws, 1), inputs=6))
    # masked_cosine of a chain of 3 (atol = 0): 10% of the rows of a [640, 2560] tensor (64 rows, ~1 MB) ...
    n_mc = scaled(64, f, 8, 8)
    ws = chain(3, (10 * n_mc, HIDDEN), gen)
    idx = torch.randperm(10 * n_mc, generator=gen)[:n_mc].sort().values
    roofs.append(Roof("masked_cosine 10% rows", 3 * n_mc * HIDDEN * 2, gram_call(ws, 0, idx, atol=0.0),
                      lambda ws=ws: lpt_kernels.masked_cosine((ws[0], ws[1]), (ws[1], ws[2]), torch.tensor([0]),
                                                              backend="cpu"),
                      asm=rf"StaticKern<2, 0, 0>::strips<1, true, {SC}>", elems=32, inputs=3))
    # ... and 10% of the columns of 32 rows of down_proj (every 64-byte line of those rows is touched: 3.7 MB in L2/L3)
    n_mc = scaled(32, f, 8, 8)
    ws = chain(3, (n_mc, INTER), gen)
    idx = torch.randperm(INTER, generator=gen)[:973].sort().values
    roofs.append(Roof("masked_cosine 10% cols", 3 * n_mc * 973 * 2, gram_call(ws, 1, idx, atol=0.0),
                      lambda ws=ws: lpt_kernels.masked_cosine((ws[0], ws[1]), (ws[1], ws[2]), torch.tensor([0]),
                                                              axis=1, backend="cpu"),
                      asm=r"axis1<[^>]*StaticKern<2, 0, 0> >", elems=32, inputs=3))  # strips<kF32, false> is inlined there
    # act_stats_: 256 tokens x 2048 channels of a [256, 9728] bf16 activation (1 MB).
    xf = torch.randn(256, INTER, generator=gen).to(torch.bfloat16)
    ch = scaled(2048, f, 64, 64)
    x = xf[:, :ch]
    st = torch.zeros(5, ch, dtype=torch.float64)
    roofs.append(Roof("act_stats_ bf16", 256 * ch * 2,
                      lambda: C.act_stats(x.data_ptr(), BF16, x.stride(0), 1, 256, ch, 0, st.data_ptr(), ch, 1,
                                          THRESHOLD, 1),
                      lambda: lpt_kernels.act_stats_(xf[:1], torch.zeros(5, INTER, dtype=torch.float64),
                                                     threshold=THRESHOLD, backend="cpu"),
                      asm=r"::strip_bf16\(", elems=64, inputs=1))
    # rollback_: 64 rows of gate_proj-shaped bf16 (2560) from a separate source (3 x 0.33 MB touched, counted 3x).
    t = torch.randn(640, HIDDEN, generator=gen).to(torch.bfloat16)
    s = torch.randn(640, HIDDEN, generator=gen).to(torch.bfloat16)
    n_rb = scaled(64, f, 8, 8)
    ridx = torch.randperm(640, generator=gen)[:n_rb].sort().values
    for alpha in (1.0, 0.5):
        roofs.append(Roof(
            f"rollback_ rows alpha={alpha:g}", 3 * n_rb * HIDDEN * 2,
            lambda alpha=alpha: C.rollback(t.data_ptr(), BF16, HIDDEN, 1, s.data_ptr(), BF16, HIDDEN, 1, 640, HIDDEN,
                                           ridx.data_ptr(), n_rb, 0, 1, alpha, False, 1),
            lambda alpha=alpha: lpt_kernels.rollback_(t, s, torch.tensor([3]), alpha=alpha, backend="cpu"),
            asm=r"::run<1, 1>\(" if alpha != 1.0 else "", elems=16, inputs=2, counted=6, pick="fma_smallest"))
    return roofs


def best_time(fn, seconds: float, min_reps: int = 20) -> float:
    fn()
    best, t_end, n = float("inf"), time.perf_counter() + seconds, 0
    while n < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def memory_ceiling(threads: int, seconds: float) -> float:
    buf = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    t = best_time(lambda: C.stream_read([buf.data_ptr()], [buf.numel()], threads), seconds, 5)
    return buf.numel() / t / 1e9


# ---- instruction counts ----------------------------------------------------------------------------------------------

VEC = re.compile(r"\b[xyz]mm\d+")


# Instructions that issue two operations on the vector ports of Intel cores since Ice Lake (measured on the Xeon of
# benchmarks/README.md: 1 vpermw and 3 vaddps took 2.6 cycles a group where 4 one-port operations take 2.0; vpermb,
# vpshufb and the compares into mask registers took one).
TWO_OPS = {"vpermw"}


def vector_ops(mn: str, op: str) -> int:
    """Operations of one instruction on the SIMD ALU ports: none without a vector register operand, for a store
    (memory destination), an unmasked move (a plain load goes to the load ports, a register copy is eliminated at
    rename) or a broadcast from memory (done by the load port); two for TWO_OPS; else one."""
    dst, src = op.split(",")[0], op.split(",", 1)[-1]
    if not VEC.search(op) or "PTR" in dst:
        return 0
    if mn.startswith(("vmovdq", "vmovap", "vmovup", "movap", "movup", "movdq")) and "{" not in dst:
        return 0
    if mn.startswith(("vbroadcast", "vpbroadcast")) and "PTR" in src and "{" not in dst:
        return 0
    return 2 if mn in TWO_OPS else 1


def hot_loops(so: str, isa: str, pattern: str):
    """Innermost loops (backward conditional jumps with no loop inside) of the functions in namespace lpt::cpu::<isa>
    whose name matches pattern: [(function, n_instr, n_vector_ops, n_loads, mnemonic counts)]."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", "-M", "intel", so], capture_output=True,
                         text=True, check=True).stdout
    res = []
    funcs = re.split(r"\n(?=[0-9a-f]+ <)", out)

    def body_of(f):
        ins = []
        for ln in f.split("\n")[1:]:
            m = re.match(r"\s+([0-9a-f]+):\s+(\S+)\s*(.*)", ln)
            if m:
                ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
        return ins
    for f in funcs:
        head = f.split("\n", 1)[0]
        if f"lpt::cpu::{isa}::" not in head or not re.search(pattern, head):
            continue
        ins = body_of(f)
        if len(ins) <= 3 and ins and ins[0][1] == "jmp":  # folded into an identical function: follow the jump
            to = int(re.match(r"([0-9a-f]+)", ins[0][2]).group(1), 16)
            ins = next((body_of(g) for g in funcs if re.match(r"[0-9a-f]+", g) and
                        int(re.match(r"[0-9a-f]+", g).group(0), 16) == to), ins)
        loops = []
        for a, mn, op in ins:
            t = re.match(r"([0-9a-f]+)", op)
            if mn.startswith("j") and mn != "jmp" and t and int(t.group(1), 16) <= a:
                loops.append((int(t.group(1), 16), a))
        inner = [(lo, hi) for lo, hi in loops if not any((lo, hi) != (l2, h2) and lo <= l2 and h2 <= hi
                                                         for l2, h2 in loops)]
        for lo, hi in inner:
            body = [(mn, op) for a, mn, op in ins if lo <= a <= hi]
            vops = Counter()  # vector ALU operations by mnemonic
            for mn, op in body:
                vops[mn] += vector_ops(mn, op)
            loads = sum(1 for mn, op in body if "PTR" in op and not mn.startswith("prefetch") and
                        "PTR" not in op.split(",")[0])
            res.append((head.split("<", 1)[1][:90], len(body), sum(vops.values()), loads,
                        Counter(mn for mn, _ in body), vops))
    return res


# Vector ALU ports per core for the ISA's widest vectors on Intel cores since Ice Lake / Sapphire Rapids: 512-bit
# operations issue on p0 (p0+p1 fused) and p5, 256/128-bit ones on p0, p1 and p5.
PORTS = {"avx512": 2, "avx2": 3, "base": 3}

# Zen 4's four 256-bit pipes as benchmarks/vector_pipes.c measured them on 512-bit operations (2026-12-02): two a
# cycle in all; of those, one a cycle on the FMA pair (multiplies, FMAs and every compare into a mask register) and
# one on the FP-add pair (adds, subtractions, maxima, minima and shifts); integer adds, logic and 16-bit maxima issue
# on any pipe.
ZEN4_FMA = ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub", "vmulps", "vcmp", "vpcmp", "vptest")
ZEN4_ADD = ("vaddps", "vsubps", "vmaxps", "vminps", "vpsll", "vpsrl", "vpsra")


def zen4_cycles(vops: Counter):
    """Cycles one loop iteration's 512-bit operations take on Zen 4's pipes (the largest of: all of them at two a
    cycle, the FMA pair's at one, the FP-add pair's at one), with the three counts."""
    fma = sum(v for k, v in vops.items() if k.startswith(ZEN4_FMA))
    add = sum(v for k, v in vops.items() if k.startswith(ZEN4_ADD))
    total = sum(vops.values())
    return max(total / 2, fma, add), fma, add, total


def print_asm(roofs: List[Roof], isa: str, rows=None, ghz: float = 0.0):
    so = C.__file__
    measured = {row["case"]: row.get(isa) for row in rows or []}
    print(f"\nhot loops of the {isa} build ({os.path.basename(so)}), static counts of one iteration:")
    for r in roofs:
        if not r.asm:
            print(f"  {r.name}: a byte copy (memcpy), no loop of ours")
            continue
        loops = hot_loops(so, isa, r.asm)
        if r.pick == "fma_smallest":
            # the loop with the fma (the base build has none: its lerp calls libm's fmaf)
            loops = [x for x in loops if any("fmadd" in k for k in x[4]) or (isa == "base" and x[4]["call"])]
        if not loops:
            print(f"  {r.name}: no loop found for {r.asm}")
            continue
        if r.pick == "fma_smallest":
            fn, n, vec, loads, mn, vops = min(loops, key=lambda x: x[1])
        else:
            # the innermost loop with the most fp32 vector arithmetic, the larger of equals (the others are the fp64
            # folds, the scalar tails and the copy of the loop without prefetches)
            fn, n, vec, loads, mn, vops = max(loops, key=lambda x: (sum(v for k, v in x[4].items()
                                                                        if k.endswith("ps")), x[1]))
        elems = r.elems if isa == "avx512" else r.elems // 2 if isa == "avx2" else r.elems // 4
        nb = elems * r.inputs * 2
        top = " ".join(f"{k}:{v}" for k, v in mn.most_common(12))
        print(f"  {r.name}: {n} instr / {elems} elements = {n / elems:.2f} per element, {n / nb:.3f} per input byte; "
              f"{vec} vector ALU ops ({vec / elems:.2f} per element), {loads} loads  [{top}]")
        if ghz and vec:
            # The bound the vector ports put on one core: vec operations on PORTS[isa] ports per iteration of nb bytes.
            bound = elems * (r.counted or 2 * r.inputs) / (vec / PORTS[isa]) * ghz
            got = measured.get(r.name)
            print(f"    port bound at {ghz:.2f} GHz ({PORTS[isa]} vector ports): {bound:.1f} GB/s per core"
                  + (f"; roof 1T {got:.1f} = {got / bound:.2f} of it" if got else ""))
            if isa == "avx512":
                cyc, fma, add, total = zen4_cycles(vops)
                zb = elems * (r.counted or 2 * r.inputs) / cyc * ghz
                print(f"    Zen 4 pipes: {total} ops / 2, FMA pair {fma}, FP-add pair {add} -> {cyc:g} cycles: "
                      f"{zb:.1f} GB/s per core" + (f"; roof 1T = {got / zb:.2f} of it" if got else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", default="all", help="all, or one of base, avx2, avx512")
    p.add_argument("--seconds", type=float, default=0.4, help="time per case and ISA (the minimum is kept)")
    p.add_argument("--cases", help="only cases whose name matches this regex")
    p.add_argument("--asm", action="store_true", help="also count the hot loops' instructions (objdump)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--ghz", type=float, default=0.0,
                   help="core clock under load (e.g. from a dependent imul chain): with --asm, print each hot loop's "
                        "vector-port bound in GB/s per core beside its measured roof")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    best = C.best_isa()
    order = ["base", "avx2", "avx512"]
    isas = order[: order.index(best) + 1] if args.isa == "all" else [args.isa]
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {model} | cores {os.cpu_count()} | load {os.getloadavg()[0]:.2f} | best ISA {best}")
    gen = torch.Generator().manual_seed(0)
    roofs = [r for r in build(gen) if not args.cases or re.search(args.cases, r.name)]
    ceil1, ceil2 = memory_ceiling(1, args.seconds * 2), memory_ceiling(2, args.seconds * 2)
    print(f"memory ceiling (stream_read of 256 MB, minimum): 1 thread {ceil1:.1f} GB/s, 2 threads {ceil2:.1f} GB/s")
    rows = []
    for r in roofs:
        row = {"case": r.name, "bytes": r.nbytes}
        for isa in isas:
            cpu_backend.set_isa(isa)
            t = best_time(r.call, args.seconds)
            row[isa] = r.nbytes / t / 1e9
        cpu_backend.set_isa("auto")
        if r.public:
            torch.set_num_threads(2)
            row["call_us"] = best_time(r.public, args.seconds / 2) * 1e6
            torch.set_num_threads(1)
        rows.append(row)
        print("  " + r.name + ": " + ", ".join(f"{isa} {row[isa]:.1f}" for isa in isas) + " GB/s (1T)"
              + (f"; public op, one row: {row['call_us']:.0f} us/call" if "call_us" in row else ""), flush=True)
    print()
    hdr = ["case", "bytes"] + [f"{i} 1T" for i in isas] + [f"{isas[-1]} 2C", "2C / ceil 2T", "op us/call"]
    cells = [hdr]
    for row in rows:
        top = row[isas[-1]]
        cells.append([row["case"], f"{row['bytes'] / 1e6:.2f} MB"] + [f"{row[i]:.1f}" for i in isas] +
                     [f"{2 * top:.1f}", f"{2 * top / ceil2:.2f}", f"{row.get('call_us', float('nan')):.0f}"])
    w = [max(len(c[i]) for c in cells) for i in range(len(hdr))]
    for j, c in enumerate(cells):
        print("  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(c)))
        if j == 0:
            print("  ".join("-" * x for x in w))
    print(f"GB/s of minimum bytes; 1T = one thread, data in L2; 2C = 2 x the best ISA's 1T; ceiling 2T = "
          f"{ceil2:.1f} GB/s; load at the end {os.getloadavg()[0]:.2f}")
    if args.asm:
        for isa in isas[::-1]:
            print_asm(roofs, isa, rows, args.ghz)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=["case", "bytes", *isas, "call_us"], extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
