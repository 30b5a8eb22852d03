"""Rollback application on Qwen3-4B-shaped checkpoints: file rollback vs copying the checkpoint, live rollback vs
copy bandwidth, and both vs the obvious way (load both state dicts, index_copy_ per tensor, save_file).

    python benchmarks/synth_checkpoints.py DATA_DIR --layers 36 --domains 1     # DATA_DIR/{base,code}, 8 GB each
    python benchmarks/bench_rollback.py DATA_DIR [--target code] [--source base] [--frac 0.02] [--reps 2]
                                        [--work DIR] [--obvious auto|full|per-shard|skip] [--skip-file]
                                        [--skip-live] [--threads N] [--json FILE]

The selection is `--frac` of the MLP units of every layer, drawn at random per layer (seed 0): for each unit, its
gate_proj row, up_proj row and down_proj column. "Touched bytes" T are the bytes of those coordinates in the target.

What is measured (all in this run, on this machine; page cache handled per file with posix_fadvise, never by
dropping the system's caches):

- memory copy bandwidth: torch `dst.copy_(src)` of a contiguous T-byte block (reads T, writes T);
- disk bandwidth: a cold sequential read of the target's shards; the write side shows in the copy;
- copy of the checkpoint: `cp -r` of the target directory, then fsync of every copied file (the rollback fsyncs
  too), target evicted from the page cache first;
- file rollback (`rollback_checkpoint`, in a subprocess for its peak RSS): target evicted first; the source either
  cold (evicted) or warm (the pages the rollback reads held resident with mmap + mlock by this process during the
  run, since the copy streams the whole checkpoint through the page cache); its copy / patch / sync phases
  (the patch runs behind the copy front, overlapping it);
- floor: file rollback <= copy + 1.2 x (time to read and write T): T at memory bandwidth (warm source) and at disk
  bandwidth (cold source);
- live rollback (`rollback_model_` on a state dict of the whole target in memory, source = the checkpoint directory):
  bytes read from the source as counted by the function, the source pages that actually came into the page cache
  (mincore, cold source), and GB/s of 3T (read source, read target, write target) against the copy of a T-byte
  block counted the same way; split by members that are rows (gate/up) and columns (down);
- the obvious way, in a subprocess: safetensors `load_file` of both checkpoints (`full`; or shard by shard,
  `per-shard`, when memory is short), `index_copy_` per tensor, `save_file` of every shard; time and peak RSS.

Nothing here asserts a time; it prints a table (and writes JSON with --json).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from lpt_kernels.analysis.apply import (_page_spans, rollback_checkpoint, rollback_model_,  # noqa: E402
                                        touched_elements)
from lpt_kernels.analysis.selection import Selection  # noqa: E402
from lpt_kernels.checkpoint import Checkpoint  # noqa: E402
from lpt_kernels.layout import detect_layout  # noqa: E402

GB = 1e9
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


# ---- page cache helpers -------------------------------------------------------------------------------------------

def files_of(d):
    out = []
    for root, _, names in os.walk(d):
        out += [os.path.join(root, n) for n in names]
    return sorted(out)


def evict(paths):
    """Drop these files' clean pages from the page cache (fsync first so dirty ones can go too)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(path):
    """Bytes of `path` in the page cache (mincore over a fresh shared mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * n)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(v & 1 for v in bytes(vec)) * mmap.PAGESIZE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def fsync_tree(d):
    for p in files_of(d):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for root, dirs, _ in os.walk(d):
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


# ---- the selection ----------------------------------------------------------------------------------------------

def make_selection(target, frac, seed):
    with Checkpoint(target) as c:
        lay = detect_layout({n: c.info(n).shape for n in c.names}, c.config, ("mlp",))
    n = lay.units["mlp"]
    k = max(1, round(frac * n))
    rng = random.Random(seed)
    units = {"mlp": {layer: sorted(rng.sample(range(n), k)) for layer in sorted(lay.groups["mlp"])}}
    return Selection(lay, units, meta={"selector": "random", "budget": frac, "seed": seed})


def plan_bytes(ckpt_dir, sel):
    """Touched bytes (rows members, column members) and the source page spans the rollback reads."""
    rows = cols = 0
    spans = {}
    with Checkpoint(ckpt_dir) as c:
        for name, axes in touched_elements(sel).items():
            i = c.info(name)
            isz = i.dtype.itemsize
            if 0 in axes:
                rows += axes[0].numel() * i.shape[1] * isz
            if 1 in axes:
                cols += axes[1].numel() * i.shape[0] * isz
            spans.setdefault(i.file, []).extend(_page_spans(i.start, i.shape, isz, axes))
    return rows, cols, spans


_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class Pinned:
    """Keeps exactly these page spans of the source resident (mmap + mlock) while a run goes on, so that a "warm
    source" stays warm although the copy streams the whole checkpoint through the page cache."""

    def __init__(self, spans):
        self.maps = []
        for f, ss in spans.items():
            size = os.path.getsize(f)
            fd = os.open(f, os.O_RDONLY)
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            os.close(fd)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap failed")
            self.maps.append((addr, size))
            for a, b in ss:
                if _libc.mlock(addr + a, b - a) != 0:
                    raise OSError(ctypes.get_errno(), "mlock failed (RLIMIT_MEMLOCK?)")

    def close(self):
        for addr, size in self.maps:
            _libc.munmap(addr, size)  # also unlocks
        self.maps = []


# ---- baselines -------------------------------------------------------------------------------------------------

def mem_copy_seconds(nbytes, reps=7):
    """Min time of a contiguous copy of nbytes (rotating over 3 buffer pairs so no pass finds them in cache)."""
    pairs = [(torch.empty(nbytes, dtype=torch.uint8).fill_(1), torch.empty(nbytes, dtype=torch.uint8).fill_(2))
             for _ in range(3)]
    best = float("inf")
    for r in range(reps):
        s, d = pairs[r % 3]
        t = time.perf_counter()
        d.copy_(s)
        best = min(best, time.perf_counter() - t)
    return best


def disk_read_gbs(files, limit=3 << 30):
    evict(files)
    t, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n < limit:
                b = fh.read(64 << 20)
                if not b:
                    break
                n += len(b)
        if n >= limit:
            break
    return n / GB / (time.perf_counter() - t)


def time_cp(target, dst):
    evict(files_of(target))
    t = time.perf_counter()
    subprocess.run(["cp", "-r", "--reflink=never", target, dst], check=True)
    t_cp = time.perf_counter() - t
    fsync_tree(dst)
    t_all = time.perf_counter() - t
    shutil.rmtree(dst)
    return t_cp, t_all


def run_worker(args):
    """Run one mode in a subprocess; returns (its JSON result, its peak RSS in bytes)."""
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(args)],
                         stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"worker {args['mode']} failed ({p.returncode}): {out[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), ru.ru_maxrss * 1024


def _rss_sampler(peak):
    """Background sampling of this process's resident memory: peak VmRSS and peak RssAnon (anonymous memory, what
    the obvious way's state dicts are; a file rollback's RSS is mostly mapped page cache, reclaimable)."""
    import threading

    def loop():
        while True:
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        k, _, v = line.partition(":")
                        if k in ("VmRSS", "RssAnon"):
                            peak[k] = max(peak.get(k, 0), int(v.split()[0]) * 1024)
            except OSError:
                return
            time.sleep(0.02)

    threading.Thread(target=loop, daemon=True).start()


def worker(args):
    mode = args["mode"]
    peak = {}
    _rss_sampler(peak)
    try:  # if memory runs out, this process is the one to go, not a neighbour's
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    sel = Selection.load(args["sel"])
    if mode == "file":
        st = rollback_checkpoint(args["target"], args["source"], sel, args["out"])
        st.pop("stale_removed", None)
        st["peak_anon"] = peak.get("RssAnon", 0)
        print(json.dumps(st))
        return
    from safetensors.torch import load_file, save_file
    t0 = time.perf_counter()
    touched = touched_elements(sel)
    os.makedirs(args["out"])
    for f in os.listdir(args["target"]):
        if not f.endswith(".safetensors"):
            shutil.copyfile(os.path.join(args["target"], f), os.path.join(args["out"], f))
    shards = sorted(f for f in os.listdir(args["target"]) if f.endswith(".safetensors"))

    def patch(t_sd, s_sd):
        for name, axes in touched.items():
            if name in t_sd:
                for axis, idx in axes.items():
                    t_sd[name].index_copy_(axis, idx, s_sd[name].index_select(axis, idx))

    if mode == "obvious-full":
        t_sd, s_sd, where = {}, {}, {}
        for f in shards:
            part = load_file(os.path.join(args["target"], f))
            where.update({n: f for n in part})
            t_sd.update(part)
            s_sd.update(load_file(os.path.join(args["source"], f)))
        patch(t_sd, s_sd)
        for f in shards:
            save_file({n: t for n, t in t_sd.items() if where[n] == f}, os.path.join(args["out"], f),
                      metadata={"format": "pt"})
    else:  # per shard
        for f in shards:
            t_sd = load_file(os.path.join(args["target"], f))
            s_sd = load_file(os.path.join(args["source"], f))
            patch(t_sd, s_sd)
            save_file(t_sd, os.path.join(args["out"], f), metadata={"format": "pt"})
            del t_sd, s_sd
    t_sv = time.perf_counter()
    fsync_tree(args["out"])
    print(json.dumps({"seconds": time.perf_counter() - t0, "sync_seconds": time.perf_counter() - t_sv,
                      "peak_anon": peak.get("RssAnon", 0)}))


def check_output(out, target, source, sel, n=4):
    """Spot check: a few touched tensors equal the source on the selection and the target elsewhere."""
    touched = touched_elements(sel)
    names = list(touched)[:: max(1, len(touched) // n)]
    with Checkpoint(out) as o, Checkpoint(target) as t, Checkpoint(source) as s:
        for name in names:
            m = torch.zeros(o.info(name).shape, dtype=torch.bool)
            for axis, idx in touched[name].items():
                if axis == 0:
                    m[idx] = True
                else:
                    m[:, idx] = True
            a, b, c = o.tensor(name), t.tensor(name), s.tensor(name)
            if not (torch.equal(a[m].view(torch.int16), c[m].view(torch.int16))
                    and torch.equal(a[~m].view(torch.int16), b[~m].view(torch.int16))):
                raise SystemExit(f"bench_rollback: output tensor {name} is wrong")
    return len(names)


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- main -------------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir", nargs="?")
    ap.add_argument("--target", default="code")
    ap.add_argument("--source", default="base")
    ap.add_argument("--frac", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", help="where outputs go (default DATA_DIR/_bench_out)")
    ap.add_argument("--obvious", choices=("auto", "full", "per-shard", "skip"), default="auto")
    ap.add_argument("--skip-file", action="store_true")
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads (the CPU kernels use torch.get_num_threads())")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        w = json.loads(a.worker)
        if w.get("threads"):
            torch.set_num_threads(w["threads"])
        return worker(w)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.data_dir:
        ap.error("DATA_DIR is required")
    target, source = os.path.join(a.data_dir, a.target), os.path.join(a.data_dir, a.source)
    work = a.work or os.path.join(a.data_dir, "_bench_out")
    os.makedirs(work, exist_ok=True)
    for e in os.listdir(work):
        shutil.rmtree(os.path.join(work, e), ignore_errors=True)
    sel = make_selection(target, a.frac, a.seed)
    sel_path = sel.save(os.path.join(work, "selection.json"))
    with Checkpoint(target) as c:
        ck_bytes = sum(os.path.getsize(f) for f in c.files)
        n_layers = sel.layout.num_layers
        tdtype = c.info(next(iter(touched_elements(sel)))).dtype
    t_rows, t_cols, src_spans = plan_bytes(source, sel)
    T = t_rows + t_cols
    span_bytes = sum(b - a_ for ss in src_spans.values() for a_, b in ss)
    tfiles, sfiles = files_of(target), files_of(source)
    res = {"layers": n_layers, "dtype": str(tdtype), "checkpoint_bytes": ck_bytes, "frac": a.frac,
           "units_per_layer": len(next(iter(sel.units["mlp"].values()))), "touched_bytes": T,
           "touched_rows_bytes": t_rows, "touched_cols_bytes": t_cols, "source_page_span_bytes": span_bytes,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "loadavg_start": os.getloadavg()[0]}
    print(f"{n_layers} layers, {tdtype}, checkpoint {ck_bytes / GB:.2f} GB; {a.frac:.0%} of MLP units "
          f"({res['units_per_layer']}/layer): touched T = {T / 1e6:.1f} MB (rows {t_rows / 1e6:.1f}, columns "
          f"{t_cols / 1e6:.1f}); source pages holding them: {span_bytes / 1e6:.0f} MB", flush=True)

    # bandwidths
    t_mem = mem_copy_seconds(T)
    res["mem_copy_gbs"] = 2 * T / GB / t_mem
    res["disk_read_gbs"] = disk_read_gbs(tfiles)
    print(f"memory copy of a {T / 1e6:.0f} MB block: {t_mem * 1e3:.1f} ms ({res['mem_copy_gbs']:.1f} GB/s read+write);"
          f" cold disk read {res['disk_read_gbs']:.2f} GB/s", flush=True)

    if not a.skip_file:
        cps, runs = [], {"cold": [], "warm": []}
        for r in range(a.reps):
            cps.append(time_cp(target, os.path.join(work, "cp")))
            print(f"  cp -r: {cps[-1][0]:.1f} s, + fsync: {cps[-1][1]:.1f} s", flush=True)
            for kind, acc in runs.items():
                evict(tfiles)
                evict(sfiles)
                pin = Pinned(src_spans) if kind != "cold" else None
                out = os.path.join(work, f"out-{kind}")
                try:
                    st, rss = run_worker({"mode": "file", "target": target, "source": source, "sel": sel_path,
                                          "out": out, "threads": a.threads})
                finally:
                    if pin is not None:
                        pin.close()
                st["peak_rss"] = rss
                if r == 0 and kind == "cold":
                    st["checked_tensors"] = check_output(out, target, source, sel)
                shutil.rmtree(out)
                acc.append(st)
                print(f"  file rollback, source {kind}: {st['seconds']:.1f} s (copy {st['copy_seconds']:.1f}, "
                      f"patch {st['patch_seconds']:.2f}, sync {st['sync_seconds']:.1f}), peak RSS "
                      f"{rss / GB:.2f} GB (anonymous {st['peak_anon'] / GB:.2f})", flush=True)
        res["cp_seconds"] = min(c[0] for c in cps)
        res["cp_fsync_seconds"] = min(c[1] for c in cps)
        for kind, acc in runs.items():
            res[f"file_{kind}"] = min(acc, key=lambda s: s["seconds"])
            res[f"file_{kind}_all"] = [s["seconds"] for s in acc]
        res["cp_fsync_all"] = [c[1] for c in cps]
        res["touched_rw_mem_seconds"] = t_mem
        copy_gbs = ck_bytes / GB / res["cp_fsync_seconds"]  # the disk's read+write throughput as cp sees it
        res["touched_rw_disk_seconds"] = T / GB / res["disk_read_gbs"] + T / GB / copy_gbs

    mode = a.obvious
    if mode == "auto":
        mode = "full" if mem_available() > 2.4 * ck_bytes else "per-shard"
    if mode != "skip":
        evict(tfiles)
        evict(sfiles)
        out = os.path.join(work, "obvious")
        st, rss = run_worker({"mode": f"obvious-{mode}", "target": target, "source": source, "sel": sel_path,
                              "out": out, "threads": a.threads})
        check_output(out, target, source, sel)
        shutil.rmtree(out)
        res["obvious"] = dict(st, mode=mode, peak_rss=rss)
        print(f"  obvious way ({mode}): {st['seconds']:.1f} s, peak RSS {rss / GB:.2f} GB (anonymous "
              f"{st['peak_anon'] / GB:.2f})", flush=True)

    if not a.skip_live:
        from safetensors.torch import load_file

        state = {}
        for f in tfiles:
            if f.endswith(".safetensors"):
                # clone: load_file's tensors may be backed by a private mapping of the file (copy-on-write page
                # faults on the first write); a model's parameters live in ordinary memory
                state.update({k: v.clone() for k, v in load_file(f).items()})
        touched = touched_elements(sel)
        live = {}
        evict(sfiles)
        st = rollback_model_(state, source, sel)  # cold source
        live["cold"] = st
        live["cold_resident_bytes"] = sum(resident(f) for f in sfiles if f.endswith(".safetensors"))
        warm = [rollback_model_(state, source, sel) for _ in range(3)]
        live["warm"] = min(warm, key=lambda s: s["seconds"])
        # rows and columns separately (warm); then from a source Checkpoint kept open, whose pages are already
        # mapped by an earlier call (a sweep's later points): the page faults of a fresh mapping drop out
        with Checkpoint(source) as open_src:
            for kind, ax in (("rows", 0), ("cols", 1), ("all", None)):
                names = [n for n, axes in touched.items() if ax is None or ax in axes]
                part = {n: state[n] for n in names}
                s_ax = sel if ax is None else _only_axis(sel, ax)
                for src, key in ((source, f"warm_{kind}_seconds"), (open_src, f"mapped_{kind}_seconds")):
                    if src is open_src:
                        rollback_model_(part, src, s_ax)  # maps the pages
                    best = float("inf")
                    for _ in range(3):
                        t = time.perf_counter()
                        rollback_model_(part, src, s_ax)
                        best = min(best, time.perf_counter() - t)
                    live[key] = best
        # the eager peer: index_select from the same mapped source, index_copy_ into the state dict
        best = float("inf")
        for _ in range(3):
            with Checkpoint(source) as sc:
                t = time.perf_counter()
                for name, axes in touched.items():
                    for axis, idx in axes.items():
                        state[name].index_copy_(axis, idx, sc.tensor(name).index_select(axis, idx))
                best = min(best, time.perf_counter() - t)
        live["eager_seconds"] = best
        live["copy_seconds"] = mem_copy_seconds(T)
        live["copy_rows_seconds"] = mem_copy_seconds(t_rows)
        live["copy_cols_seconds"] = mem_copy_seconds(t_cols)
        res["live"] = live
        del state

    res["loadavg_end"] = os.getloadavg()[0]
    report(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


def _only_axis(sel, axis):
    """The selection restricted to its members along one axis (gate/up rows, or down columns)."""
    from lpt_kernels.layout import Layout

    groups = {g: {layer: [m for m in ms if m.axis == axis] for layer, ms in layers.items()}
              for g, layers in sel.layout.groups.items()}
    lay = Layout(name=sel.layout.name, groups=groups, units=dict(sel.layout.units), num_layers=sel.layout.num_layers)
    return Selection(lay, sel.units)


def report(r):
    T = r["touched_bytes"]
    print()
    print(f"## Rollback of {r['frac']:.0%} of MLP units, {r['layers']} layers, {r['dtype']}, checkpoint "
          f"{r['checkpoint_bytes'] / GB:.2f} GB, touched T = {T / 1e6:.1f} MB ({r['threads']} threads)")
    print()
    print(f"- memory copy bandwidth (T-byte block): {r['mem_copy_gbs']:.1f} GB/s (read + write); cold disk read "
          f"{r['disk_read_gbs']:.2f} GB/s; load average {r['loadavg_start']:.1f} at the start, "
          f"{r['loadavg_end']:.1f} at the end ({r['cpus']} CPUs)")
    if "file_cold" in r:  # noqa: SIM102
        cp, cpf = r["cp_seconds"], r["cp_fsync_seconds"]
        print()
        print("| file rollback | seconds | copy | patch (overlaps copy) | fsync+rename | "
              "budget: cp+fsync + 1.2 x T r/w | within | peak RSS GB (anonymous) |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| cp -r (no fsync) | {cp:.1f} | | | | | | |")
        print(f"| cp -r + fsync | {cpf:.1f} | | | | | | |")
        labels = {"warm": "source warm, fresh process", "cold": "source cold, fresh process"}
        for kind, tt in (("warm", r["touched_rw_mem_seconds"]), ("cold", r["touched_rw_disk_seconds"])):
            s = r[f"file_{kind}"]
            budget = cpf + 1.2 * tt
            print(f"| rollback_checkpoint, {labels[kind]} | {s['seconds']:.1f} | {s['copy_seconds']:.1f} | "
                  f"{s['patch_seconds']:.2f} | {s['sync_seconds']:.1f} | {budget:.1f} (T r/w {tt:.2f} s at "
                  f"{'memory' if kind != 'cold' else 'disk'} bw) | {'yes' if s['seconds'] <= budget else 'NO'} | "
                  f"{s['peak_rss'] / GB:.2f} ({s['peak_anon'] / GB:.2f}) |")
        print()
        print("all runs (s): cp+fsync " + ", ".join(f"{x:.1f}" for x in r["cp_fsync_all"]) + "; " + "; ".join(
            f"{k} " + ", ".join(f"{x:.1f}" for x in r[f"file_{k}_all"]) for k in labels))
        if "obvious" in r:
            o = r["obvious"]
            print(f"| obvious way ({o['mode']}: load_file x2, index_copy_, save_file) | {o['seconds']:.1f} | | | "
                  f"{o['sync_seconds']:.1f} | | | {o['peak_rss'] / GB:.2f} ({o['peak_anon'] / GB:.2f}) |")
    elif "obvious" in r:
        o = r["obvious"]
        print(f"- obvious way ({o['mode']}): {o['seconds']:.1f} s, peak RSS {o['peak_rss'] / GB:.2f} GB")
    if "live" in r:
        lv = r["live"]
        print()
        print("| live rollback | seconds | bytes read (counted) / T | GB/s of 3T | copy GB/s (3 x block) | ratio |")
        print("|---|---|---|---|---|---|")
        c = lv["copy_seconds"]
        for kind in ("warm", "cold"):
            s = lv[kind]
            print(f"| all members, source {kind} | {s['seconds']:.3f} | {s['bytes_read'] / T:.2f} | "
                  f"{3 * T / GB / s['seconds']:.2f} | {3 * T / GB / c:.2f} | {c / s['seconds']:.0%} |")
        s = lv["eager_seconds"]
        print(f"| peer: torch index_select + index_copy_ per tensor, source warm | {s:.3f} | 1.00 | "
              f"{3 * T / GB / s:.2f} | {3 * T / GB / c:.2f} | {c / s:.0%} |")
        for kind, tb, ck in (("rows", r["touched_rows_bytes"], lv["copy_rows_seconds"]),
                             ("cols", r["touched_cols_bytes"], lv["copy_cols_seconds"]),
                             ("all", T, c)):
            label = {"rows": "gate/up rows only", "cols": "down_proj columns only", "all": "all members"}[kind]
            for pre, how in (("warm", "source warm"), ("mapped", "source open and mapped (a sweep's later points)")):
                if kind == "all" and pre == "warm":
                    continue  # the first row of the table
                s = lv[f"{pre}_{kind}_seconds"]
                print(f"| {label}, {how} | {s:.3f} | 1.00 | {3 * tb / GB / s:.2f} | {3 * tb / GB / ck:.2f} | "
                      f"{ck / s:.0%} |")
        print()
        print(f"- cold source: the function read {lv['cold']['bytes_read'] / 1e6:.1f} MB (counted, "
              f"{lv['cold']['bytes_read'] / T:.2f} T); the source pages in the page cache afterwards: "
              f"{lv['cold_resident_bytes'] / 1e6:.0f} MB ({lv['cold_resident_bytes'] / T:.1f} T; page spans holding "
              f"touched elements: {r['source_page_span_bytes'] / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
