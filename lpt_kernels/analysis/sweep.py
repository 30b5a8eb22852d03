"""Recovery sweeps: roll back a later domain's displacement at several budgets and selectors, evaluate, undo.

``recovery = (score_rolled - score_damaged) / (score_before - score_damaged)`` for the earlier domain E, and the
collateral change ``score_rolled - score_damaged`` on every other domain, for any evaluator callable
``evaluate(model) -> {domain: score}`` (higher is better: accuracies, or negative losses). The evaluator contract
(what the model is, what to return) is in docs/sweep.md.
"""
from __future__ import annotations

import csv
import math
import numbers
import os
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lpt_kernels.analysis.select import Scores, recovery, select
from lpt_kernels.checkpoint import Checkpoint
from lpt_kernels.checkpoint.writer import AtomicDir


class SweepError(ValueError):
    """A sweep that cannot run: bad scores from the evaluator, a missing domain (one-line message)."""


def _name(fn) -> str:
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{mod}:{qual}" if mod and qual else repr(fn)


def check_scores(scores, where: str, earlier: Optional[str] = None) -> Dict[str, float]:
    """``{domain: score}`` with str keys and real-number values (a Python number, a numpy scalar or a 0-d tensor),
    holding ``earlier``; returns it with float values. Raises :class:`SweepError` naming `where`."""
    if not isinstance(scores, Mapping):
        raise SweepError(f"{where} returned a {type(scores).__name__}; expected a dict {{domain: score}}, e.g. "
                         f"{{'math': 0.61, 'qa': 0.55}}")
    out = {}
    for k, v in scores.items():
        if not isinstance(k, str):
            raise SweepError(f"{where}: domain names must be strings, got {k!r}")
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise SweepError(f"{where}: the score of {k!r} is a {type(v).__name__}; expected a number")
        out[k] = float(v)
    if earlier is not None and earlier not in out:
        raise SweepError(f"{where}: no score for the earlier domain {earlier!r} (got {', '.join(out) or 'none'})")
    return out


def call_evaluator(evaluate: Callable, model: torch.nn.Module, earlier: str, name: Optional[str] = None) -> dict:
    """Run the evaluator under ``torch.no_grad()`` and check what it returns (see :func:`check_scores`). An
    exception inside it becomes a :class:`SweepError` naming it (the original is chained)."""
    name = name or _name(evaluate)
    try:
        with torch.no_grad():
            res = evaluate(model)
    except SweepError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's code: one line naming it, the cause chained
        raise SweepError(f"evaluator {name} raised {type(e).__name__}: {e}") from e
    return check_scores(res, f"evaluator {name}", earlier)


def sweep(model: torch.nn.Module, source, scores: Scores, layout, evaluate: Callable[[torch.nn.Module], Dict[str, float]],
          earlier: str, before: Dict[str, float], budgets: Sequence[float] = (0.01, 0.02, 0.04),
          selectors: Sequence[str] = ("AMC", "MC", "random"), groups: Optional[Sequence[str]] = None,
          allocation: str = "conflict", seed: int = 0, out_dir: Optional[str] = None,
          progress: bool = False, *, force: bool = False, evaluator_name: Optional[str] = None) -> List[dict]:
    """Dose-response of the rollback intervention on a live model (theta_L, damaged).

    Args:
        model: the damaged model (after the later domain), on the device and in the dtype to evaluate in, in eval
            mode; it is restored exactly after every point.
        source: theta_E (a checkpoint directory, Checkpoint or state dict) — what is rolled back to.
        scores: A, M, C factors (:func:`~lpt_kernels.analysis.select.conflict_scores`).
        evaluate: ``model -> {domain: score}`` (higher is better), called under ``torch.no_grad()``; ``earlier``
            names E among its keys. See docs/sweep.md.
        before: E's (and the others') scores at theta_E, the reference for recovery.
        out_dir: if given, writes ``sweep.csv`` (the points and the ``before`` / ``damaged`` baselines) and
            ``dose_response.png`` there, atomically; an existing non-empty directory is refused before anything runs
            unless ``force``.
    Returns one row per (selector, budget): selector, budget, units, recovery, and ``score/<domain>`` and
    ``collateral/<domain>`` for every domain.
    """
    from lpt_kernels.analysis.apply import rollback_model_

    writer = AtomicDir(out_dir, force=force) if out_dir else None
    name = evaluator_name or _name(evaluate)
    before = check_scores(before, "before", earlier)
    damaged = call_evaluator(evaluate, model, earlier, name)
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
                res = call_evaluator(evaluate, model, earlier, name)
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
    if writer is not None:
        with writer as tmp:
            _write_files(rows, tmp, earlier, before, damaged)
    return rows


def _baseline_rows(earlier: str, before: Dict[str, float], damaged: Dict[str, float]) -> List[dict]:
    out = []
    for kind, sc in (("before", before), ("damaged", damaged)):
        row = {"selector": kind, "budget": "", "units": "", "recovery": 1.0 if kind == "before" else 0.0}
        for d in sorted(sc):
            row[f"score/{d}"] = sc[d]
            row[f"collateral/{d}"] = sc[d] - damaged.get(d, float("nan"))
        out.append(row)
    return out


def write_sweep(rows: List[dict], out_dir: str, earlier: str = "", *, before: Optional[Dict[str, float]] = None,
                damaged: Optional[Dict[str, float]] = None, force: bool = False) -> Dict[str, str]:
    """``sweep.csv`` and ``dose_response.png`` in `out_dir` (refused if it exists and is not empty, unless
    ``force``).

    The CSV has one row per (selector, budget) and, with `before` and `damaged`, two baseline rows first (selector
    ``before``: the scores at theta_E; ``damaged``: at theta_L; their budget and units are empty). Columns:
    ``selector, budget, units, recovery, score/<domain>, collateral/<domain>``. The picture: recovery of E
    against the budget (log scale, labelled in percent), and the collateral change of every other domain."""
    with AtomicDir(out_dir, force=force) as tmp:
        _write_files(rows, tmp, earlier, before, damaged)
    return {"csv": os.path.join(out_dir, "sweep.csv"), "png": os.path.join(out_dir, "dose_response.png")}


def _write_files(rows, out_dir, earlier, before, damaged) -> None:
    all_rows = (_baseline_rows(earlier, before, damaged) if before is not None and damaged is not None else []) + rows
    keys = list(dict.fromkeys(k for r in all_rows for k in r))
    path = os.path.join(out_dir, "sweep.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(all_rows)
    plot_dose_response(rows, os.path.join(out_dir, "dose_response.png"), earlier)


def _percent(x: float) -> str:
    p = x * 100
    return f"{p:.0f}%" if abs(p - round(p)) < 1e-9 else f"{p:.3g}%"


def plot_dose_response(rows: List[dict], path: str, earlier: str = "") -> str:
    """Recovery of `earlier` against the budget (one line per selector) and, in a panel each, the collateral change
    (rolled - damaged) of every other domain, with the same colour per selector."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    selectors = list(dict.fromkeys(r["selector"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    others = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("collateral/")} - {earlier})
    panels = [None] + others[:5]
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 3.6 * nrows), squeeze=False)
    colors = {s: f"C{i}" for i, s in enumerate(selectors)}

    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        d = panels[k]
        for s in selectors:
            key = "recovery" if d is None else f"collateral/{d}"
            pts = sorted((r["budget"], r.get(key, math.nan)) for r in rows if r["selector"] == s)
            scale = 100 if d is None else 1
            ax.plot([p[0] * 100 for p in pts], [p[1] * scale for p in pts], marker="o", ms=4, color=colors[s],
                    label=s)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator([b * 100 for b in budgets]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_percent(b) for b in budgets])
        ax.set_xlabel("budget (share of the groups' units rolled back)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        if d is None:
            ax.set_ylabel(f"recovery of {earlier} (% of lost score)" if earlier else "recovery (% of lost score)")
            ax.set_title(f"Recovery of {earlier}" if earlier else "Recovery")
            ax.legend(fontsize=8, title="selector", title_fontsize=8)
        else:
            ax.set_ylabel("score change vs. damaged")
            ax.set_title(f"Collateral change of {d}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
