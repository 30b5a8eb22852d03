"""The paper's two recoveries of the damaged Math score, with the package's public API only.

- :func:`rollback_sweeps` — the training-free rollback of QA's displacement toward the Math checkpoint
  (earlier = math, later = qa): ``conflict_scores`` -> ``select`` -> live ``rollback_model_`` -> evaluate -> undo
  (the loop of ``lpt_kernels.analysis.sweep.sweep``, with one evaluation of the damaged model for all cells). Selectors A x M x C, its ablations
  (AM, MC, AC), the activation-only layer budget, and ``random`` over several seeds; MLP neurons alone and MLP +
  attention heads jointly; budgets beta from 1% to 32%.
- the Re-Math refresh (GRPO on Math from the CW checkpoint, every domain evaluated every few steps) lives in
  :mod:`lpt_kernels.demo.run`, beside the other training stages.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

BUDGETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
ABLATIONS = ("AMC", "MC", "AM", "AC")


def plan(random_seeds: int) -> List[dict]:
    """The sweep's points as (selector, allocation, groups, seed) cells; each is run at every budget.

    ``selector`` is the name shown in tables: ``AMC``, ``MC``, ``AM``, ``AC``, ``AMC/act-budget`` (A x M x C scores
    with the per-layer budget from activation mass alone) or ``random``."""
    cells = [dict(selector=s, score=s, allocation="conflict", groups=("mlp",), seed=None) for s in ABLATIONS]
    cells.append(dict(selector="AMC/act-budget", score="AMC", allocation="activation", groups=("mlp",), seed=None))
    cells += [dict(selector="random", score="random", allocation="conflict", groups=("mlp",), seed=s)
              for s in range(random_seeds)]
    cells.append(dict(selector="AMC", score="AMC", allocation="conflict", groups=("mlp", "attn"), seed=None))
    cells += [dict(selector="random", score="random", allocation="conflict", groups=("mlp", "attn"), seed=s)
              for s in range(random_seeds)]
    return cells


def rollback_sweeps(model, math_ckpt: str, profile, activations, evaluate: Callable, before: Dict[str, float],
                    budgets: Sequence[float] = BUDGETS, random_seeds: int = 3, progress=None) -> dict:
    """Every cell of :func:`plan` at every budget on the live damaged model (theta_qa), restored after each point.

    This is what ``lpt_kernels.analysis.sweep.sweep`` does for one (groups, allocation, seed), written out so the
    damaged model is evaluated once for all cells: ``select`` -> ``rollback_model_`` from the Math checkpoint (only
    the selected rows and columns are read) -> evaluate -> ``rollback_model_`` from a snapshot of the damaged
    weights (an exact undo).

    Returns ``{"damaged": scores at theta_qa, "rows": [...]}`` with one row per point: selector, groups, budget,
    allocation, seed, units, scores (every domain, percent), recovery (fraction of Math's loss brought back) and
    collateral (every other domain's change in points)."""
    from lpt_kernels.analysis.apply import rollback_model_
    from lpt_kernels.analysis.select import conflict_scores, recovery, select
    from lpt_kernels.checkpoint import Checkpoint
    from lpt_kernels.layout import layout_from_spec

    layout = layout_from_spec(profile.meta["layout"], list(profile.tensors), None)
    scores = {g: conflict_scores(profile, "math", "qa", activations=activations, groups=g, act_name="math")
              for g in (("mlp",), ("mlp", "attn"))}
    damaged = evaluate(model)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    with Checkpoint(math_ckpt) as source:  # mapped once for every point
        for cell in plan(random_seeds):
            for beta in budgets:
                sel = select(scores[cell["groups"]], layout, cell["score"], beta, cell["groups"], cell["allocation"],
                             seed=cell["seed"] or 0)
                rollback_model_(model, source, sel)
                try:
                    sc = evaluate(model)
                finally:
                    rollback_model_(model, snapshot, sel)
                rows.append({"selector": cell["selector"], "groups": ",".join(cell["groups"]), "budget": beta,
                             "allocation": cell["allocation"], "seed": cell["seed"], "units": sel.count(),
                             "scores": sc, "recovery": recovery(before["math"], damaged["math"], sc["math"]),
                             "collateral": {d: sc[d] - damaged[d] for d in sc if d != "math"}})
            if progress is not None:
                progress.update(1)
    return {"damaged": damaged, "rows": rows}


def conflict_selection(profile, activations, budget: float = 0.02):
    """The A x M x C selection of QA's displacement at ``budget`` of the MLP neurons (the conflict units)."""
    from lpt_kernels.analysis.select import conflict_scores, select
    from lpt_kernels.layout import layout_from_spec

    layout = layout_from_spec(profile.meta["layout"], list(profile.tensors), None)
    sc = conflict_scores(profile, "math", "qa", activations=activations, groups=("mlp",), act_name="math")
    return select(sc, layout, "AMC", budget, ("mlp",), "conflict")


def budget_profiles(profile, activations, budget: float = 0.02) -> Dict[str, List[int]]:
    """Per-layer unit counts of the A x M x C selection at ``budget`` under the conflict-weighted and the
    activation-only layer budgets (what the paper's per-layer budget figure shows)."""
    from lpt_kernels.analysis.select import conflict_scores, select
    from lpt_kernels.layout import layout_from_spec

    layout = layout_from_spec(profile.meta["layout"], list(profile.tensors), None)
    sc = conflict_scores(profile, "math", "qa", activations=activations, groups=("mlp",), act_name="math")
    return {alloc: select(sc, layout, "AMC", budget, ("mlp",), alloc).per_layer("mlp")
            for alloc in ("conflict", "activation", "uniform")}


def aggregate(rows: List[dict], selector: str, groups: str, budget: float) -> Optional[dict]:
    """Mean, min and max recovery (and mean scores) over the rows of one (selector, groups, budget) cell."""
    pick = [r for r in rows if r["selector"] == selector and r["groups"] == groups and r["budget"] == budget]
    if not pick:
        return None
    rec = [r["recovery"] for r in pick if r["recovery"] is not None and not math.isnan(r["recovery"])]
    doms = pick[0]["scores"].keys()
    if not rec:  # nothing was lost: recovery is undefined
        rec_mean = rec_min = rec_max = None
    else:
        rec_mean, rec_min, rec_max = sum(rec) / len(rec), min(rec), max(rec)
    return {"n": len(pick), "recovery": rec_mean, "min": rec_min, "max": rec_max,
            "scores": {d: sum(r["scores"][d] for r in pick) / len(pick) for d in doms},
            "collateral": {d: sum(r["collateral"][d] for r in pick) / len(pick) for d in pick[0]["collateral"]}}
