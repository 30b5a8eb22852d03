"""masked_cosine over tensors and (before, after) pairs against a dense float64 computation."""
import pytest
import torch

import lpt_kernels as L
from conftest import is_slow


def _dense(u, v, index, axis, block):
    def sel(x):
        x = x.double()
        x = x if axis == 0 else x.t()
        return x.reshape(x.shape[0] // block, -1)[index]
    a, b = sel(u), sel(v)
    pooled = (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())
    per = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    return pooled, per


@pytest.mark.parametrize("form", ["tensors", "pairs", "chain", "mixed"])
@pytest.mark.parametrize("axis,block", [(0, 1), (1, 2)])
def test_forms(backend, form, axis, block):
    name, device = backend
    gen = torch.Generator().manual_seed(21)
    shape = (8, 10) if is_slow(name) else (40, 60)
    w = [torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device) for _ in range(4)]
    if form == "tensors":
        u, v, du, dv = w[0], w[1], w[0], w[1]
    elif form == "pairs":
        u, v = (w[0], w[1]), (w[2], w[3])
        du, dv = w[1].float() - w[0].float(), w[3].float() - w[2].float()
    elif form == "chain":
        u, v = (w[0], w[1]), (w[1], w[2])
        du, dv = w[1].float() - w[0].float(), w[2].float() - w[1].float()
    else:
        u, v = w[0], (w[2], w[3])
        du, dv = w[0], w[3].float() - w[2].float()
    index = [3, 0, 2]
    pooled, per = L.masked_cosine(u, v, index, axis=axis, block=block, backend=name)
    rp, rper = _dense(du, dv, index, axis, block)
    assert pooled.dtype == torch.float32 and per.shape == (3,)
    assert abs(pooled.item() - rp.item()) <= 1e-5
    assert torch.allclose(per.double().cpu(), rper.cpu(), atol=1e-5)


def test_zero_update_gives_zero_cosine(backend):
    name, device = backend
    u = torch.zeros(4, 3, device=device)
    v = torch.randn(4, 3, device=device)
    pooled, per = L.masked_cosine(u, v, [0, 1], backend=name)
    assert pooled.item() == 0.0 and torch.equal(per.cpu(), torch.zeros(2))


def test_identical_updates_give_one(backend):
    name, device = backend
    u = torch.randn(6, 5, device=device)
    pooled, per = L.masked_cosine(u, u.clone(), [1, 4, 5], backend=name)
    assert abs(pooled.item() - 1) < 1e-6 and torch.allclose(per.cpu(), torch.ones(3))
