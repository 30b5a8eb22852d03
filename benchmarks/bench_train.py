#!/usr/bin/env python
"""Cost of lpt_kernels.train.DeltaTracker inside a training loop, against the machine's read ceiling and against an
obvious Python tracker.

    python benchmarks/bench_train.py [--layers 4] [--reps 7] [--threads 2] [--snapshots cpu,disk] [--quick]
                                     [--loop-rounds 5] [--loop-steps 20] [--no-step] [--no-loop] [--csv out.csv]

Part 1, step() on a tracked step (issue floor: <= 1.3x reading the live parameters and the snapshot once at the read
ceiling). A Qwen3 with Qwen3-4B's layer shapes (hidden 2560, intermediate 9728, 32 query and 8 KV heads of 128), a
few layers (``--layers``), a 32k vocabulary, bf16: about 0.9 GB of parameters at 4 layers, ~9x the L3 and more. The
live parameters differ from each snapshot by a sparse small update. Cases: the first domain (the pass reads the live
parameters and the domain's start snapshot), and later domains (it also reads one earlier snapshot per compared
domain: 3 and 4 copies), with snapshots in host RAM (``cpu``) and, for the first domain, in safetensors files read
through the page cache (``disk``, warm). Interleaved round by round with ``step()``, with the same threads:

- ceiling: ``lpt_kernels._C_cpu.stream_read`` over exactly the buffers the step reads (the live parameters and the
  snapshots in the pass); ``step / ceiling`` is the number to compare with the floor's 1.3 (for the first domain those
  buffers are the live parameters and the snapshot); for later domains, ``step / ceiling(live + snapshot)`` is also
  given: the cost of the cross-domain cosines over the floor's reference;
- py-tracker: the obvious Python tracker of the same statistics, per parameter ``d = p.float() - s.float()``, per-unit
  ``d*d`` sums and zero counts with torch ops, then the same top-10% / Jaccard / shared-cosine arithmetic.

Part 2, the slowdown of a training loop with ``every=10`` (issue floor: <= 3%). The demo's model (Qwen3, 4 layers,
hidden 128, intermediate 384, 4 heads and 2 KV heads of 32, vocabulary 64, fp32) trained with AdamW on batches of
256 sequences of 12 tokens (the demo's 32 prompts x 8 samples; forward, backward, step: the demo's decoding, which
makes its real steps longer, is left out, so the overhead shown is an upper bound). Variants, interleaved round by
round (``--loop-rounds`` rounds of ``--loop-steps`` optimizer steps each): no tracker; ours (``DeltaTracker(every=10)``,
``step()`` after each optimizer step); the py-tracker every 10 steps. Reported, as medians over rounds: the overhead
(wall time spent inside the tracker's ``step()`` calls over the training time of the same run: the steadiest
estimate on a shared machine), and the end-to-end ratios of wall and process CPU time to the no-tracker run of the
same round (noisier: other processes' load moves them by more than the tracker costs).

Memory bandwidth and the cores of a shared machine are noisy: the script prints the load average and the ratios are
measured against runs interleaved with them.
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import GB, load_note, machine_facts  # noqa: E402

from lpt_kernels.analysis.profile import _top_mask  # noqa: E402
from lpt_kernels.train import DeltaTracker  # noqa: E402


# ---- models ------------------------------------------------------------------------------------------------------

def big_model(layers: int, vocab: int, seed: int = 0):
    """A Qwen3 with Qwen3-4B's layer shapes in bf16, initialised in place (no fp32 copy)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=vocab, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    return model


def sparse_update_(model, gen: torch.Generator, frac: float = 0.3, scale: float = 2e-3) -> None:
    """Move a random `frac` of every weight's rows by a small amount (an RL-like update; many bf16 deltas round to 0)."""
    with torch.no_grad():
        for p in model.parameters():
            rows = p.shape[0]
            for r0 in range(0, rows, 1024):
                blk = p[r0:r0 + 1024]
                keep = (torch.rand(blk.shape[0], generator=gen) < frac).to(torch.float32)
                noise = torch.randn(blk.shape, generator=gen).mul_(scale)
                noise.mul_(keep.view(-1, *([1] * (blk.dim() - 1))))
                blk.copy_((blk.float() + noise).to(blk.dtype))


def demo_model(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                      max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    return Qwen3ForCausalLM(cfg)


# ---- the obvious Python tracker ----------------------------------------------------------------------------------

class PyTracker:
    """Snapshot + torch ops per parameter: the same first metrics as DeltaTracker (sparsity, update norm, per-unit
    norms of each group, top-10% Jaccard and shared cosine against earlier per-unit summaries)."""

    def __init__(self, model, layout, groups=("mlp", "attn"), every=1, top=0.10):
        self.params = [(n, p) for n, p in model.named_parameters()]
        self.layout, self.groups, self.every, self.top = layout, groups, every, top
        self.members = {n: [(g, layer, m) for g, layer, m in layout.member_of(n) if g in groups]
                        for n, _ in self.params}
        self.snaps: List[Dict[str, torch.Tensor]] = []
        self.earlier: List[dict] = []
        self.steps = 0

    def start_domain(self, name):
        self.snaps.append({n: p.detach().clone() for n, p in self.params})
        self.steps = 0

    def step(self):
        self.steps += 1
        if self.steps % self.every:
            return {}
        with torch.no_grad():
            snap = self.snaps[-1]
            cur = {g: torch.zeros(self.layout.num_layers, self.layout.units[g], dtype=torch.float64)
                   for g in self.groups}
            dots = [{g: torch.zeros_like(cur[g]) for g in self.groups} for _ in self.earlier]
            zeros, sq, n = 0, 0.0, 0
            for name, p in self.params:
                d = p.detach().float() - snap[name].float()
                zeros += int((d == 0).sum())
                sq += float((d * d).sum())
                n += d.numel()
                for g, layer, m in self.members[name]:
                    dd = d if m.axis == 0 else d.t()
                    cur[g][layer] += (dd * dd).sum(1).view(-1, m.block).sum(1).double()
                    for j, e in enumerate(self.earlier):
                        prev = (self.snaps[j + 1][name].float() - self.snaps[j][name].float())
                        pp = prev if m.axis == 0 else prev.t()
                        dots[j][g][layer] += (dd * pp).sum(1).view(-1, m.block).sum(1).double()
            out = {"sparsity": zeros / n, "update_norm": sq ** 0.5}
            for g in self.groups:
                mine = _top_mask(cur[g].sqrt(), self.top, False)
                for j, e in enumerate(self.earlier):
                    theirs = e[g]
                    inter, union = (mine & theirs["top"]).sum(), (mine | theirs["top"]).sum()
                    out[f"{g}/jaccard/{j}"] = float(inter) / max(1, int(union))
                    m = (mine & theirs["top"]).double()
                    den = ((theirs["sq"] * m).sum(1) * (cur[g] * m).sum(1)).sqrt()
                    pooled = torch.where(den > 0, (dots[j][g] * m).sum(1) / den.clamp_min(1e-300), float("nan"))
                    out[f"{g}/cos/{j}"] = float(pooled.nanmean())
            return out

    def end_domain_summary(self):
        """Per-unit norms of the finished domain (what its later Jaccards need)."""
        out = {}
        for g in self.groups:
            sq = torch.zeros(self.layout.num_layers, self.layout.units[g], dtype=torch.float64)
            for name, _ in self.params:
                d = None
                for gg, layer, m in self.members[name]:
                    if gg != g:
                        continue
                    if d is None:
                        d = self.snaps[-1][name].float() - self.snaps[-2][name].float()
                    dd = d if m.axis == 0 else d.t()
                    sq[layer] += (dd * dd).sum(1).view(-1, m.block).sum(1).double()
            out[g] = {"sq": sq, "top": _top_mask(sq.sqrt(), self.top, False)}
        self.earlier.append(out)


# ---- part 1: step() against the ceiling ---------------------------------------------------------------------------

def _stream_read(tensors, threads):
    from lpt_kernels import _C_cpu as C

    C.stream_read([t.data_ptr() for t in tensors], [t.numel() * t.element_size() for t in tensors], threads)


def _median_time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def step_section(a, rows):
    print(f"\n== step() on a tracked step: Qwen3-4B layer shapes, {a.layers} layers, bf16 ==")
    t0 = time.perf_counter()
    model = big_model(a.layers, a.vocab)
    nbytes = DeltaTracker.snapshot_bytes(model)
    print(f"model: {nbytes / GB:.2f} GB of parameters ({sum(1 for _ in model.parameters())} tensors), built in "
          f"{time.perf_counter() - t0:.0f} s; {load_note()}")
    gen = torch.Generator().manual_seed(1)
    params = [p.detach() for p in model.parameters()]
    tmp = tempfile.mkdtemp(prefix="lpt-bench-train-")
    for snap in a.snapshots:
        spec = f"disk:{tmp}/{len(rows)}" if snap == "disk" else snap
        max_domains = 1 if snap == "disk" else 3
        tracker = DeltaTracker(model, groups=("mlp", "attn"), snapshot=spec)
        py = None
        if snap == "cpu" and not a.no_py:
            from lpt_kernels.train._model import model_layout, model_params
            py = PyTracker(model, model_layout(model, model_params(model), None, ("mlp", "attn")))
        for k, domain in enumerate(("code", "math", "qa")[:max_domains]):
            tracker.start_domain(domain)
            if py is not None:
                py.start_domain(domain)
                if k:
                    py.end_domain_summary()
            sparse_update_(model, gen)
            chain = [[as_2d(s.tensor2d(n)) for n in (t.name for t in tracker._tensors)] for s in tracker._chain]
            read = [t for c in chain for t in c] + params       # what the pass reads (k+2 copies)
            floor_read = chain[-1] + params                      # the live parameters and the domain's start
            tracker.step()                                       # warm up (first call allocates)
            times = {"ours": [], "ceiling": [], "ceiling_floor": [], "py": []}
            for _ in range(a.reps):
                times["ours"].append(_median_time(tracker.step, 1))
                times["ceiling"].append(_median_time(lambda: _stream_read(read, a.threads), 1))
                if k:
                    times["ceiling_floor"].append(_median_time(lambda: _stream_read(floor_read, a.threads), 1))
            if py is not None and k == 0:  # (later domains: minutes a call; the first is enough to compare)
                for _ in range(max(1, a.reps // 3)):
                    times["py"].append(_median_time(py.step, 1))
            med = {key: statistics.median(v) if v else float("nan") for key, v in times.items()}
            b = sum(t.numel() * t.element_size() for t in read)
            row = dict(part="step", snapshot=snap, domain=domain, copies=k + 2, bytes=b, ours_ms=med["ours"] * 1e3,
                       ours_gbs=b / med["ours"] / GB, ceiling_gbs=b / med["ceiling"] / GB,
                       ratio=med["ours"] / med["ceiling"],
                       ratio_floor=med["ours"] / (med["ceiling_floor"] if k else med["ceiling"]),
                       py_ms=med["py"] * 1e3, speedup_vs_py=med["py"] / med["ours"], load=load_note())
            rows.append(row)
            print(f"{snap:>5} {domain:>5}: reads {k + 2} copies ({b / GB:.2f} GB): step {row['ours_ms']:8.1f} ms = "
                  f"{row['ours_gbs']:5.1f} GB/s | ceiling {row['ceiling_gbs']:5.1f} GB/s | step/ceiling "
                  f"{row['ratio']:.2f} | step/ceiling(live+snapshot) {row['ratio_floor']:.2f}"
                  + (f" | py-tracker {row['py_ms']:8.1f} ms ({row['speedup_vs_py']:.1f}x ours)"
                     if py is not None and times["py"] else "") + f" | {row['load']}")
            sys.stdout.flush()
        tracker.close()
        del py
        gc.collect()


def as_2d(t):
    return t if t.dim() == 2 else t.reshape(1, -1)


# ---- part 2: the training loop with every=10 ----------------------------------------------------------------------

def loop_section(a, rows):
    print(f"\n== training-loop slowdown, every=10: the demo's model, AdamW, batch 256 x 12 tokens ==")
    model = demo_model()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    tracker = DeltaTracker(model, every=10)
    from lpt_kernels.train._model import model_layout, model_params
    py = PyTracker(model, model_layout(model, model_params(model), None, ("mlp", "attn")), every=10)
    tracker.start_domain("code")
    py.start_domain("code")

    def train_step():
        ids = torch.randint(0, 64, (256, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(variant, n):
        """(wall, process CPU, wall inside the tracker's step()) of n optimizer steps."""
        inside = 0.0
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            train_step()
            if variant != "none":
                t = time.perf_counter()
                (tracker if variant == "ours" else py).step()
                inside += time.perf_counter() - t
        return time.perf_counter() - w0, time.process_time() - c0, inside

    for v in ("none", "ours", "py"):  # warm up
        run(v, 10)
    ratios = {v: {"wall": [], "cpu": [], "inside": []} for v in ("ours", "py")}
    base_wall = []
    for r in range(a.loop_rounds):
        res = {v: run(v, a.loop_steps) for v in ("none", "ours", "py")}
        base_wall.append(res["none"][0] / a.loop_steps)
        for v in ("ours", "py"):
            wall, cpu, inside = res[v]
            ratios[v]["wall"].append(wall / res["none"][0] - 1)
            ratios[v]["cpu"].append(cpu / res["none"][1] - 1)
            ratios[v]["inside"].append(inside / (wall - inside))  # the tracker's share, within the same run
    step_ms = statistics.median(base_wall) * 1e3
    t_step = []
    for _ in range(5):  # the tracked step alone
        tracker._steps = tracker.every - 1
        t_step.append(_median_time(tracker.step, 1))
    print(f"training step without tracker: {step_ms:.1f} ms (median); one tracked step() alone: "
          f"{statistics.median(t_step) * 1e3:.2f} ms; {load_note()}")
    for v, label in (("ours", "DeltaTracker(every=10)"), ("py", "py-tracker every 10")):
        med = {k: statistics.median(x) for k, x in ratios[v].items()}
        rows.append(dict(part="loop", variant=label, step_ms=step_ms, tracked_step_ms=statistics.median(t_step) * 1e3,
                         overhead=med["inside"], wall_overhead=med["wall"], cpu_overhead=med["cpu"], load=load_note()))
        print(f"{label:>24}: overhead {100 * med['inside']:6.2f}% (time inside step() / training time of the same "
              f"run) | end to end: wall {100 * med['wall']:+6.2f}%, cpu {100 * med['cpu']:+6.2f}% (per round: "
              + ", ".join(f"{100 * x:+.1f}" for x in ratios[v]["wall"]) + ")")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="DeltaTracker cost against the read ceiling and a Python tracker")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--snapshots", default="cpu,disk", help="comma-separated: cpu, device, disk")
    ap.add_argument("--loop-rounds", type=int, default=5)
    ap.add_argument("--loop-steps", type=int, default=20)
    ap.add_argument("--no-step", action="store_true", help="skip part 1")
    ap.add_argument("--no-loop", action="store_true", help="skip part 2")
    ap.add_argument("--no-py", action="store_true", help="skip the Python tracker in part 1")
    ap.add_argument("--quick", action="store_true", help="1 layer, 3 reps, 3 loop rounds of 10 steps")
    ap.add_argument("--csv", metavar="FILE")
    a = ap.parse_args(argv)
    a.snapshots = [s.strip() for s in a.snapshots.split(",") if s.strip()]
    if a.quick:
        a.layers, a.reps, a.loop_rounds, a.loop_steps = 1, 3, 3, 10
    torch.set_num_threads(a.threads)
    machine_facts(a.threads)
    rows: List[dict] = []
    if not a.no_step:
        step_section(a, rows)
    if not a.no_loop:
        loop_section(a, rows)
    if torch.cuda.is_available():
        print("\n(GPU: not measured by this script yet; the tracker runs on CUDA models with snapshot='device' or "
              "'cpu')")
    else:
        print("\nGPU section skipped: no CUDA device on this machine")
    if a.csv:
        keys = sorted({k for r in rows for k in r})
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
