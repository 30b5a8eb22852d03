"""Recovery sweeps: roll back a later domain's displacement at several budgets and selectors, evaluate, undo.

``recovery = (score_rolled - score_damaged) / (score_before - score_damaged)`` for the earlier domain E, and the
collateral change ``score_rolled - score_damaged`` on every other domain, for any evaluator callable
``evaluate(model) -> {domain: score}`` (higher is better: accuracies, or negative losses).
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lpt_kernels.analysis.select import Scores, recovery, select
from lpt_kernels.checkpoint import Checkpoint


def sweep(model: torch.nn.Module, source, scores: Scores, layout, evaluate: Callable[[torch.nn.Module], Dict[str, float]],
          earlier: str, before: Dict[str, float], budgets: Sequence[float] = (0.01, 0.02, 0.04),
          selectors: Sequence[str] = ("AMC", "MC", "random"), groups: Optional[Sequence[str]] = None,
          allocation: str = "conflict", seed: int = 0, out_dir: Optional[str] = None,
          progress: bool = False) -> List[dict]:
    """Dose-response of the rollback intervention on a live model (theta_L, damaged).

    Args:
        model: the damaged model (after the later domain); it is restored exactly after every point.
        source: theta_E (a checkpoint directory, Checkpoint or state dict) — what is rolled back to.
        scores: A, M, C factors (:func:`~lpt_kernels.analysis.select.conflict_scores`).
        evaluate: ``model -> {domain: score}``; ``earlier`` names E among its keys.
        before: E's (and the others') scores at theta_E, the reference for recovery.
        out_dir: if given, writes ``sweep.csv`` and ``dose_response.png`` there.
    Returns one row per (selector, budget): selector, budget, units, recovery, and ``score/<domain>`` and
    ``collateral/<domain>`` for every domain.
    """
    from lpt_kernels.analysis.apply import rollback_model_

    if earlier not in before:
        raise ValueError(f"before: no score for the earlier domain {earlier!r}")
    damaged = evaluate(model)
    if earlier not in damaged:
        raise ValueError(f"evaluate: returned no score for the earlier domain {earlier!r}")
    # Exact undo: keep the damaged values of every tensor a selection may touch (the groups' members) on the CPU.
    params = dict(model.named_parameters())
    names = {m.tensor for g in (groups or scores.M) for ms in layout.groups[g].values() for m in ms}
    snapshot = {n: params[n].detach().to("cpu", copy=True) for n in names if n in params}
    rows = []
    todo = [(s, b) for s in selectors for b in budgets]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="lpt sweep", leave=False)
    # A checkpoint directory is opened (mapped) once for all points, not once per point.
    own = Checkpoint(source) if isinstance(source, (str, os.PathLike)) else None
    try:
        for sel_name, beta in todo:
            selection = select(scores, layout, sel_name, beta, groups, allocation, seed=seed)
            rollback_model_(model, own or source, selection)
            try:
                res = evaluate(model)
            finally:
                rollback_model_(model, snapshot, selection)
            row = {"selector": sel_name, "budget": beta, "units": selection.count(),
                   "recovery": recovery(before[earlier], damaged[earlier], res[earlier])}
            for d in sorted(res):
                row[f"score/{d}"] = res[d]
                row[f"collateral/{d}"] = res[d] - damaged.get(d, float("nan"))
            rows.append(row)
            if bar is not None:
                bar.update(1)
    finally:
        if own is not None:
            own.close()
        if bar is not None:
            bar.close()
    if out_dir:
        write_sweep(rows, out_dir, earlier)
    return rows


def write_sweep(rows: List[dict], out_dir: str, earlier: str = "") -> Dict[str, str]:
    """``sweep.csv`` and ``dose_response.png`` (recovery against budget, one line per selector)."""
    os.makedirs(out_dir, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    path = os.path.join(out_dir, "sweep.csv")
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in dict.fromkeys(r["selector"] for r in rows):
        pts = sorted((r["budget"], r["recovery"]) for r in rows if r["selector"] == s)
        ax.plot([p[0] * 100 for p in pts], [p[1] * 100 for p in pts], marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (% of units)")
    ax.set_ylabel(f"recovery of {earlier} (%)" if earlier else "recovery (%)")
    ax.set_title("Rollback dose-response")
    ax.axhline(0, color="grey", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(out_dir, "dose_response.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {"csv": path, "png": png}
