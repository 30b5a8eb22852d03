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
The budget ``beta`` is a fraction of the units of the chosen groups. Layers get their share of it in proportion to
their conflict mass (``allocation="conflict"``, the paper's conflict-weighted budget), uniformly (``"uniform"``), or
in proportion to their activation mass (``"activation"``); within a layer the top units by score are taken (``random``
draws them with a seeded generator under the same allocation).

Joint groups (e.g. ``("mlp", "attn")``): scores are made comparable by their rank within their own group (a
percentile in (0, 1]; ``norm="zscore"`` uses the z-score of log score instead) and the budget is counted in
parameters (a unit costs the elements of its slices: 3 x hidden for an MLP neuron, 2 x head_dim x hidden for a head),
so beta = 2% means 2% of the parameters of the chosen groups. Layer masses are summed over groups after dividing
each group's mass by its total, so no group dominates by scale alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

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
        layout = profile.meta["layout"]
        cost[g] = _unit_params(profile, g, layout)
    meta = {"earlier": earlier, "later": later, "conflict": conflict, "activation_stat": act_stat if activations is
            not None else None, "profile": profile.meta.get("checkpoints"), "groups": list(groups)}
    return Scores(A=A, M=M, C=C, unit_params=cost, meta=meta)


def _unit_params(profile: Profile, group: str, layout_spec: dict) -> int:
    """Elements per unit: the profile's per-tensor element counts of one layer's members divided by the units."""
    from lpt_kernels.layout import layout_from_spec

    names = list(profile.tensors)
    lay = layout_from_spec(layout_spec, names, None)
    layer = sorted(lay.groups[group])[0]
    total = sum(profile.tensors[m.tensor]["elements"] for m in lay.groups[group][layer])
    return total // lay.units[group]


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
                r = unit_gram([grads[m.tensor].detach().float().cpu(), delta], axis=m.axis, block=m.block,
                              mode="given")
                acc[layer] += r.gram[:, 0, 1].double()
        out[g] = acc
    return out


def _allocate(mass: torch.Tensor, total: int, capacity: torch.Tensor) -> torch.Tensor:
    """Split ``total`` units over layers in proportion to ``mass`` (largest remainders), capped by ``capacity``;
    what a full layer cannot take goes to the others in the same proportions."""
    alloc = torch.zeros_like(capacity)
    mass = mass.double().clamp_min(0.0)
    remaining = int(total)
    open_ = capacity > 0
    while remaining > 0 and open_.any():
        m = torch.where(open_, mass, 0.0)
        if m.sum() <= 0:
            m = open_.double()
        share = m / m.sum() * remaining
        base = share.floor().long()
        rem = remaining - int(base.sum())
        if rem > 0:
            order = torch.argsort(share - base.double(), descending=True)
            base[order[:rem]] += 1
        add = torch.minimum(base, capacity - alloc)
        alloc += add
        remaining -= int(add.sum())
        open_ = alloc < capacity
        if int(add.sum()) == 0:
            break
    return alloc


def _rank01(x: torch.Tensor) -> torch.Tensor:
    """Percentile rank in (0, 1] (ties share the lower rank)."""
    flat = x.reshape(-1)
    order = torch.argsort(flat, stable=True)
    r = torch.empty_like(flat, dtype=torch.float64)
    r[order] = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    return (r / flat.numel()).reshape(x.shape)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    v = torch.log(x.double().clamp_min(1e-300))
    return (v - v.mean()) / v.std().clamp_min(1e-12)


def select(scores: Scores, layout, selector: str = "AMC", budget: float = 0.02, groups: Optional[Sequence[str]] = None,
           allocation: str = "conflict", norm: str = "rank", seed: int = 0) -> Selection:
    """Choose the units to roll back: a :class:`Selection` of about ``budget`` of the chosen groups' units (or of
    their parameters, for several groups) with the per-layer allocation and selector described in the module doc."""
    groups = list(groups or scores.M)
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
            raise SelectError(f"groups: no scores for group {g!r}")
        if g not in layout.groups:
            raise SelectError(f"groups: group {g!r} is not in the layout")
    gen = torch.Generator().manual_seed(seed)
    n_layers = scores.M[groups[0]].shape[0]
    # Layer masses (each group's normalised to sum 1, then summed over groups).
    mass = torch.zeros(n_layers, dtype=torch.float64)
    for g in groups:
        src = scores.C[g] if allocation == "conflict" else scores.A[g] if allocation == "activation" else None
        m = torch.ones(n_layers, dtype=torch.float64) if src is None else src.double().clamp_min(0).sum(1)
        mass += m / m.sum() if m.sum() > 0 else torch.ones(n_layers, dtype=torch.float64) / n_layers
    units: Dict[str, Dict[int, list]] = {g: {} for g in groups}
    if len(groups) == 1:
        g = groups[0]
        cap = torch.full((n_layers,), scores.M[g].shape[1], dtype=torch.long)
        total = int(round(budget * cap.sum().item()))
        alloc = _allocate(mass, total, cap)
        score = None if selector == "random" else scores.score(selector, g)
        for layer in range(n_layers):
            k = int(alloc[layer])
            if k == 0:
                continue
            if score is None:
                ids = torch.randperm(cap[layer].item(), generator=gen)[:k]
            else:
                ids = torch.topk(torch.nan_to_num(score[layer], nan=-1.0), k).indices
            units[g][layer] = ids.tolist()
    else:
        cost = {g: scores.unit_params[g] for g in groups}
        total_params = sum(cost[g] * scores.M[g].numel() for g in groups)
        cap = torch.tensor([sum(cost[g] * scores.M[g].shape[1] for g in groups)] * n_layers, dtype=torch.long)
        alloc = _allocate(mass, int(round(budget * total_params)), cap)  # parameters per layer
        norm_score = {}
        for g in groups:
            if selector == "random":
                norm_score[g] = torch.rand(scores.M[g].shape, generator=gen, dtype=torch.float64)
            else:
                s = scores.score(selector, g)
                norm_score[g] = _rank01(s) if norm == "rank" else _zscore(s)
        for layer in range(n_layers):
            cand = sorted(((norm_score[g][layer, u].item(), g, u) for g in groups
                           for u in range(scores.M[g].shape[1])), reverse=True)
            left = int(alloc[layer])
            for _, g, u in cand:
                if left < cost[g] / 2:  # nearest-budget rounding: take a unit if at least half of it fits
                    break
                units[g].setdefault(layer, []).append(u)
                left -= cost[g]
    meta = dict(scores.meta, selector=selector, budget=budget, allocation=allocation, norm=norm, seed=seed,
                budget_unit="units" if len(groups) == 1 else "parameters")
    return Selection(layout=layout, units={g: u for g, u in units.items() if u}, meta=meta)


def recovery(score_before: float, score_damaged: float, score_rolled: float) -> float:
    """Share of the earlier domain's lost score that the intervention brings back:
    (rolled - damaged) / (before - damaged); NaN when nothing was lost."""
    lost = score_before - score_damaged
    return (score_rolled - score_damaged) / lost if lost != 0 and not math.isnan(lost) else float("nan")
