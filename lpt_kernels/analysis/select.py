"""The A x M x C conflict selector: which units of a later domain L to roll back to protect an earlier domain E.

Scores per unit (``[layers, units]`` per group), for checkpoints theta_E (before L) and theta_L (after L):

- **A** (activation): how strongly E's data drives the unit — ``mean_abs`` (default), ``rms`` or ``freq`` of an
  :class:`~lpt_kernels.hooks.ActivationResult` collected on E's data;
- **M** (magnitude): ``||theta_L - theta_E||`` over the unit's slices, from a :class:`Profile` whose deltas include L;
- **C** (conflict), two definitions:
  ``update`` — opposition of E's own update and L's update on the unit, ``max(0, -cos(delta_E, delta_L))`` from the
  profile's Gram (the profile must hold both deltas, e.g. ``diff([before_E, theta_E, theta_L])``);
  ``gradient`` — first-order damage ``max(0, g_E . delta_L)`` per unit, from E's loss gradient at theta_L
  (:func:`gradient_conflict`).

A selector is any product of the factors (``AMC``, ``AM``, ``AC``, ``MC``, ``A``, ``M``, ``C``) or ``random``.
The budget ``beta`` is a fraction of the units of the chosen group that exist (one group), or of their parameters
(several groups: a unit costs the elements of its slices, 3 x hidden for an MLP neuron, 2 x head_dim x hidden for a
head), counted over the layers where each group exists (an MoE expert group lives in the MoE layers only). Layers get
their share in proportion to their conflict mass (``allocation="conflict"``, the paper's conflict-weighted budget),
uniformly (``"uniform"``), or in proportion to their activation mass (``"activation"``); each group's mass is
normalised to 1 over its own layers and the groups' masses summed. Shares are capped at what a layer can give (its
eligible units: score > 0) and rounded once, by largest remainders (:func:`allocate`). Within a layer the top units
by score are taken (ties: the lower unit id); ``random`` draws them with a seeded generator under the same rule.

Joint groups: scores are made comparable by their percentile rank among the eligible units of their own group (ties
share the lower rank; ``norm="zscore"`` uses the z-score of log score instead); within a layer units are taken in
that order whenever they fit in what is left of the layer's share, and what the layers could not spend goes to the
best units left anywhere that fit, so the spent budget falls short of the target by less than one unit.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from lpt_kernels.analysis.profile import Profile
from lpt_kernels.analysis.selection import Selection

SELECTORS = ("AMC", "AM", "AC", "MC", "A", "M", "C", "random")
ALLOCATIONS = ("conflict", "uniform", "activation")


class SelectError(ValueError):
    """Bad selector arguments (one-line message)."""


@dataclass
class Scores:
    """Per-unit factors of one (earlier, later) pair: group -> [layers, units] float64 tensors."""

    A: Dict[str, torch.Tensor]
    M: Dict[str, torch.Tensor]
    C: Dict[str, torch.Tensor]
    unit_params: Dict[str, int]  # elements per unit of each group (its cost in a parameter budget)
    meta: dict
    layout: Optional[object] = None  # the profile's Layout (what select() uses when given none)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{g} {list(t.shape)}" for g, t in self.M.items())
        return f"Scores(earlier={self.meta.get('earlier')!r}, later={self.meta.get('later')!r}, {shapes})"

    def score(self, selector: str, group: str) -> torch.Tensor:
        """The product of the selector's factors ([layers, units]); ``random`` has no score."""
        if selector not in SELECTORS or selector == "random":
            raise SelectError(f"selector: expected one of {', '.join(SELECTORS[:-1])}, got {selector!r}")
        s = torch.ones_like(self.M[group])
        for f in selector:
            s = s * getattr(self, f)[group]
        return s


def conflict_scores(profile: Profile, earlier: str, later: str, activations=None, groups: Sequence[str] = ("mlp",),
                    conflict: str = "update", gradient: Optional[Dict[str, torch.Tensor]] = None,
                    act_stat: str = "mean_abs", act_name: Optional[str] = None) -> Scores:
    """Build the A, M, C factors.

    Args:
        profile: a Profile whose deltas include ``later`` (M, and ``update`` conflict needs ``earlier`` too).
        earlier, later: delta names in the profile (e.g. ``"math"``, ``"qa"``).
        activations: an ActivationResult on E's data (``act_name`` picks the run if it holds several); None makes
            A = 1 (selectors without A only).
        conflict: ``"update"`` or ``"gradient"`` (then ``gradient`` = group -> [layers, units] of g_E . delta_L, see
            :func:`gradient_conflict`).
    """
    if conflict not in ("update", "gradient"):
        raise SelectError(f"conflict: expected 'update' or 'gradient', got {conflict!r}")
    A, M, C, cost = {}, {}, {}, {}
    layout = profile.layout
    for g in groups:
        M[g] = profile.norm(later, g)
        if conflict == "update":
            C[g] = (-profile.cosine(earlier, later, g)).clamp_min(0.0)
        else:
            if gradient is None or g not in gradient:
                raise SelectError(f"gradient: conflict='gradient' needs g_E . delta_L for group {g!r}")
            C[g] = gradient[g].double().clamp_min(0.0)
        if activations is not None:
            a = activations.stat(g, act_stat, act_name).double()
            if a.shape != M[g].shape:
                raise SelectError(f"activations: {g} has shape {tuple(a.shape)}, the profile {tuple(M[g].shape)}")
            A[g] = a
        else:
            A[g] = torch.ones_like(M[g])
        cost[g] = _unit_params(profile, g, layout)
    meta = {"earlier": earlier, "later": later, "conflict": conflict, "activation_stat": act_stat if activations is
            not None else None, "profile": profile.meta.get("checkpoints"), "groups": list(groups)}
    return Scores(A=A, M=M, C=C, unit_params=cost, meta=meta, layout=layout)


def _unit_params(profile: Profile, group: str, layout) -> int:
    """Elements per unit: the profile's per-tensor element counts of one layer's members divided by the units."""
    layer = sorted(layout.groups[group])[0]
    total = sum(profile.tensors[m.tensor]["elements"] for m in layout.groups[group][layer])
    return total // layout.units[group] if layout.units[group] else 0


def gradient_conflict(grads: Dict[str, torch.Tensor], theta_e, theta_l, layout, groups: Sequence[str] = ("mlp",)):
    """Per-unit first-order damage ``g_E . (theta_L - theta_E)`` ([layers, units] per group), from E's loss
    gradient at theta_L (``grads``: tensor name -> gradient) and the two checkpoints (Checkpoint objects or state
    dicts). Each member tensor is one indexed-free ``unit_gram`` call in ``given`` mode on (g, delta)."""
    from lpt_kernels import unit_gram

    def get(src, name):
        return src.tensor(name) if hasattr(src, "tensor") else src[name]

    out = {}
    for g in groups:
        acc = torch.zeros(layout.num_layers, layout.units[g], dtype=torch.float64)
        for layer, members in layout.groups[g].items():
            for m in members:
                if m.tensor not in grads:
                    raise SelectError(f"gradient: no gradient for {m.tensor}")
                delta = get(theta_l, m.tensor).float() - get(theta_e, m.tensor).float()
                if delta.numel() == 0:  # a zero-size dimension: no element, no damage
                    continue
                r = unit_gram([grads[m.tensor].detach().float().cpu(), delta], axis=m.axis, block=m.block,
                              mode="given")
                acc[layer] += r.gram[:, 0, 1].double()
        out[g] = acc
    return out


def budget_target(beta: float, total: int) -> int:
    """beta x total, rounded half up (``floor(beta * total + 0.5)``, after rounding away float noise at 1e-9)."""
    return int(math.floor(round(beta * total, 9) + 0.5))


def _water_fill(mass: torch.Tensor, total: float, cap: torch.Tensor) -> torch.Tensor:
    """Real shares of ``total`` in proportion to ``mass`` over the layers with ``mass > 0`` and room, each capped at
    ``cap``; what a capped layer cannot take goes to the others in the same proportions. Returns float64 [L]."""
    x = torch.zeros(cap.shape, dtype=torch.float64)
    cap = cap.double()
    active = (cap > 0) & (mass > 0)
    rem = float(total)
    while rem > 1e-9 and bool(active.any()):
        m = torch.where(active, mass, 0.0)
        share = rem * m / m.sum()
        room = cap - x
        over = active & (share >= room)
        if not bool(over.any()):
            x += share
            break
        rem -= float(room[over].sum())
        x[over] = cap[over]
        active &= ~over
    return x


def allocate(mass: torch.Tensor, total: int, cap: torch.Tensor) -> torch.Tensor:
    """Split ``total`` (an int) over layers: in proportion to ``mass``, each layer capped at ``cap`` (int64 [L]).

    The rule (docs/select.md): real shares are computed first, capped layers handing their excess to the others in
    proportion to their mass (water filling); layers with zero mass get a share only once every layer with mass is
    full (then in proportion to their capacity); the real shares are rounded once, by largest remainders (floor
    each, then one more unit to the layers with the largest fractional parts, the lower layer first on a tie;
    fractional parts compared at 1e-9).
    Returns int64 [L] summing to ``min(total, cap.sum())``."""
    mass = torch.nan_to_num(mass.double(), nan=0.0).clamp_min(0.0)
    cap = cap.to(torch.int64).clamp_min(0)
    total = min(int(total), int(cap.sum()))
    x = _water_fill(mass, total, cap)
    rest = total - float(x.sum())
    if rest > 1e-9:  # every layer with mass is full: the zero-mass layers, by capacity
        x += _water_fill(torch.where(mass > 0, 0.0, cap.double()), rest, cap - x.round().long())
    base = torch.minimum(x.floor().long(), cap)
    left = total - int(base.sum())
    if left > 0:
        frac = (x - base.double()).clamp_min(0.0)
        frac[base >= cap] = -1.0
        # fractional parts compared at 1e-9, so that float noise does not break a tie (equal shares round alike)
        order = sorted(range(len(cap)), key=lambda i: (-round(float(frac[i]), 9), i))
        for i in order[:left]:
            base[i] += 1
    return base


def _rank01(x: torch.Tensor) -> torch.Tensor:
    """Percentile rank in (0, 1] of each value among all of ``x`` (1-D): the count of values below it plus one,
    over the count; tied values share the lower rank."""
    if x.numel() == 0:
        return x.double()
    srt = torch.sort(x.double()).values
    return (torch.searchsorted(srt, x.double(), right=False) + 1).double() / x.numel()


def _zscore(x: torch.Tensor) -> torch.Tensor:
    v = torch.log(x.double().clamp_min(1e-300))
    if v.numel() < 2:
        return torch.zeros_like(v)
    return (v - v.mean()) / v.std().clamp_min(1e-12)


def _group_layers(layout, g: str, n_layers: int) -> List[int]:
    layers = sorted(layout.groups[g])
    if layers and layers[-1] >= n_layers:
        raise SelectError(f"groups: group {g!r} has layer {layers[-1]} in the layout but the scores have "
                          f"{n_layers} layers")
    return layers


def select(scores: Scores, layout=None, selector: str = "AMC", budget: float = 0.02,
           groups: Optional[Sequence[str]] = None, allocation: str = "conflict", norm: str = "rank",
           seed: int = 0) -> Selection:
    """Choose the units to roll back (docs/select.md has the rules in full).

    Args:
        scores: from :func:`conflict_scores`.
        layout: the profile's layout (``profile.layout``); None takes the one ``scores`` carries.
        selector: a product of A, M, C (``"AMC"``, ``"MC"``, ...) or ``"random"``.
        budget: beta in (0, 1]: the share of the units of the chosen groups (one group), or of their parameters
            (several groups), counted over the layers where each group exists.
        groups: the groups to choose from (default: those of ``scores``).
        allocation: per-layer shares by ``"conflict"`` mass, ``"uniform"``, or ``"activation"`` mass.
        norm: how joint groups' scores are made comparable: ``"rank"`` (percentile) or ``"zscore"`` (of log score).
        seed: of the ``random`` selector.

    Only *eligible* units are chosen: score > 0 (for ``random``: a unit that moved, M > 0); a unit whose score is 0
    would spend budget and change nothing. The selection's ``meta`` records ``budget`` (asked), ``budget_unit``,
    ``budget_total`` (units or parameters of the chosen groups), ``budget_target`` (beta x total, rounded half up),
    ``budget_spent`` (<= target; less only when the eligible units run out, or for joint groups by less than the
    cost of the cheapest eligible unit left out) and ``budget_spent_fraction``. Raises :class:`SelectError`.
    """
    if layout is None:
        layout = scores.layout
        if layout is None:
            raise SelectError("layout: these scores carry no layout; pass profile.layout")
    groups = list(groups or scores.M)
    if not groups:
        raise SelectError("groups: no group to choose from")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise SelectError(f"budget: must be in (0, 1], got {budget!r}")
    if selector not in SELECTORS:
        raise SelectError(f"selector: expected one of {', '.join(SELECTORS)}, got {selector!r}")
    if allocation not in ALLOCATIONS:
        raise SelectError(f"allocation: expected one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if norm not in ("rank", "zscore"):
        raise SelectError(f"norm: expected 'rank' or 'zscore', got {norm!r}")
    for g in groups:
        if g not in scores.M:
            raise SelectError(f"groups: no scores for group {g!r} (scores have {', '.join(scores.M)})")
        if g not in layout.groups:
            raise SelectError(f"groups: group {g!r} is not in the layout (it has {', '.join(layout.groups)})")
    n_layers = scores.M[groups[0]].shape[0]
    gen = torch.Generator().manual_seed(seed)
    joint = len(groups) > 1
    cost = {g: (int(scores.unit_params[g]) if joint else 1) for g in groups}
    layers = {g: _group_layers(layout, g, n_layers) for g in groups}
    exists = {g: torch.zeros(n_layers, dtype=torch.bool) for g in groups}
    for g in groups:
        exists[g][layers[g]] = True

    # per-unit scores and eligibility (rows of layers where a group does not exist are never eligible)
    score, eligible = {}, {}
    for g in groups:
        if selector == "random":
            s = torch.rand(scores.M[g].shape, generator=gen, dtype=torch.float64)
            ok = scores.M[g].double() > 0
        else:
            s = torch.nan_to_num(scores.score(selector, g).double(), nan=0.0, posinf=0.0, neginf=0.0)
            ok = s > 0
        eligible[g] = ok & exists[g][:, None]
        score[g] = s

    # layer masses: each group's mass over its own layers, normalised to 1 (uniform if it has none), summed
    mass = torch.zeros(n_layers, dtype=torch.float64)
    for g in groups:
        src = scores.C[g] if allocation == "conflict" else scores.A[g] if allocation == "activation" else None
        m = (torch.ones(n_layers, dtype=torch.float64) if src is None else
             torch.nan_to_num(src.double(), nan=0.0).clamp_min(0).sum(1))
        m = torch.where(exists[g], m, 0.0)
        if float(m.sum()) <= 0:
            m = exists[g].double()
        if float(m.sum()) > 0:
            mass += m / m.sum()

    total = sum(cost[g] * scores.M[g].shape[1] * len(layers[g]) for g in groups)
    target = budget_target(float(budget), total)
    cap = torch.zeros(n_layers, dtype=torch.int64)
    for g in groups:
        cap += cost[g] * eligible[g].sum(1)
    alloc = allocate(mass, target, cap)

    units: Dict[str, Dict[int, list]] = {g: {} for g in groups}
    spent = 0
    if not joint:
        g = groups[0]
        for layer in range(n_layers):
            k = int(alloc[layer])
            if k:
                ids = torch.nonzero(eligible[g][layer]).flatten()
                order = torch.sort(-score[g][layer, ids], stable=True).indices  # ties: lower unit id first
                units[g][layer] = ids[order[:k]].tolist()
                spent += k
    else:
        keyed = {}
        for g in groups:
            ok = eligible[g]
            vals = score[g][ok]
            if selector != "random":
                vals = _rank01(vals) if norm == "rank" else _zscore(vals)
            keyed[g] = torch.zeros_like(score[g]).masked_scatter_(ok, vals)
        left_over = []
        for layer in range(n_layers):
            cand = sorted(((-float(keyed[g][layer, u]), gi, int(u), g) for gi, g in enumerate(groups)
                           for u in torch.nonzero(eligible[g][layer]).flatten().tolist()))
            left = int(alloc[layer])
            for key, gi, u, g in cand:
                if cost[g] <= left:  # take every unit that fits, in rank order, until the share is spent
                    units[g].setdefault(layer, []).append(u)
                    left -= cost[g]
                else:
                    left_over.append((key, layer, gi, u, g))
            spent += int(alloc[layer]) - left
        # what the layers could not spend (a unit larger than the rest of a share) goes to the best units left
        left = target - spent
        for key, layer, gi, u, g in sorted(left_over):
            if cost[g] <= left:
                units[g].setdefault(layer, []).append(u)
                left -= cost[g]
                spent += cost[g]
    if spent == 0:  # an empty selection rolls nothing back: say why rather than let a sweep measure nothing
        unit = "parameters" if joint else "units"
        why = (f"budget {budget:g} of {total} {unit} rounds to 0" if target == 0 else
               f"no unit of {', '.join(groups)} is eligible (every {selector} score is 0)" if not any(
                   bool(eligible[g].any()) for g in groups) else
               f"the cheapest eligible unit costs more than the target of {target} {unit[:-1] if target == 1 else unit}")
        warnings.warn(f"lpt select: nothing selected: {why}", RuntimeWarning, stacklevel=2)
    meta = dict(scores.meta, selector=selector, budget=budget, allocation=allocation, norm=norm, seed=seed,
                groups=list(groups), budget_unit="parameters" if joint else "units", budget_total=total,
                budget_target=target, budget_spent=spent, budget_spent_fraction=spent / total if total else 0.0,
                eligible={g: int(eligible[g].sum()) for g in groups})
    return Selection(layout=layout, units={g: u for g, u in units.items() if u}, meta=meta)


def recovery(score_before: float, score_damaged: float, score_rolled: float) -> float:
    """Share of the earlier domain's lost score that the intervention brings back:
    (rolled - damaged) / (before - damaged); NaN when nothing was lost (before - damaged <= 0: the earlier domain
    scored as well or better after the later one, higher being better), since there is nothing to recover."""
    lost = score_before - score_damaged
    return (score_rolled - score_damaged) / lost if lost > 0 else float("nan")
