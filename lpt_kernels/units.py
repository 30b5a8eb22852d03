"""Top units and their overlap: the one rule shared by update profiles (lpt diff), activation results (hooks) and
the training tracker, so that "the top 10% of units" means the same set everywhere (docs/diff.md, *Top units*)."""
from __future__ import annotations

import math

import torch


def top_mask(score: torch.Tensor, frac: float, per_layer: bool) -> torch.Tensor:
    """Bool mask of the top ``frac`` (in (0, 1]) entries of ``score [layers, units]``, ranked over all entries or
    within each row (``per_layer``): ceil(frac * n) of them, never one whose score is 0 or NaN. Ties at the cut go to
    the earlier position (the lower layer, then the lower unit)."""
    score = torch.nan_to_num(score.double(), nan=-1.0)
    flat = score if per_layer else score.reshape(1, -1)
    k = max(1, int(math.ceil(frac * flat.shape[1])))
    idx = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]  # stable: not topk, for the ties
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True) & (flat > 0)
    return mask.reshape(score.shape)


def jaccard_masks(a: torch.Tensor, b: torch.Tensor, per_layer: bool) -> torch.Tensor:
    """|A & B| / |A | B| of bool masks ``[..., layers, units]`` (broadcast against each other): over the last two
    dimensions, or per layer (the last one) with ``per_layer``; float64, 0 where both sets are empty."""
    dims = (-1,) if per_layer else (-2, -1)
    inter = (a & b).sum(dims).double()
    union = (a | b).sum(dims).double()
    return torch.where(union > 0, inter / union.clamp_min(1), 0.0)
