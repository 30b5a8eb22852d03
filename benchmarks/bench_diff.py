"""End-to-end benchmark of the checkpoint analyzer: `lpt diff` over base + 4 domains against the read ceiling.

    python benchmarks/synth_checkpoints.py /work/bench_data/l8 --layers 8      # 5 x 2.4 GB, fits in the page cache
    python benchmarks/bench_diff.py /work/bench_data/l8 [--reps 3] [--csv out.csv]          # warm page cache
    python benchmarks/bench_diff.py /work/bench_data/l8 --cold [--reps 3]                    # cold page cache

DATA_DIR holds the checkpoints base, code, math, qa, cw (HF directories, as synth_checkpoints.py writes them; --labels
names others). Every measurement runs in a fresh subprocess (`python bench_diff.py --child KIND ...`), so its peak
memory is its own and its page faults are its own; the time is taken inside the child around the work (interpreter
start and imports excluded, opening the checkpoints included). Measured, in this order, in every repetition:

- ``read()``: the read ceiling with plain system calls: every shard file of the 5 checkpoints read once, file after
  file, sequentially with 64 MiB ``readinto`` calls into one reused buffer (POSIX_FADV_SEQUENTIAL);
- ``mmap+stream_read``: the read ceiling through memory maps, the way `lpt diff` reads: each file mapped privately
  (like lpt_kernels.checkpoint) and every 64-bit word summed by ``lpt_kernels._C_cpu.stream_read`` with the same
  threads as the kernels (page faults included);
- ``lpt diff``: ``lpt_kernels.analysis.diff([5 dirs], progress=False)`` (the work of the `lpt diff` command minus
  writing the small profile): one streaming pass, per-unit Gram/abs-sum/abs-max/zero counts of the 4 deltas, per-tensor
  sparsity and the |dW| histograms;
- ``eager peer``: the obvious script: for each consecutive pair, ``safetensors.torch.load_file`` every shard of both
  checkpoints, then per tensor ``d = b.float() - a.float()`` and per unit (rows of gate/up, columns of down, heads of
  q/k/v/o) ``(d*d).sum``, ``|d|.sum``, ``|d|.amax``, ``(d == 0).sum``, and ``(d == 0).sum()`` of every other tensor. It
  computes less than `lpt diff` (no cross-delta dot products, no near-zero counts, no histograms) and reads every
  inner checkpoint twice. Skipped (and said so) when its estimated peak memory would not fit.

GB/s is always of the same bytes: the summed file sizes of the 5 checkpoints (each byte read once is the minimum).
"x ceiling" = (faster ceiling's median time) / (this median time), i.e. the share of the read speed reached.

Page cache: warm (default) reads every file once before the first measurement and checks with mincore(2) before every
measurement that all pages are resident (reading them again if not: the eager peer's ~5x-checkpoint anonymous memory
can push them out); the checkpoints must fit in RAM (use --layers 8 or less in synth_checkpoints.py). --cold drops
the files from the page cache before every measurement: os.sync(), posix_fadvise(POSIX_FADV_DONTNEED) on every file
and ``echo 3 > /proc/sys/vm/drop_caches`` (which a container may refuse: the table says which worked), then reports
the resident share measured with mincore(2).

Memory: the parent samples /proc/<child>/status every 20 ms (RssAnon, VmRSS) and a thread in the child samples its own
every 10 ms; the table reports the larger peak of RssAnon ("peak anon") and the kernel's exact VmHWM ("peak RSS",
which includes the file pages of the mappings: reclaimable page cache, not memory the process owns).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import datetime
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LABELS = ("base", "code", "math", "qa", "cw")
BUF = 64 << 20
KINDS = ("read", "mmap", "diff", "peer")
NAMES = {"read": "read ceiling: read() 64 MiB", "mmap": "read ceiling: mmap+stream_read",
         "diff": "lpt diff (analysis.diff)", "peer": "eager peer (load_file+torch)"}


# ---------------------------------------------------------------------------------------------------------------
# files, page cache

def shard_files(ckpt_dir: str):
    idx = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(ckpt_dir, s) for s in shards]
    files = sorted(os.path.join(ckpt_dir, e) for e in os.listdir(ckpt_dir) if e.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"bench_diff: no safetensors files in {ckpt_dir}")
    return files


_libc = None
_BIT0 = bytes(i & 1 for i in range(256))


def _lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc = lib
    return _libc


def resident_fraction(files) -> float:
    """Share of the files' pages in the page cache, by mincore(2) on a fresh shared read-only mapping (mapping does
    not read anything in)."""
    lib = _lib()
    page = mmap.PAGESIZE
    total = res = 0
    for f in files:
        size = os.path.getsize(f)
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return float("nan")
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if lib.mincore(addr, size, vec) != 0:
                    return float("nan")
                raw = bytes(vec)
                res += raw.translate(_BIT0).count(1)  # bit 0 of each byte: page resident
                total += n
            finally:
                lib.munmap(addr, size)
        finally:
            os.close(fd)
    return res / total if total else 1.0


def warm(files) -> float:
    """Read every file into the page cache; returns the seconds it took."""
    t0 = time.perf_counter()
    buf = bytearray(BUF)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def drop(files):
    """Evict the files from the page cache; returns which methods worked."""
    os.sync()
    ok = {"fadvise": True, "drop_caches": False}
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok["fadvise"] = False
        finally:
            os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        ok["drop_caches"] = True
    except OSError as e:
        ok["drop_caches_error"] = e.strerror or str(e)
    return ok


def cpu_pressure() -> float:
    """PSI 'some' avg10 of the CPU (% of the last 10 s in which a runnable task waited for a core): how much other
    work competed with the measurement; nan where the kernel has no PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return float("nan")


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


# ---------------------------------------------------------------------------------------------------------------
# the children

def _status(pid="self"):
    anon = rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return anon, rss, hwm


class _Sampler(threading.Thread):
    def __init__(self, every=0.01):
        super().__init__(daemon=True)
        self.every, self.stop, self.anon = every, False, 0

    def run(self):
        while not self.stop:
            self.anon = max(self.anon, _status()[0])
            time.sleep(self.every)


def _child_read(files, threads):
    buf = bytearray(BUF)
    n = 0
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            with open(fd, "rb", buffering=0, closefd=False) as fh:
                while True:
                    k = fh.readinto(buf)
                    if not k:
                        break
                    n += k
        finally:
            os.close(fd)
    return time.perf_counter() - t0, {"bytes": n}


def _child_mmap(files, threads):
    import torch
    from lpt_kernels import _C_cpu

    threads = threads or torch.get_num_threads()
    n = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            mm = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            t = torch.frombuffer(mm, dtype=torch.uint8)
            _C_cpu.stream_read([t.data_ptr()], [size - size % 8], threads)
            n += size
            del t
            mm.close()
    return time.perf_counter() - t0, {"bytes": n, "threads": threads}


def _child_diff(dirs, threads):
    import torch
    from lpt_kernels.analysis import diff

    t0 = time.perf_counter()
    prof = diff(dirs, progress=False)
    dt = time.perf_counter() - t0
    extra = {"sparsity": prof.sparsity(), "threads": torch.get_num_threads()}
    if "mlp" in prof.groups:
        extra["jaccard_mlp_top10"] = [[round(x, 3) for x in row] for row in prof.jaccard("mlp", 0.10).tolist()]
    return dt, extra


_UNITS = (  # (name suffix, unit axis, block)
    ("mlp.gate_proj.weight", 0, 1), ("mlp.up_proj.weight", 0, 1), ("mlp.down_proj.weight", 1, 1),
    ("self_attn.q_proj.weight", 0, 128), ("self_attn.k_proj.weight", 0, 128), ("self_attn.v_proj.weight", 0, 128),
    ("self_attn.o_proj.weight", 1, 128),
)


def _peer_stats(a, b, name):
    """The obvious eager statistics of one delta (what a researcher writes first)."""
    import torch

    d = b.float() - a.float()
    for suffix, axis, block in _UNITS:
        if name.endswith(suffix):
            r, c = d.shape
            if axis == 0:
                v, dims = d.view(r // block, block * c), (1,)
            else:
                v, dims = d.view(r, c // block, block), (0, 2)
            ad = v.abs()
            return {"sq_norm": (v * v).sum(dims), "abs_sum": ad.sum(dims), "abs_max": ad.amax(dims),
                    "zeros": (v == 0).sum(dims)}
    return {"zeros": (d == 0).sum()}


def _child_peer(dirs, threads):
    import torch
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in shard_files(d):
            out.update(load_file(f))
        return out

    t0 = time.perf_counter()
    zeros = []
    for da, db in zip(dirs[:-1], dirs[1:]):
        A, B = load(da), load(db)
        res, z, total = {}, 0, 0
        for name, b in B.items():
            s = _peer_stats(A[name], b, name)
            res[name] = s
            z += int(s["zeros"].sum())
            total += b.numel()
        zeros.append(z / total)
        del A, B, res
    return time.perf_counter() - t0, {"sparsity": zeros, "threads": torch.get_num_threads()}


def child_main(kind, payload):
    p = json.loads(payload)
    if p.get("threads"):
        import torch
        torch.set_num_threads(p["threads"])
    if kind in ("diff", "peer", "mmap"):  # imports outside the timed region, as for a warmed-up CLI
        import torch  # noqa: F401
        import lpt_kernels.analysis  # noqa: F401
        import safetensors.torch  # noqa: F401
    s = _Sampler()
    s.start()
    fn = {"read": _child_read, "mmap": _child_mmap, "diff": _child_diff, "peer": _child_peer}[kind]
    dt, extra = fn(p["files"] if kind in ("read", "mmap") else p["dirs"], p.get("threads"))
    s.stop = True
    s.join()
    anon, rss, hwm = _status()
    print(json.dumps({"time": dt, "anon_kb": max(s.anon, anon), "hwm_kb": hwm, "extra": extra}))


# ---------------------------------------------------------------------------------------------------------------
# the parent

def run_child(kind, payload, every=0.02):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--payload", json.dumps(payload)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        anon = rss = 0
        while p.poll() is None:
            try:
                a, r, _ = _status(p.pid)
                anon, rss = max(anon, a), max(rss, r)
            except (OSError, ValueError):
                pass
            time.sleep(every)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text, etext = out.read(), err.read()
    if p.returncode != 0:
        tail = etext.strip().splitlines()[-5:]
        raise RuntimeError(f"{kind} child failed (rc {p.returncode}): " + " | ".join(tail))
    res = json.loads(text.strip().splitlines()[-1])
    res["anon_kb"] = max(res["anon_kb"], anon)
    res["hwm_kb"] = max(res["hwm_kb"], rss)
    res["proc_wall"] = wall
    return res


def machine_facts(data_dir):
    import torch
    try:
        from lpt_kernels import _C_cpu
        isa = _C_cpu.isa()
    except Exception as e:  # noqa: BLE001
        isa = f"unavailable ({e})"
    mi = meminfo()
    dev = os.stat(data_dir).st_dev
    ra = "?"
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/read_ahead_kb") as f:
            ra = f.read().strip()
    except OSError:
        pass
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), lpt cpu ISA {isa}, RAM {mi['MemTotal'] / 2**30:.1f} GiB "
            f"({mi['MemAvailable'] / 2**30:.1f} available), data on device {os.major(dev)}:{os.minor(dev)} "
            f"(read_ahead_kb {ra}), load average {os.getloadavg()[0]:.2f}")


def peer_estimate(dirs, files_by_dir):
    """Bytes the eager peer needs: two whole checkpoints in anonymous memory + ~4 fp32 temporaries of the largest
    tensor (the embedding)."""
    sizes = [sum(os.path.getsize(f) for f in fs) for fs in files_by_dir]
    pair = max(a + b for a, b in zip(sizes[:-1], sizes[1:]))
    largest = 0
    for f in files_by_dir[0]:
        with open(f, "rb") as fh:
            hlen = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(hlen))
        for k, v in hdr.items():
            if k != "__metadata__":
                n = 1
                for s in v["shape"]:
                    n *= s
                largest = max(largest, n)
    return pair + 4 * 4 * largest


def main(argv=None):
    ap = argparse.ArgumentParser(description="lpt diff end-to-end benchmark (see the module docstring)")
    ap.add_argument("data_dir", nargs="?")
    ap.add_argument("--cold", action="store_true", help="drop the files from the page cache before each measurement")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (default 3)")
    ap.add_argument("--peer-reps", type=int, default=None,
                    help="repetitions of the eager peer (default: --reps warm, 1 cold; 0 skips it)")
    ap.add_argument("--labels", default=",".join(LABELS), help="checkpoint subdirectories in training order")
    ap.add_argument("--threads", type=int, default=0, help="torch / kernel threads in the children (default: torch's)")
    ap.add_argument("--only", default=",".join(KINDS), help=f"comma list of measurements (default {','.join(KINDS)})")
    ap.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(a.child, a.payload)
    if not a.data_dir:
        ap.error("DATA_DIR is required")

    labels = [x.strip() for x in a.labels.split(",") if x.strip()]
    dirs = [os.path.join(a.data_dir, lab) for lab in labels]
    for d in dirs:
        if not os.path.isdir(d):
            raise SystemExit(f"bench_diff: {d} is not a directory (run synth_checkpoints.py first)")
    files_by_dir = [shard_files(d) for d in dirs]
    files = [f for fs in files_by_dir for f in fs]
    total = sum(os.path.getsize(f) for f in files)
    kinds = [k for k in (x.strip() for x in a.only.split(",")) if k]
    for k in kinds:
        if k not in KINDS:
            ap.error(f"--only: unknown measurement {k!r}")
    peer_reps = a.peer_reps if a.peer_reps is not None else (1 if a.cold else a.reps)
    notes = []
    mi = meminfo()
    if "peer" in kinds and peer_reps > 0:
        need = peer_estimate(dirs, files_by_dir)
        room = mi["MemAvailable"] * 0.85  # MemAvailable counts the reclaimable page cache
        if need > room:
            notes.append(f"eager peer skipped: it would need ~{need / 1e9:.1f} GB of anonymous memory, "
                         f"{mi['MemAvailable'] / 1e9:.1f} GB available")
            peer_reps = 0
    if not a.cold and total > 0.8 * mi["MemTotal"]:
        raise SystemExit(f"bench_diff: {total / 1e9:.1f} GB of checkpoints do not fit in the page cache "
                         f"({mi['MemTotal'] / 1e9:.1f} GB RAM): synthesise fewer --layers or use --cold")

    print(f"# {machine_facts(a.data_dir)}")
    print(f"# {len(dirs)} checkpoints ({', '.join(labels)}), {len(files)} shard files, {total / 1e9:.3f} GB; "
          f"{'COLD' if a.cold else 'warm'} page cache; {a.reps} reps (eager peer {peer_reps})")
    payload_files = {"files": files, "threads": a.threads}
    payload_dirs = {"dirs": dirs, "threads": a.threads}
    if not a.cold:
        t = warm(files)
        print(f"# warm-up read: {t:.1f} s ({total / 1e9 / t:.2f} GB/s), resident afterwards "
              f"{resident_fraction(files):.1%}")
    results = {k: [] for k in kinds}
    drops = []
    for rep in range(a.reps):
        for k in kinds:
            if k == "peer" and rep >= peer_reps:
                continue
            if a.cold:
                drops.append(drop(files))
                before = resident_fraction(files)
            else:
                before = resident_fraction(files)
                if before < 0.999:
                    warm(files)
                    before = resident_fraction(files)
            r = run_child(k, payload_files if k in ("read", "mmap") else payload_dirs)
            r["resident_before"] = before
            r["cpu_psi"] = cpu_pressure()
            r["load"] = os.getloadavg()[0]
            results[k].append(r)
            print(f"  rep {rep + 1} {NAMES[k]:<32} {r['time']:8.2f} s  {total / 1e9 / r['time']:6.2f} GB/s  "
                  f"anon {r['anon_kb'] / 1024:7.0f} MB  RSS {r['hwm_kb'] / 1024:7.0f} MB  "
                  f"resident before {before:.1%}  cpu PSI {r['cpu_psi']:.0f}%  load {r['load']:.1f}", flush=True)
    if a.cold and drops:
        d0 = drops[0]
        worked = [m for m in ("fadvise", "drop_caches") if all(d.get(m) for d in drops)]
        notes.append("cache dropped with: " + (", ".join(worked) or "nothing")
                     + (f" (drop_caches refused: {d0['drop_caches_error']})" if "drop_caches_error" in d0 else ""))

    med = {k: statistics.median(r["time"] for r in v) for k, v in results.items() if v}
    ceil_k = min((k for k in ("read", "mmap") if k in med), key=lambda k: med[k], default=None)
    rows = []
    hdr = (f"{'case':<32} {'median s':>9} {'min s':>8} {'GB/s':>7} {'x ceiling':>10} {'peak anon MB':>13} "
           f"{'peak RSS MB':>12} {'resident':>9}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for k in kinds:
        v = results.get(k)
        if not v:
            print(f"{NAMES[k]:<32} {'skipped':>9}")
            continue
        t, tmin = med[k], min(r["time"] for r in v)
        x = med[ceil_k] / t if ceil_k else float("nan")
        anon = max(r["anon_kb"] for r in v) / 1024
        rss = max(r["hwm_kb"] for r in v) / 1024
        res = min(r["resident_before"] for r in v)
        print(f"{NAMES[k]:<32} {t:9.2f} {tmin:8.2f} {total / 1e9 / t:7.2f} {x:10.2f} {anon:13.0f} {rss:12.0f} "
              f"{res:9.1%}")
        rows.append({"case": NAMES[k], "kind": k, "cache": "cold" if a.cold else "warm", "reps": len(v),
                     "median_s": round(t, 4), "min_s": round(tmin, 4), "gbps": round(total / 1e9 / t, 4),
                     "x_ceiling": round(x, 4), "peak_anon_mb": round(anon), "peak_rss_mb": round(rss),
                     "resident_before": round(res, 4), "bytes": total, "times": [round(r["time"], 4) for r in v],
                     "cpu_psi_max": max(r["cpu_psi"] for r in v), "load_max": round(max(r["load"] for r in v), 2)})
    print()
    if ceil_k:
        print(f"ceiling = {NAMES[ceil_k]} (the faster of the two, median {med[ceil_k]:.2f} s)")
    if "diff" in med and ceil_k:
        ratio = med[ceil_k] / med["diff"]
        if a.cold:
            print(f"lpt diff time / cold read time = {med['diff'] / med[ceil_k]:.2f} (floor: <= 1.1) -> "
                  f"{'PASS' if med['diff'] / med[ceil_k] <= 1.1 else 'FAIL'}")
        else:
            print(f"read time / lpt diff time = {ratio:.2f} (floor: >= 0.85, diff at >= 85% of the read speed) -> "
                  f"{'PASS' if ratio >= 0.85 else 'FAIL'}")
    if "diff" in results and results["diff"]:
        anon = max(r["anon_kb"] for r in results["diff"]) / 1024
        print(f"lpt diff peak anonymous RSS = {anon:.0f} MB (floor: <= 1536 MB) -> {'PASS' if anon <= 1536 else 'FAIL'}")
        ex = results["diff"][0]["extra"]
        sp = ", ".join(f"{d} {v:.1%}" for d, v in ex["sparsity"].items())
        print(f"update sparsity (lpt diff, exact zeros, consecutive): {sp}")
        if "jaccard_mlp_top10" in ex:
            print(f"Jaccard of the top-10% MLP neurons (code, math, qa, cw): {ex['jaccard_mlp_top10']}")
    if "peer" in results and results["peer"] and "diff" in med:
        print(f"lpt diff speed-up over the eager peer: {med['peer'] / med['diff']:.1f}x")
    psi = max((r["cpu_psi"] for v in results.values() for r in v), default=float("nan"))
    if psi > 10:
        notes.append(f"other processes competed for the CPU (CPU PSI 'some' avg10 up to {psi:.0f}% right after a "
                     f"measurement): times are inflated, ratios less so")
    for n in notes:
        print(f"note: {n}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["case"])
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {a.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
