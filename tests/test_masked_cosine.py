"""masked_cosine over tensors and (before, after) pairs against a dense float64 computation."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpt_kernels as L
from conftest import DTYPES, PROPERTY_EXAMPLES, is_slow
from helpers import INDEX_LAYOUTS, index_as, rand


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


def test_strided_index(backend):
    """Column 0 of an int64 [3, 2] tensor ([3, 0, 5]) selects those units on every backend."""
    name, device = backend
    gen = torch.Generator().manual_seed(5)
    w = [torch.randn(7, 9, generator=gen).to(device) for _ in range(3)]
    ids = torch.tensor([[3, 6], [0, 6], [5, 6]])
    pooled, per = L.masked_cosine((w[0], w[1]), (w[1], w[2]), ids[:, 0], backend=name)
    rp, rper = _dense(w[1] - w[0], w[2] - w[1], [3, 0, 5], 0, 1)
    assert abs(pooled.item() - rp.item()) <= 1e-5
    assert torch.allclose(per.double().cpu(), rper.cpu(), atol=1e-5)


@pytest.mark.parametrize("shape,axis,index", [((0, 4), 0, []), ((5, 0), 0, [4, 1]), ((0, 3), 1, [2]),
                                               ((0, 0), 1, [])])
def test_zero_size(backend, shape, axis, index):
    """Zero-size updates: the cosine over empty units is 0 (a zero vector), never NaN."""
    name, device = backend
    u, v = torch.empty(shape, device=device), torch.empty(shape, dtype=torch.bfloat16, device=device)
    pooled, per = L.masked_cosine(u, (v, v), index, axis=axis, backend=name)
    assert pooled.item() == 0.0 and per.shape == (len(index),) and not per.any()


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 16), cols=st.integers(0, 16), axis=st.sampled_from([0, 1]), block=st.integers(1, 3),
       form=st.sampled_from(["tensors", "pairs", "chain"]), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), index_layout=st.sampled_from(INDEX_LAYOUTS),
       data=st.data())
def test_property(backend, rows, cols, axis, block, form, dtype, layout, index_layout, data):
    """Every backend against the reference: zero-size and odd shapes, any strides, ids as lists, tensors and strided
    / int32 / expanded views."""
    name, device = backend
    shape = [rows, cols]
    shape[axis] -= shape[axis] % block
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    w = [rand(tuple(shape), dtype, device, gen, layout=layout) for _ in range(4)]
    u, v = {"tensors": (w[0], w[1]), "pairs": ((w[0], w[1]), (w[2], w[3])), "chain": ((w[0], w[1]), (w[1], w[2]))}[form]
    n_units = shape[axis] // block
    ids = data.draw(st.lists(st.integers(0, n_units - 1), max_size=6)) if n_units else []
    pooled, per = L.masked_cosine(u, v, index_as(ids, index_layout), axis=axis, block=block, backend=name)
    rp, rper = L.masked_cosine(u, v, ids, axis=axis, block=block, backend="reference")
    assert per.shape == (len(ids),) and pooled.shape == ()
    assert abs(pooled.item() - rp.item()) <= 1e-5 and torch.allclose(per.cpu(), rper.cpu(), atol=1e-5)
