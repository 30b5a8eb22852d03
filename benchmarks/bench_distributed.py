"""`lpt diff` under torchrun against the single-process pass: byte balance across ranks and the cost of the gather.

    python benchmarks/synth_checkpoints.py /work/bench_data/dist-l4 --layers 4 --domains 2   # 3 x 1.59 GB bf16
    python benchmarks/bench_distributed.py /work/bench_data/dist-l4 [--nproc 2] [--reps 3] [--csv out.csv]

DATA_DIR holds the checkpoints (--labels, default base,code,math) as synth_checkpoints.py writes them: Qwen3-4B
shapes (the real hidden, intermediate, head and vocab sizes), a few layers so that they fit the page cache. The page
cache is warmed first (and checked with mincore(2) before every measurement) so that the figures are of the work,
not of the disk. Measured in every repetition, each in fresh processes (the time is taken inside them, around the
work: interpreter start, imports and process-group setup excluded):

- ``read()``: the read ceiling — every shard file read once with 64 MiB ``readinto`` calls (bench_diff's method);
- ``single``: ``lpt_kernels.analysis.diff(dirs)`` in one process (what ``lpt diff`` does, minus writing the profile);
- ``torchrun``: the same under ``torchrun --standalone --nproc-per-node N`` (gloo), ``diff(dirs, distributed=True)``:
  the wall time on rank 0 from a barrier before the call to its return with the gathered profile. Inside it, the
  gather (``profile._gather_partials``: every rank's per-unit rows, per-tensor entries and histograms sent to rank 0
  and merged there) is timed after a barrier, so that waiting for the slower rank is not counted as gathering.

Floors (issue #15): the ranks' bytes read within 10% of each other ((max - min) / max), and the gathered result
costing < 5% of the single-process time (gather seconds / single-process median seconds). GB/s is of the checkpoint
bytes (every byte read once is the minimum); "x ceiling" = ceiling median time / this median time. On a 2-core
machine two ranks share the cores the single process had, so the torchrun wall time shows the cost of splitting
the work (the two ranks' streams interleave on the same memory bus), not a speed-up: that needs ranks on separate
hosts or sockets.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_diff import cpu_pressure, machine_facts, resident_fraction, shard_files, warm  # noqa: E402

LABELS = ("base", "code", "math")


def _child_single(dirs, out):
    from lpt_kernels.analysis import diff

    t0 = time.perf_counter()
    prof = diff(dirs, progress=False)
    dt = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump({"seconds": dt, "ranks": prof.meta["ranks"], "checkpoints": len(dirs)}, f)


def _child_ranks(dirs, out):
    import torch.distributed as dist

    import lpt_kernels.analysis.profile as profile
    from lpt_kernels.analysis import diff

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    times = {}
    real_pass, real_gather = profile._pass, profile._gather_partials

    def timed_pass(*a, **k):
        t = time.perf_counter()
        try:
            return real_pass(*a, **k)
        finally:
            times["pass"] = time.perf_counter() - t

    def timed_gather(*a, **k):
        dist.barrier()  # every rank is done with its share: what follows is the gather alone
        t = time.perf_counter()
        r = real_gather(*a, **k)
        times["gather"] = time.perf_counter() - t
        return r

    profile._pass, profile._gather_partials = timed_pass, timed_gather
    dist.barrier()
    t0 = time.perf_counter()
    prof = diff(dirs, progress=False, distributed=True)
    dt = time.perf_counter() - t0
    passes = [None] * dist.get_world_size()
    dist.all_gather_object(passes, times["pass"])
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": dt, "gather": times["gather"], "pass": passes, "ranks": prof.meta["ranks"],
                       "world_size": prof.meta["world_size"]}, f)
    dist.destroy_process_group()


def _read(files):
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            with open(fd, "rb", buffering=0, closefd=False) as fh:
                while fh.readinto(buf):
                    pass
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _run(cmd, out):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench_distributed: {' '.join(cmd[:6])} ... failed:\n{r.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description="lpt diff under torchrun vs one process (see the module docstring)")
    ap.add_argument("data_dir", nargs="?")
    ap.add_argument("--nproc", type=int, default=2, help="ranks on this host (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--labels", default=",".join(LABELS), help="checkpoint subdirectories in training order")
    ap.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    ap.add_argument("--child", choices=("single", "ranks"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args(argv)
    labels = [x.strip() for x in a.labels.split(",") if x.strip()]
    if a.child:
        dirs = [a.data_dir] + rest  # the first checkpoint lands in the data_dir positional
        for d in dirs:
            if not os.path.isdir(d):
                raise SystemExit(f"bench_distributed: {d} is not a checkpoint directory")
        return _child_single(dirs, a.out) if a.child == "single" else _child_ranks(dirs, a.out)
    if not a.data_dir:
        ap.error("DATA_DIR is required")
    dirs = [os.path.join(a.data_dir, lab) for lab in labels]
    for d in dirs:
        if not os.path.isdir(d):
            raise SystemExit(f"bench_distributed: {d} is not a directory (run synth_checkpoints.py first)")
    files = [f for d in dirs for f in shard_files(d)]
    total = sum(os.path.getsize(f) for f in files)
    print(f"# {machine_facts(a.data_dir)}")
    print(f"# {len(dirs)} checkpoints ({', '.join(labels)}), {len(files)} shard files, {total / 1e9:.3f} GB; warm page "
          f"cache; {a.reps} reps; torchrun --nproc-per-node {a.nproc} (gloo)")
    t = warm(files)
    print(f"# warm-up read: {t:.1f} s, resident afterwards {resident_fraction(files):.1%}")
    me = os.path.abspath(__file__)
    env_cmd = [sys.executable, me]
    res = {"read": [], "single": [], "torchrun": [], "gather": []}
    last = last_one = None
    pressure = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        for rep in range(a.reps):
            if resident_fraction(files) < 0.999:
                warm(files)
            pressure.append(cpu_pressure())
            res["read"].append(_read(files))
            one = _run(env_cmd + ["--child", "single", "--out", out] + dirs, out)
            res["single"].append(one["seconds"])
            many = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc-per-node={a.nproc}", me, "--child", "ranks", "--out", out] + dirs, out)
            res["torchrun"].append(many["seconds"])
            res["gather"].append(many["gather"])
            last, last_one = many, one
            print(f"# rep {rep + 1}: read {res['read'][-1]:.2f} s, single {one['seconds']:.2f} s, torchrun "
                  f"{many['seconds']:.2f} s (passes {', '.join(f'{p:.2f}' for p in many['pass'])} s, gather "
                  f"{many['gather'] * 1e3:.0f} ms)", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    ceiling = med["read"]
    rows = [("read() ceiling", med["read"]), ("lpt diff, 1 process", med["single"]),
            (f"lpt diff, torchrun {a.nproc} ranks", med["torchrun"])]
    print(f"\n{'measurement':<32} {'median s':>9} {'GB/s':>7} {'x ceiling':>10}")
    table = []
    for name, sec in rows:
        print(f"{name:<32} {sec:>9.3f} {total / 1e9 / sec:>7.2f} {ceiling / sec:>10.3f}")
        table.append({"measurement": name, "seconds": round(sec, 4), "GB/s": round(total / 1e9 / sec, 3),
                      "x_ceiling": round(ceiling / sec, 3)})
    rb = [r["bytes"] for r in last["ranks"]]
    if sum(rb) != last_one["ranks"][0]["bytes"]:  # the ranks together read what one process reads, no more
        raise SystemExit(f"bench_distributed: the ranks read {sum(rb)} bytes in all, one process "
                         f"{last_one['ranks'][0]['bytes']}: not the same work")
    imbalance = (max(rb) - min(rb)) / max(rb)
    overhead = med["gather"] / med["single"]
    print(f"\nranks: " + "; ".join(f"rank {i}: {r['tensors']} tensors, {r['bytes'] / 1e9:.3f} GB"
                                  for i, r in enumerate(last["ranks"])))
    print(f"byte balance (max - min) / max = {imbalance:.2%}   floor < 10%: {'PASS' if imbalance < 0.10 else 'FAIL'}")
    print(f"gather {med['gather'] * 1e3:.1f} ms = {overhead:.2%} of the single-process time   floor < 5%: "
          f"{'PASS' if overhead < 0.05 else 'FAIL'}")
    print(f"# CPU pressure (PSI some avg10, % of time a task waited for a core) before each rep: "
          f"{', '.join(f'{p:.0f}' for p in pressure)}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
            f.write(f"# byte imbalance,{imbalance:.4f}\n# gather share of single,{overhead:.4f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
