#!/usr/bin/env python
"""A plain PyTorch training loop with the live update tracker and, afterwards, a refresh watched by the refresh monitor.

    python examples/train_loop.py [--out DIR] [--steps 20] [--every 5] [--snapshot cpu|device|disk:PATH] [--plot]

A tiny Qwen3 (built from a config: no download) is trained on three "domains" one after the other — here each domain
is next-token prediction on its own range of token ids, so that each moves its own rows and routes, as the paper's
domains do — in bfloat16 with AdamW (tiny bf16 updates round to zero: the update sparsity the paper measures). The
tracker measures every ``--every`` optimizer steps; the metrics go to a CSV (and a PNG of the curves with --plot).
Then the earlier domain ("math") is refreshed for a few steps while the RefreshMonitor reports the displacement from
math's checkpoint on the conflict units chosen by the selector, on the rest, and from the other checkpoints.
Runs in seconds on a CPU.
"""
from __future__ import annotations

import argparse
import csv
import os

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lpt_kernels.analysis.select import conflict_scores, select
from lpt_kernels.layout import layout_from_spec
from lpt_kernels.train import DeltaTracker, RefreshMonitor

DOMAINS = ("code", "math", "qa")


def batches(domain_index: int, gen: torch.Generator):
    lo = 8 + 36 * domain_index
    while True:
        ids = torch.randint(lo, lo + 36, (4, 16), generator=gen)
        yield {"input_ids": ids, "labels": ids}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="train_loop_out", help="output directory (metrics.csv, profile/, curves.png)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per domain")
    ap.add_argument("--every", type=int, default=5, help="measure every N optimizer steps")
    ap.add_argument("--snapshot", default="cpu", help="cpu, device or disk:PATH")
    ap.add_argument("--plot", action="store_true", help="also draw the curves (curves.png)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    tracker = DeltaTracker(model, groups=("mlp", "attn"), snapshot=a.snapshot, every=a.every)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, domain in enumerate(DOMAINS):
        tracker.start_domain(domain)
        data = batches(i, gen)
        for step in range(a.steps):
            loss = model(**next(data)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            metrics = tracker.step()                 # {} except on every --every-th step
            if metrics:
                rows.append({"domain": domain, "step": step + 1, "global_step": i * a.steps + step + 1,
                             "loss": loss.item(), **metrics})
                print(f"{domain:>5} step {step + 1:>3}  loss {loss.item():.3f}  "
                      f"sparsity {metrics[f'lpt/{domain}/sparsity']:.1%}  "
                      f"update norm {metrics[f'lpt/{domain}/update_norm']:.4f}"
                      + "".join(f"  J(top10, {e}) {metrics[f'lpt/{domain}/mlp/top10_jaccard/{e}']:.2f}"
                                f"  cos({e}) {metrics[f'lpt/{domain}/mlp/shared_cosine/{e}']:+.2f}"
                                for e in DOMAINS[:i]))

    profile = tracker.profile()                      # the Profile `lpt diff` gives on saved checkpoints
    profile.save(os.path.join(a.out, "profile"))     # -> lpt overlap / lpt report read it
    print("whole-model update sparsity:", {d: f"{s:.1%}" for d, s in profile.sparsity().items()})

    # Refresh of math after qa: which units does qa's displacement damage math on? (no activations: the M x C
    # selector), then a few steps of math again, watched on those units and off them.
    layout = layout_from_spec(profile.meta["layout"], list(profile.tensors), None)
    selection = select(conflict_scores(profile, "math", "qa"), layout, "MC", budget=0.05)
    math_ckpt = tracker.snapshot("math")             # the parameters when math ended (a mapping name -> tensor)
    monitor = RefreshMonitor(model, math_ckpt, selection, others={"code": tracker.snapshot("code")})
    data = batches(DOMAINS.index("math"), gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # a fresh optimizer for the refresh
    for step in range(max(4, a.steps // 4)):
        loss = model(**next(data)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m = monitor.step()
        rows.append({"domain": "refresh-math", "step": step + 1, "loss": loss.item(), **m})
        print(f"refresh step {step + 1}: |theta - theta_math| on {selection.count()} conflict units "
              f"{m['lpt/refresh/math/selected_norm']:.4f}, elsewhere {m['lpt/refresh/math/rest_norm']:.4f}; "
              f"from code {m['lpt/refresh/code/norm']:.4f}")

    first = ("domain", "step", "global_step", "loss")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in first, first.index(k) if k in first else 0, k))
    with open(os.path.join(a.out, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    if a.plot:
        plot(rows, os.path.join(a.out, "curves.png"))
    tracker.close()
    monitor.close()
    return 0


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    colors = dict(zip(DOMAINS, ("tab:blue", "tab:orange", "tab:green")))
    for ax, (title, pick) in zip(axes, (
            ("update sparsity (exact zeros)", lambda r, d: r.get(f"lpt/{d}/sparsity")),
            ("update norm", lambda r, d: r.get(f"lpt/{d}/update_norm")),
            ("Jaccard of top-10% MLP neurons with code", lambda r, d: r.get(f"lpt/{d}/mlp/top10_jaccard/code")),
            ("cosine on shared top neurons with code", lambda r, d: r.get(f"lpt/{d}/mlp/shared_cosine/code")))):
        for d in DOMAINS:
            pts = [(r["global_step"], pick(r, d)) for r in rows if r["domain"] == d and pick(r, d) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=d, color=colors[d])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
