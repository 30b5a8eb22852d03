#!/usr/bin/env python
"""Throughput of the lpt_kernels ops against the memory ceiling and against torch eager / torch.compile peers.

    python benchmarks/bench_ops.py [--quick] [--threads 2] [--csv out.csv] [--cases REGEX] [--no-compile]

CPU section (always): each op at Qwen3-4B shapes (gate/up_proj 9728x2560, down_proj 2560x9728, bf16), with 8+
tensors of each kind (~1.3 GB in all, far beyond the L3) that every timed call rotates through, so no call finds its
inputs in a cache. For every case the table gives

- bytes: the minimum bytes that must move (every input byte read once; rollback: the touched bytes read from the
  target and the source and written back to the target, i.e. 3x the touched bytes of one tensor);
- ours GB/s = bytes / median time of the public op (validation and dispatch included, backend "cpu");
- ceiling GB/s: the machine's ceiling measured in the same run, interleaved call by call with the op, with the same
  threads, on other buffers of the same rotation: read ceiling = ``lpt_kernels._C_cpu.stream_read`` (sums every 64-bit
  word of equally many bytes; for a column gather, of the 64-byte lines it touches); copy ceiling (rollback) = torch ``dst.copy_(src)`` of a contiguous block of as many
  rows as the op touches, counted as 3x the block bytes like the op;
- ratio = ours / ceiling;
- torch eager and torch.compile (mode default, warmed up first) of the same statistics computed the obvious way, and
  our speedup over each.

GPU section: when torch.cuda.is_available(), the same cases on CUDA with the triton (and cuda, if built) backends,
timed with triton.testing.do_bench (median; it also clears the L2 before each call) on inputs rotated past the L2,
reported as GB/s and as a fraction of a measured device-copy ceiling; otherwise one line says it was skipped.

Memory bandwidth of shared machines is noisy, which is why the ceiling is interleaved with the op and the ratio is the
number to compare across runs.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

import lpt_kernels
from lpt_kernels import ops

# Qwen3-4B MLP shapes.
HIDDEN, INTER = 2560, 9728
ATOL = 1e-6          # > 0 so that the near-zero count is really computed
ACT_THRESHOLD = 0.01
GB = 1e9


# ---- synthetic checkpoints -------------------------------------------------------------------------------------------

def make_chain(n: int, shape, gen: torch.Generator, device="cpu", density=0.25, scale=0.02, step=1e-3):
    """n bf16 'checkpoints' of one weight: each one a sparse small update of the previous (as RL updates are), so
    that a realistic share of the bf16 deltas is exactly zero."""
    w = (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)
    out = [w.to(device)]
    for _ in range(n - 1):
        d = torch.randn(shape, generator=gen).mul_(step)
        d.mul_(torch.rand(shape, generator=gen) < density)
        w = (w.float() + d).to(torch.bfloat16)
        del d
        out.append(w.to(device))
    return out


def chunks_of_permutation(n: int, size: int, count: int, gen: torch.Generator, device="cpu") -> List[torch.Tensor]:
    """`count` disjoint sorted random index sets of `size` ids in [0, n) (so rotating through them never re-reads)."""
    perm = torch.randperm(n, generator=gen)
    count = min(count, n // size)
    return [perm[i * size:(i + 1) * size].sort().values.to(device) for i in range(count)]


# ---- peers: the same statistics computed the obvious way with torch ops ---------------------------------------------

def unit_gram_peer(axis: int, atol: float, rtol: float):
    dim = 1 - axis

    def f(*ws):
        wf = [w.float() for w in ws]
        ds, stats = [], []
        for m in range(len(ws) - 1):
            d = wf[m + 1] - wf[m]
            ad = d.abs()
            stats += [ad.sum(dim), ad.amax(dim), (d == 0).sum(dim), (ad <= atol + rtol * wf[m].abs()).sum(dim)]
            ds.append(d)
        gram = [(ds[a] * ds[b]).sum(dim) for a in range(len(ds)) for b in range(a, len(ds))]
        return gram, stats
    return f


def masked_cosine_peer(axis: int):
    dim = 1 - axis

    def f(w0, w1, w2, idx):
        a0, a1, a2 = (w.index_select(axis, idx).float() for w in (w0, w1, w2))
        d0, d1 = a1 - a0, a2 - a1
        dot, n0, n1 = (d0 * d1).sum(dim), (d0 * d0).sum(dim), (d1 * d1).sum(dim)
        den = (n0 * n1).sqrt()
        per_unit = torch.where(den > 0, dot / den, torch.zeros_like(dot))
        pooled = dot.sum() / (n0.sum() * n1.sum()).sqrt()
        return pooled, per_unit
    return f


def act_stats_peer(threshold: float):
    def f(x, stats):
        a = x.float().abs()
        stats[0].add_(x.shape[0])
        stats[1].add_(a.sum(0))
        stats[2].add_((a * a).sum(0))
        stats[3].copy_(torch.maximum(stats[3], a.amax(0).double()))
        stats[4].add_((a > threshold).sum(0))
        return stats
    return f


def rollback_peer(alpha: float):
    if alpha == 1.0:
        def f(t, s, idx):
            return t.index_copy_(0, idx, s.index_select(0, idx))
    else:
        def f(t, s, idx):
            rows = torch.lerp(t.index_select(0, idx).float(), s.index_select(0, idx).float(), alpha)
            return t.index_copy_(0, idx, rows.to(t.dtype))
    return f


# ---- cases -------------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    op: str
    case: str
    sets: list                         # argument tuples; consecutive calls take consecutive sets (round robin)
    ours: Callable                     # ours(set)
    peer: Callable                     # peer(*peer_args(set)), eager; torch.compile'd as is
    peer_args: Callable                # set -> tuple of tensors for the peer
    nbytes: int                        # minimum bytes per call
    ceiling: Optional[Callable] = None  # ceiling(set) on CPU: moves `nbytes` (by the same accounting) elsewhere
    ceiling_kind: str = "read"
    # gather(set) on CPU, listed rows only: stream_read of the same scattered rows the op reads (its row list in
    # order), printed under the table beside the contiguous ceiling that the ratio uses
    gather: Optional[Callable] = None
    check: Optional[Callable] = None   # check(set) -> "ok" or a message: ours against the eager peer
    results: dict = field(default_factory=dict)


def _close(a, b, rtol=1e-3, atol=1e-6):
    return torch.allclose(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol)


def build_cases(pools, backend: str, device: str, gen: torch.Generator, cpu_ceilings: bool, threads: int,
                gpu_extras: bool = False):
    """The cases of one backend. gpu_extras adds what the GPU floors of issue 16 name beyond the CPU table: act_stats_
    at 1e5 tokens (pools["acts_long"])."""
    gate, up, down, acts, targets = pools["gate"], pools["up"], pools["down"], pools["acts"], pools["targets"]
    C = None
    if cpu_ceilings:
        from lpt_kernels import _C_cpu as C
    cases = []

    def read_ceiling(tensors_of_set):
        def ceil(s):
            ts = tensors_of_set(s)
            C.stream_read([t.data_ptr() for t in ts], [t.numel() * t.element_size() for t in ts], threads)
        return ceil if cpu_ceilings else None

    def ug_check(axis, k):
        peer = unit_gram_peer(axis, ATOL, 0.0)

        def chk(s):
            g = lpt_kernels.unit_gram(list(s), axis=axis, mode="consecutive", atol=ATOL, backend=backend)
            gram, st = peer(*s)
            m = k - 1
            ok = True
            for i in range(m):
                a_s, a_m, z, nz = st[4 * i:4 * i + 4]
                ok &= _close(g.abs_sum[:, i], a_s) and _close(g.abs_max[:, i], a_m)
                ok &= bool((g.zeros[:, i].cpu() == z.cpu()).all()) and bool((g.near_zeros[:, i].cpu() == nz.cpu()).all())
            j = 0
            for a in range(m):
                for b in range(a, m):
                    ok &= _close(g.gram[:, a, b], gram[j], rtol=1e-3, atol=1e-9)
                    j += 1
            return "ok" if ok else "MISMATCH vs eager"
        return chk

    def ug_case(label, sets, axis):  # unit_gram over rotating tuples of K tensors
        cases.append(Case(
            "unit_gram", label, sets,
            ours=lambda s: lpt_kernels.unit_gram(list(s), axis=axis, mode="consecutive", atol=ATOL, backend=backend),
            peer=unit_gram_peer(axis, ATOL, 0.0), peer_args=lambda s: s,
            nbytes=sum(t.numel() * t.element_size() for t in sets[0]),
            ceiling=read_ceiling(lambda s: s), check=ug_check(axis, len(sets[0]))))

    # K=2, axis 0: gate/up rows. 8 disjoint consecutive pairs (800 MB) in rotation.
    pairs = [(c[i], c[i + 1]) for c in (gate, up) for i in range(0, len(c) - 1, 2)]
    pairs = [pairs[i // 2 + (i % 2) * (len(pairs) // 2)] for i in range(len(pairs))]  # alternate gate / up
    ug_case("K=2 axis0 gate/up rows", pairs, 0)
    # K=5, axis 0: 5 consecutive checkpoints (one pass, each byte read once, whatever K is).
    ug_case("K=5 axis0 gate/up rows", [tuple(gate[0:5]), tuple(up[0:5]), tuple(gate[-5:]), tuple(up[-5:])], 0)
    # K=2, axis 1: down_proj columns.
    ug_case("K=2 axis1 down cols", [(down[i], down[i + 1]) for i in range(0, len(down) - 1, 2)], 1)
    # K=5, axis 1: down_proj columns of 5 checkpoints (the columns of a 5-checkpoint `lpt diff`; not in issue 13's
    # table, shown in the machines table because it is the slowest of the CPU kernels)
    ug_case("K=5 axis1 down cols", [tuple(down[0:5]), tuple(down[4:9])], 1)
    # K=6 (five deltas: past the register-resident kernels, see docs/kernels.md's cost by K), rows and columns.
    ug_case("K=6 axis0 gate/up rows", [tuple(gate[0:6]), tuple(up[0:6]), tuple(gate[-6:]), tuple(up[-6:])], 0)
    ug_case("K=6 axis1 down cols", [tuple(down[0:6]), tuple(down[3:9])], 1)

    # masked_cosine of u = (w0, w1) and v = (w1, w2) (a chain: 3 tensors read) over 10% of the units. Disjoint
    # triples x 10 disjoint index sets in rotation. Ceiling: the bytes the gather must bring in, read contiguously
    # from each tensor (rows: as many bytes; columns: the cache lines touched).
    def mc_case(axis, chains, label):
        n_units = chains[0][0].shape[axis]
        u = max(1, round(0.10 * n_units))
        idxs = chunks_of_permutation(n_units, u, 10, gen, device)
        triples = [tuple(c[i:i + 3]) for c in chains for i in range(0, len(c) - 2, 3)]
        sets = []
        for r in range(len(idxs)):
            for t in triples:
                sets.append((*t, idxs[r], r))
        line = chains[0][0].shape[1 - axis]
        es = chains[0][0].element_size()
        per_tensor = u * line * es
        # What the ceiling reads per tensor: for rows, the listed rows' bytes; for columns, the 64-byte lines the
        # listed columns fall in, in every row (a load cannot bring in less than a line, and 10% of the columns
        # of a bf16 row touch most of its lines).
        if axis == 0:
            ceil_bytes = [per_tensor] * len(idxs)
        else:
            ceil_bytes = [len(set((idx.cpu() * es // 64).tolist())) * 64 * line for idx in idxs]

        def gather(s):  # the listed rows themselves, in the order the op reads them (a unit's rows in every input)
            rows = s[3].tolist()
            ptrs = [w.data_ptr() + r * line * es for r in rows for w in s[:3]]
            C.stream_read(ptrs, [line * es] * len(ptrs), threads)

        def ceil_tensors(s):
            r = s[4]
            out = []
            for w in s[:3]:
                flat = w.view(-1)
                n = min(ceil_bytes[r] // w.element_size(), flat.numel())
                off = (r * n) % (flat.numel() - n + 1)
                out.append(flat[off:off + n])
            return out
        peer = masked_cosine_peer(axis)

        def chk(s):
            pooled, per = lpt_kernels.masked_cosine((s[0], s[1]), (s[1], s[2]), s[3], axis=axis, backend=backend)
            p_pooled, p_per = peer(*s[:4])
            return "ok" if _close(pooled, p_pooled, 1e-3, 1e-5) and _close(per, p_per, 1e-3, 1e-5) \
                else "MISMATCH vs eager"
        return Case(
            "masked_cosine", label, sets,
            ours=lambda s: lpt_kernels.masked_cosine((s[0], s[1]), (s[1], s[2]), s[3], axis=axis, backend=backend),
            peer=peer, peer_args=lambda s: s[:4], nbytes=3 * per_tensor,
            ceiling=read_ceiling(ceil_tensors), check=chk, gather=gather if cpu_ceilings and axis == 0 else None)

    cases.append(mc_case(0, [gate, up], "10% axis0 gate rows"))
    cases.append(mc_case(1, [down], "10% axis1 down cols"))

    # act_stats_ over [tokens, 9728] bf16 activations, a few buffers in rotation, one float64 accumulator each.
    apeer = act_stats_peer(ACT_THRESHOLD)

    def act_check(s):
        x = s[0]
        a = ops.new_act_stats(x.shape[-1], device=x.device)
        b = ops.new_act_stats(x.shape[-1], device=x.device)
        lpt_kernels.act_stats_(x, a, threshold=ACT_THRESHOLD, backend=backend)
        apeer(x, b)
        return "ok" if _close(a, b, 1e-4, 1e-6) else "MISMATCH vs eager"
    for xs in [acts] + ([pools["acts_long"]] if gpu_extras and "acts_long" in pools else []):
        asets = [(x, ops.new_act_stats(x.shape[-1], device=x.device)) for x in xs]
        cases.append(Case(
            "act_stats_", f"[{xs[0].shape[0]}, {xs[0].shape[1]}] bf16", asets,
            ours=lambda s: lpt_kernels.act_stats_(s[0], s[1], threshold=ACT_THRESHOLD, backend=backend),
            peer=apeer, peer_args=lambda s: s, nbytes=xs[0].numel() * xs[0].element_size(),
            ceiling=read_ceiling(lambda s: [s[0]]), check=act_check))

    # rollback_ of 2% of the rows of gate_proj-shaped bf16 targets from separate sources (the gate chain). Each call
    # takes the next (target, source) pair and, per pair, the next of disjoint index sets, so touched rows are cold.
    rows, cols = targets[0].shape
    u = max(1, round(0.02 * rows))
    rb_idx = chunks_of_permutation(rows, u, rows // u, gen, device)
    row_bytes = cols * targets[0].element_size()
    rsets = [(targets[j], gate[j], rb_idx[r], r) for r in range(len(rb_idx)) for j in range(len(targets))]

    def copy_ceiling(s):
        r0 = s[3] * u
        s[0][r0:r0 + u].copy_(s[1][r0:r0 + u])

    for alpha in (1.0, 0.5):
        peer = rollback_peer(alpha)

        def chk(s, alpha=alpha, peer=peer):
            t1, t2 = s[0].clone(), s[0].clone()
            lpt_kernels.rollback_(t1, s[1], s[2], alpha=alpha, backend=backend)
            peer(t2, s[1], s[2])
            # alpha=1 must be bit-exact; with alpha<1 torch.lerp's formula may round differently by one ulp.
            ok = torch.equal(t1, t2) if alpha == 1.0 else _close(t1, t2, 1e-2, 1e-6)
            return "ok" if ok else "MISMATCH vs eager"
        cases.append(Case(
            "rollback_", f"2% rows alpha={alpha:g}", rsets,
            ours=lambda s, alpha=alpha: lpt_kernels.rollback_(s[0], s[1], s[2], alpha=alpha, backend=backend),
            peer=peer, peer_args=lambda s: s[:3], nbytes=3 * u * row_bytes,
            ceiling=copy_ceiling if cpu_ceilings else None, ceiling_kind="copy", check=chk))
    return cases


# ---- timing ------------------------------------------------------------------------------------------------------------

def compile_peer(case: Case, first_set):
    """torch.compile(peer), warmed up (compiled) on a set; returns (callable or None, message)."""
    try:
        import torch._dynamo
        torch._dynamo.reset()
        fn = torch.compile(case.peer)
        t0 = time.perf_counter()
        fn(*case.peer_args(first_set))
        fn(*case.peer_args(first_set))
        return fn, f"compiled in {time.perf_counter() - t0:.0f} s"
    except Exception as e:  # noqa: BLE001 - any failure is reported in the table
        return None, f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def time_cpu_case(case: Case, compiled, target_s: float, min_reps: int, max_reps: int, peer_min: int,
                  peer_target_s: float, peer_max: int):
    """Round robin over the sets; every round runs ours and the ceiling, peers in some rounds; medians."""
    counter = itertools.count()

    def nxt():
        return case.sets[next(counter) % len(case.sets)]

    def timed(fn):
        s = nxt()
        t0 = time.perf_counter()
        fn(s)
        return time.perf_counter() - t0

    variants = {"ours": case.ours, "ceiling": case.ceiling, "gather": case.gather,
                "eager": lambda s: case.peer(*case.peer_args(s)),
                "compile": (lambda s: compiled(*case.peer_args(s))) if compiled else None}
    variants = {k: v for k, v in variants.items() if v is not None}
    # Warm-up (first touch, allocator) and per-call estimates.
    est = {}
    for k, fn in variants.items():
        timed(fn)
        est[k] = max(timed(fn), 1e-6)
    reps = int(min(max_reps, max(min_reps, math.ceil(target_s / est["ours"]))))
    peer_reps = {k: int(min(peer_max, reps, max(peer_min, math.ceil(peer_target_s / est[k]))))
                 for k in ("eager", "compile") if k in variants}
    times = {k: [] for k in variants}
    for r in range(reps):
        for k, fn in variants.items():
            if k in peer_reps:
                # spread the peers' reps evenly over the rounds
                if math.floor((r + 1) * peer_reps[k] / reps) == math.floor(r * peer_reps[k] / reps):
                    continue
            times[k].append(timed(fn))
    best = {k: min(v) for k, v in times.items() if v}
    return {k: statistics.median(v) for k, v in times.items() if v}, {k: len(v) for k, v in times.items()}, best


# ---- output ------------------------------------------------------------------------------------------------------------

COLUMNS = ["op", "case", "bytes", "ours ms", "ours GB/s", "ceiling GB/s", "ratio", "eager GB/s", "compile GB/s",
           "x eager", "x compile", "check"]


def fmt_row(row):
    def f(v, spec):
        return spec.format(v) if isinstance(v, (int, float)) else str(v)
    return [row["op"], row["case"], f(row["bytes"] / 1e6, "{:.1f} MB"), f(row["ours_ms"], "{:.2f}"),
            f(row["ours_gbs"], "{:.2f}"), f(row["ceiling_gbs"], "{:.2f}"), f(row["ratio"], "{:.2f}"),
            f(row["eager_gbs"], "{:.2f}"), f(row["compile_gbs"], "{:.2f}"), f(row["x_eager"], "{:.1f}x"),
            f(row["x_compile"], "{:.1f}x"), row["check"]]


def print_table(rows, columns=COLUMNS, formatter=fmt_row):
    cells = [columns] + [formatter(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    line = "  ".join("-" * w for w in widths)
    for j, c in enumerate(cells):
        print("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
        if j == 0:
            print(line)
    sys.stdout.flush()


def load_note() -> str:
    """The 1-minute load average, flagged when other processes compete for the cores (timings then suffer: an OpenMP
    parallel region can wait a whole scheduler slice for its second thread)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load ?"
    busy = load > 0.5 + (os.cpu_count() or 1) * 0.75
    return f"load {load:.2f}" + (" (BUSY: other processes compete for the cores)" if busy else "")


def machine_facts(threads: int):
    from lpt_kernels.backends import cpu as cpu_backend
    model = ""
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    l3 = ""
    try:
        l3 = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
    except OSError:
        pass
    mem = ""
    try:
        for ln in open("/proc/meminfo"):
            if ln.startswith("MemTotal"):
                mem = f"{int(ln.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    isa = cpu_backend.isa() if cpu_backend.AVAILABLE else f"n/a ({cpu_backend.REASON})"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    print(f"machine: {platform.node()} | {model} | cores {os.cpu_count()} | L3 {l3 or '?'} | RAM {mem or '?'} | "
          f"{load_note()}")
    print(f"threads {threads} (torch.get_num_threads() = {torch.get_num_threads()}) | lpt_kernels ISA {isa} | "
          f"lpt_kernels {lpt_kernels.__version__} | torch {torch.__version__} | triton {tv} | "
          f"python {platform.python_version()}")
    sys.stdout.flush()


# ---- CPU section -------------------------------------------------------------------------------------------------------

def make_pools(quick: bool, device="cpu", seed=0, n_chain=8):
    gen = torch.Generator().manual_seed(seed)
    r = 4 if quick else 1
    gate_shape, down_shape = (INTER // r, HIDDEN), (HIDDEN, INTER // r)
    tokens = 8192 // r
    pools = {"gate": make_chain(n_chain, gate_shape, gen, device),
             "up": make_chain(n_chain, gate_shape, gen, device),
             # 9 so that three disjoint triples exist for masked_cosine on columns
             "down": make_chain(n_chain + 1, down_shape, gen, device),
             "acts": [torch.randn(tokens, INTER, generator=gen).to(torch.bfloat16).to(device) for _ in range(4)]}
    pools["targets"] = [w.clone() for w in pools["up"]]  # rollback targets; sources are the gate chain
    return pools, gen


def cpu_section(args):
    print("\n== CPU ==")
    t0 = time.perf_counter()
    pools, gen = make_pools(args.quick)
    total = sum(t.numel() * t.element_size() for p in pools.values() for t in p)
    print(f"synthetic Qwen3-4B-shaped tensors: {total / GB:.2f} GB in {time.perf_counter() - t0:.0f} s "
          f"(gate/up {tuple(pools['gate'][0].shape)}, down {tuple(pools['down'][0].shape)}, "
          f"activations {tuple(pools['acts'][0].shape)}, all bf16)")
    cases = build_cases(pools, "cpu", "cpu", gen, cpu_ceilings=True, threads=args.threads)
    if args.quick:
        timing = dict(target_s=0.25, min_reps=3, max_reps=30, peer_min=1, peer_target_s=0.2, peer_max=2)
    else:
        timing = dict(target_s=4.0, min_reps=9, max_reps=400, peer_min=3, peer_target_s=3.0, peer_max=9)
    rows, notes = [], []
    for case in cases:
        if args.cases and not re.search(args.cases, f"{case.op} {case.case}"):
            continue
        try:
            check = case.check(case.sets[0]) if case.check else ""
        except Exception as e:  # noqa: BLE001
            check = f"check failed: {type(e).__name__}"
        compiled, msg = (None, "compile skipped (--no-compile)") if args.no_compile else \
            compile_peer(case, case.sets[0])
        med, n, best = time_cpu_case(case, compiled, **timing)
        load = load_note()
        row = dict(op=case.op, case=case.case, bytes=case.nbytes, ours_ms=med["ours"] * 1e3, load=load,
                   ours_gbs=case.nbytes / med["ours"] / GB,
                   ceiling_gbs=case.nbytes / med["ceiling"] / GB, ceiling_kind=case.ceiling_kind,
                   eager_gbs=case.nbytes / med["eager"] / GB, check=check, reps=n["ours"],
                   peer_reps=f"{n.get('eager', 0)}/{n.get('compile', 0)}")
        row["ratio"] = row["ours_gbs"] / row["ceiling_gbs"]
        row["ours_best_gbs"] = case.nbytes / best["ours"] / GB      # CSV only: the fastest call of each
        row["ceiling_best_gbs"] = case.nbytes / best["ceiling"] / GB
        row["x_eager"] = med["eager"] / med["ours"]
        if "gather" in med:
            row["gather_gbs"] = case.nbytes / med["gather"] / GB
        if "compile" in med:
            row["compile_gbs"] = case.nbytes / med["compile"] / GB
            row["x_compile"] = med["compile"] / med["ours"]
        else:
            row["compile_gbs"] = row["x_compile"] = "failed" if "failed" in msg else "skipped"
        rows.append(row)
        notes.append(f"{case.op} {case.case}: {n['ours']} reps (eager {n.get('eager', 0)}, compile "
                     f"{n.get('compile', 0)}), ceiling={case.ceiling_kind}, {msg}, {load}")
        print(f"  done: {notes[-1]}", flush=True)
    print()
    print_table(rows)
    print("ceiling: read = lpt_kernels._C_cpu.stream_read of as many bytes (same threads; for a column gather, of the "
          "64-byte lines it touches); copy = torch dst.copy_(src) of a contiguous block of the touched rows, counted "
          "3x like rollback_.")
    for r in rows:
        if "gather_gbs" in r:
            print(f"{r['op']} {r['case']}: a read of the same scattered rows (stream_read over the listed rows, in "
                  f"the op's order) ran at {r['gather_gbs']:.2f} GB/s; ours / that = {r['ours_gbs'] / r['gather_gbs']:.2f}")
    print(f"at the end: {load_note()}")
    for r in rows:
        if r["check"] != "ok":
            print(f"WARNING: {r['op']} {r['case']}: {r['check']}")
    del pools, cases
    return rows


# ---- GPU section -------------------------------------------------------------------------------------------------------

# Peak HBM bandwidth (bytes/s) by device name: the "% of peak" column (issue 16's floor: >= 85% on Qwen3-4B shapes).
PEAK_HBM = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12),
            ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
            ("B200", 8.0e12)]


def peak_hbm(name: str) -> Optional[float]:
    """Nominal HBM bandwidth of a device from its name (None if unknown: the column then shows the copy ceiling)."""
    for key, bw in PEAK_HBM:
        if key.lower() in name.lower():
            return bw
    return None


def gpu_section(args, device="cuda", bench=None, backends=None, quick=None):
    """The same cases on a GPU. `device`, `bench` and `backends` are parameters so that the code path can be
    exercised on CPU (see --gpu-dry-run); normally it runs on CUDA with triton.testing.do_bench."""
    quick = args.quick if quick is None else quick
    if device == "cuda" and not torch.cuda.is_available():
        print("\nGPU section skipped: no CUDA device")
        return []
    print(f"\n== GPU ({device}) ==")
    if bench is None:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100 if not quick else 20, return_mode="median") * 1e-3
    if backends is None:
        backends = []
        for name in ("triton", "cuda"):
            try:
                ops._load(name)
                backends.append(name)
            except RuntimeError as e:
                print(f"backend {name}: unavailable ({e})")
    l2, peak = 0, None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
        peak = peak_hbm(props.name)
        print(f"device: {props.name} | {props.multi_processor_count} SMs | L2 {l2 / 2**20:.0f} MiB | "
              f"memory {props.total_memory / 2**30:.0f} GiB | peak HBM "
              f"{f'{peak / 1e12:.2f} TB/s' if peak else 'unknown'}")
    # device-copy ceiling: 1 GiB (or 4x L2, whichever is larger) copied, counted as read + write
    n = max(2**30, 4 * l2) // 2 if not quick else 2**26
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_s = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * src.element_size() / copy_s / GB
    del src, dst
    print(f"device-copy ceiling: {copy_gbs:.0f} GB/s (dst.copy_(src) of {n * 2 / 2**20:.0f} MiB, read + write)")
    pools, gen = make_pools(quick, device=device, seed=1)
    if device == "cuda":  # act_stats_ at 1e5 tokens (two buffers of 1.9 GB in rotation)
        t_long = 100_000 if not quick else 20_000
        pools["acts_long"] = [torch.randn(t_long, INTER, device=device).to(torch.bfloat16) for _ in range(2)]
    total = sum(t.numel() * t.element_size() for p in pools.values() for t in p)
    print(f"inputs: {total / GB:.2f} GB, rotated per call (L2 {l2 / 2**20:.0f} MiB)")
    rows = []
    for backend in backends:
        cases = build_cases(pools, backend, device, gen, cpu_ceilings=False, threads=args.threads,
                            gpu_extras=device == "cuda")
        for case in cases:
            if args.cases and not re.search(args.cases, f"{case.op} {case.case}"):
                continue
            counter = itertools.count()

            def rot(fn, case=case, counter=counter):
                return lambda: fn(case.sets[next(counter) % len(case.sets)])
            row = dict(backend=backend, op=case.op, case=case.case, bytes=case.nbytes)
            try:
                row["check"] = case.check(case.sets[0]) if case.check else ""
                t = bench(rot(case.ours))
                row["ours_gbs"] = case.nbytes / t / GB
                row["us"] = t * 1e6
                row["frac"] = row["ours_gbs"] / copy_gbs
                row["peak_frac"] = row["ours_gbs"] * GB / peak if peak else "-"
            except Exception as e:  # noqa: BLE001 - report and go on
                row.update(check=f"error: {type(e).__name__}: {str(e)[:80]}", ours_gbs="-", us="-", frac="-")
            try:
                te = bench(rot(lambda s: case.peer(*case.peer_args(s))))
                row["eager_gbs"] = case.nbytes / te / GB
            except Exception as e:  # noqa: BLE001
                row["eager_gbs"] = f"error: {type(e).__name__}"
            if args.no_compile:
                row["compile_gbs"] = "skipped"
            else:
                compiled, msg = compile_peer(case, case.sets[0])
                if compiled is None:
                    row["compile_gbs"] = "failed"
                else:
                    tc = bench(rot(lambda s, c=compiled: c(*case.peer_args(s))))
                    row["compile_gbs"] = case.nbytes / tc / GB
            rows.append(row)
            print(f"  done: {backend} {case.op} {case.case}", flush=True)
    cols = ["backend", "op", "case", "bytes", "us", "ours GB/s", "of peak HBM", "of copy ceiling", "eager GB/s",
            "compile GB/s", "check"]

    def fmt(r):
        def f(v, spec):
            return spec.format(v) if isinstance(v, (int, float)) else str(v)
        return [r["backend"], r["op"], r["case"], f(r["bytes"] / 1e6, "{:.1f} MB"), f(r["us"], "{:.1f}"),
                f(r["ours_gbs"], "{:.0f}"), f(r.get("peak_frac", "-"), "{:.0%}"), f(r["frac"], "{:.0%}"),
                f(r["eager_gbs"], "{:.0f}"),
                f(r["compile_gbs"], "{:.0f}"), r["check"]]
    print()
    if rows:
        cells = [cols] + [fmt(r) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
        for j, c in enumerate(cells):
            print("  ".join(x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
            if j == 0:
                print("  ".join("-" * w for w in widths))
    else:
        print("no GPU backend could run")
    for r in rows:
        r["copy_ceiling_gbs"] = copy_gbs
    if peak:
        print(f"of peak HBM: ours / {peak / 1e12:.2f} TB/s (nominal); the copy ceiling measured here is "
              f"{copy_gbs * GB / peak:.0%} of it")
    return rows


# ---- the machines table (benchmarks/README.md) ------------------------------------------------------------------------

# (column, case as "op case") of a machine's row, in the order of the README's table.
MACHINE_COLUMNS = [("K=2 rows", "unit_gram K=2 axis0 gate/up rows"), ("K=5 rows", "unit_gram K=5 axis0 gate/up rows"),
                   ("K=2 cols", "unit_gram K=2 axis1 down cols"), ("K=5 cols", "unit_gram K=5 axis1 down cols"),
                   ("mc rows", "masked_cosine 10% axis0 gate rows"),
                   ("mc cols", "masked_cosine 10% axis1 down cols"), ("act_stats_", "act_stats_ [8192, 9728] bf16"),
                   ("rollback 1", "rollback_ 2% rows alpha=1"), ("rollback 0.5", "rollback_ 2% rows alpha=0.5")]


def cpu_model() -> str:
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_row(rows, threads: int) -> str:
    """This machine's row of the README's table of machines: CPU, ISA, the 2-thread read ceiling (of the K=2 rows
    case, measured in this run) and each case's ratio to its ceiling; '-' for cases not run."""
    from lpt_kernels.backends import cpu as cpu_backend
    import datetime
    facts = []  # family/model and L3 size: "Intel(R) Xeon(R) Processor" alone names several kinds
    try:
        info = open("/proc/cpuinfo").read()
        f = re.search(r"^cpu family\s*:\s*(\d+)", info, re.M)
        m = re.search(r"^model\s*:\s*(\d+)", info, re.M)
        if f and m:
            facts.append(f"family {f.group(1)} model {m.group(1)}")
        l3 = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
        if l3.endswith("K"):
            facts.append(f"L3 {int(l3[:-1]) // 1024} MiB")
    except (OSError, ValueError):
        pass
    fam = f" ({', '.join(facts)})" if facts else ""
    by_case = {f"{r['op']} {r['case']}": r for r in rows}
    ceil = by_case.get(MACHINE_COLUMNS[0][1], {}).get("ceiling_gbs")
    cells = [datetime.date.today().isoformat(), cpu_model() + fam, cpu_backend.isa() if cpu_backend.AVAILABLE else "-",
             str(threads), f"{ceil:.1f}" if isinstance(ceil, float) else "-"]
    cells += [f"{by_case[c]['ratio']:.2f}" if c in by_case else "-" for _, c in MACHINE_COLUMNS]
    cells.append(load_note().replace(" (BUSY: other processes compete for the cores)", " BUSY"))
    head = ["date", "CPU", "ISA", "threads", "read ceiling GB/s"] + [c for c, _ in MACHINE_COLUMNS] + ["load"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |"])


# ---- main --------------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller tensors and fewer reps: a smoke run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (ours, ceiling, peers)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--cases", help="only cases whose 'op case' matches this regex")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU section")
    p.add_argument("--gpu-dry-run", action="store_true", help=argparse.SUPPRESS)  # run the GPU code path on CPU
    p.add_argument("--machine-row", action="store_true",
                   help="at the end, print this machine's row of the table of machines in benchmarks/README.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine_facts(args.threads)
    rows = [] if args.gpu_only else cpu_section(args)
    if args.gpu_dry_run:
        def bench(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        gpu_rows = gpu_section(args, device="cpu", bench=bench, backends=["cpu"], quick=True)
    else:
        gpu_rows = gpu_section(args)
    if args.machine_row:
        print("\nthis machine's row (benchmarks/README.md, machines measured):\n" + machine_row(rows, args.threads))
    if args.csv:
        keys = ["section", "backend", "op", "case", "bytes", "ours_ms", "us", "ours_gbs", "ceiling_gbs",
                "ceiling_kind", "ratio", "ours_best_gbs", "ceiling_best_gbs", "gather_gbs", "eager_gbs", "compile_gbs", "x_eager",
                "x_compile", "frac", "peak_frac",
                "copy_ceiling_gbs", "reps", "peer_reps", "check", "load", "threads", "isa"]
        from lpt_kernels.backends import cpu as cpu_backend
        isa = cpu_backend.isa() if cpu_backend.AVAILABLE else ""
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**r, "section": "cpu", "backend": "cpu", "threads": args.threads, "isa": isa})
            for r in gpu_rows:
                w.writerow({**r, "section": "gpu"})
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
