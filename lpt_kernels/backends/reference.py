"""The float64 oracle: the contract of docs/kernels.md written with plain torch ops.

Every test compares the other backends against this module, and it is the fallback where no extension runs.
Deltas are formed exactly as the kernels form them (inputs widened to fp32, then differenced in fp32) and every
sum is then taken in float64, so counts and maxima must agree exactly and sums to fp32 rounding of the kernels.

Two rules every backend follows bit for bit (docs/kernels.md):

- near-zero bound: ``atol + rtol * |w_ref|`` in fp32 with the product rounded before the sum (no fused
  multiply-add), as two separate fp32 torch ops compute it here;
- maxima ignore NaN (the largest non-NaN |value|, 0 when there is none), while sums propagate it.
"""
from __future__ import annotations

from typing import List, Optional

import torch


def deltas(ws: List[torch.Tensor], mode: str):
    """Return (d, ref): fp32 deltas [M, R, N] and their reference values (the subtrahends) as the kernels form them."""
    w = [t.to(torch.float32) for t in ws]
    if mode == "consecutive":
        pairs = [(w[m + 1], w[m]) for m in range(len(w) - 1)]
    elif mode == "base":
        pairs = [(w[m + 1], w[0]) for m in range(len(w) - 1)]
    else:  # given
        return torch.stack(w), torch.zeros_like(torch.stack(w))
    return torch.stack([a - b for a, b in pairs]), torch.stack([b for _, b in pairs])


def _per_unit(x: torch.Tensor, axis: int, block: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    """[M, R, N] -> [M, U, elements of a unit]."""
    if axis == 1:
        x = x.transpose(1, 2)
    x = x.reshape(x.shape[0], x.shape[1] // block, block * x.shape[2])  # explicit: zero sizes are fine
    return x if index is None else x[:, index.to(x.device)]


def near_bound(ref32: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """The near-zero bound atol + rtol * |ref| in fp32: the product rounded to fp32, then the sum (two roundings)."""
    prod = torch.tensor(rtol, dtype=torch.float32, device=ref32.device) * ref32.abs()
    return prod + torch.tensor(atol, dtype=torch.float32, device=ref32.device)


def nan_ignoring_amax(a: torch.Tensor, dim: int) -> torch.Tensor:
    """max over `dim` of non-negative values, NaN ignored, 0 for an empty or all-NaN reduction."""
    a = torch.where(torch.isnan(a), 0.0, a)
    if a.shape[dim] == 0:
        shape = list(a.shape)
        del shape[dim]
        return a.new_zeros(shape)
    return a.amax(dim)


def unit_gram(ws, axis, block, mode, index, atol, rtol):
    d32, ref32 = deltas(ws, mode)
    near = d32.abs() <= near_bound(ref32, atol, rtol)
    d = _per_unit(d32.to(torch.float64), axis, block, index)  # [M, U, E]
    gram = torch.einsum("aue,bue->uab", d, d)
    abs_d = d.abs()
    abs_max = nan_ignoring_amax(abs_d, -1)
    return (gram.to(torch.float32).contiguous(),
            abs_d.sum(-1).T.to(torch.float32).contiguous(),
            abs_max.T.to(torch.float32).contiguous(),
            (d == 0).sum(-1).T.to(torch.int64).contiguous(),
            _per_unit(near, axis, block, index).sum(-1).T.to(torch.int64).contiguous())


def act_stats_(x, stats, token_mask, threshold):
    if token_mask is not None:
        x = x[token_mask.to(x.device)]
    a = x.to(torch.float64).abs()
    thr = torch.tensor(threshold, dtype=torch.float32)
    stats[0] += a.shape[0]
    stats[1] += a.sum(0)
    stats[2] += (a * a).sum(0)
    if a.shape[0]:
        stats[3] = torch.maximum(stats[3], nan_ignoring_amax(a, 0))
    stats[4] += (x.to(torch.float32).abs() > thr).sum(0).to(torch.float64)


def rollback_(target, source, index, axis, block, alpha, compact):
    idx = index.to(target.device)
    pos = (idx[:, None] * block + torch.arange(block, device=idx.device)).reshape(-1)
    src_pos = torch.arange(pos.numel(), device=idx.device) if compact else pos
    t = target.index_select(axis, pos)
    s = source.index_select(axis, src_pos).to(target.device)
    if alpha == 1.0:
        new = s.to(target.dtype)
    else:
        t64 = t.to(torch.float64)
        new = (t64 + alpha * (s.to(torch.float64) - t64)).to(target.dtype)
    target.index_copy_(axis, pos, new)
