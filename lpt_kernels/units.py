"""Top units and their overlap: the one rule shared by update profiles (lpt diff), activation results (hooks) and
the training tracker, so that "the top 10% of units" means the same set everywhere (docs/diff.md, *Top units*)."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch


def top_mask(score: torch.Tensor, frac: float, per_layer: bool,
             layers: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Bool mask of the top ``frac`` (in (0, 1]) entries of ``score [layers, units]``, ranked over all entries or
    within each row (``per_layer``): ceil(frac * n) of them, never one whose score is 0 or NaN. Ties at the cut go to
    the earlier position (the lower layer, then the lower unit). ``layers``: the rows where the group has units (the
    others are never selected and do not count in n); None: every row."""
    if layers is not None and list(layers) != list(range(score.shape[0])):
        idx = torch.tensor(list(layers), dtype=torch.long, device=score.device)
        mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        return mask.index_copy_(0, idx, top_mask(score.index_select(0, idx), frac, per_layer))
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


@functools.lru_cache(maxsize=4096)
def expected_jaccard(a: int, b: int, n: int) -> float:
    """E[|A & B| / |A | B|] for a set A of ``a`` and a set B of ``b`` units drawn independently and uniformly from
    ``n``: the chance level of a Jaccard overlap. |A & B| is hypergeometric, so this is the exact sum over its
    support (about f / (2 - f) for sets of f n units when both are large; higher for small sets). 0 when both are
    empty."""
    if a < 0 or b < 0 or a > n or b > n:
        raise ValueError(f"expected_jaccard: sets of {a} and {b} out of {n}")
    if a + b == 0:
        return 0.0
    i = torch.arange(max(0, a + b - n), min(a, b) + 1, dtype=torch.float64)

    def lchoose(x, y):
        return torch.lgamma(x + 1) - torch.lgamma(y + 1) - torch.lgamma(x - y + 1)

    # log C(a, i) C(n - a, b - i), normalised over the support (softmax) rather than by C(n, b): no large constants
    p = torch.softmax(lchoose(torch.tensor(float(a)), i) + lchoose(torch.tensor(float(n - a)), b - i), 0)
    return float((p * i / (a + b - i)).sum())
