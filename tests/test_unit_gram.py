"""unit_gram against the float64 reference on every backend: modes, K, axes, blocks, indices, dtypes, strides."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpt_kernels as L
from conftest import DTYPES, is_slow, poison_allocator
from helpers import assert_gram_close, rand


def _inputs(k, shape, dtypes, device, gen, layout="contiguous", shared_rows=()):
    ws = [rand(shape, dtypes[i % len(dtypes)], device, gen, scale=1.0 + i, layout=layout) for i in range(k)]
    for r in shared_rows:  # exact zeros in some deltas
        if k > 1 and r < shape[0]:
            ws[1][r] = ws[0][r].to(ws[1].dtype)
    return ws


def _check(backend, ws, **kw):
    name, _ = backend
    got = L.unit_gram(ws, backend=name, **kw)
    ref = L.unit_gram(ws, backend="reference", **kw)
    n = ws[0].shape[1 - kw.get("axis", 0)] * kw.get("block", 1)
    assert_gram_close(got, ref, n)
    return got


@pytest.mark.parametrize("tol", [(1e-2, 1e-2), (0.0, 0.0), (1e-2, 0.0), (0.0, 1e-2)],
                         ids=["atol+rtol", "exact", "atol", "rtol"])  # the CPU kernels specialise on these
@pytest.mark.parametrize("mode,k", [("consecutive", 2), ("consecutive", 5), ("base", 3), ("given", 1), ("given", 4)])
@pytest.mark.parametrize("axis", [0, 1])
def test_modes_and_axes(backend, mode, k, axis, tol):
    name, device = backend
    gen = torch.Generator().manual_seed(1000 * k + axis)
    shape = (13, 9) if is_slow(name) else (67, 45)
    ws = _inputs(k, shape, (torch.bfloat16,), device, gen, shared_rows=(2, 5))
    got = _check(backend, ws, axis=axis, mode=mode, atol=tol[0], rtol=tol[1])
    if tol == (0.0, 0.0):
        assert torch.equal(got.near_zeros, got.zeros)
    if mode != "given":
        assert got.zeros.sum() > 0  # the shared rows: exact zeros present
    if tol[0] > 0 and mode != "given" and not is_slow(name):
        assert (got.near_zeros > got.zeros).any()  # the tolerance matters in this data


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16, torch.float32, torch.float16)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_dtypes_and_strides(backend, dtypes, layout):
    name, device = backend
    gen = torch.Generator().manual_seed(7)
    shape = (12, 10) if is_slow(name) else (40, 34)
    ws = _inputs(3, shape, dtypes, device, gen, layout=layout, shared_rows=(1,))
    for axis in (0, 1):
        _check(backend, ws, axis=axis, mode="consecutive", atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("block", [2, 3])
@pytest.mark.parametrize("axis", [0, 1])
def test_blocks_and_index(backend, block, axis):
    name, device = backend
    gen = torch.Generator().manual_seed(block)
    shape = (12, 18) if is_slow(name) else (36, 30)
    ws = _inputs(3, shape, (torch.bfloat16,), device, gen)
    n_units = shape[axis] // block
    index = [n_units - 1, 0, 2, 2, 1]  # out of order, with a duplicate
    got = _check(backend, ws, axis=axis, block=block, index=index, mode="base", atol=1e-2)
    full = L.unit_gram(ws, axis=axis, block=block, mode="base", atol=1e-2, backend="reference")
    assert got.gram.shape == (len(index), 2, 2)
    assert torch.equal(got.zeros.cpu(), full.zeros[index])


def test_eight_inputs_and_empty_index(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(8)
    ws = _inputs(8, (7, 11) if is_slow(name) else (21, 33), (torch.bfloat16,), device, gen)
    _check(backend, ws, mode="given")
    _check(backend, ws, mode="consecutive", axis=1)
    empty = L.unit_gram(ws, index=[], backend=name)
    assert empty.gram.shape == (0, 7, 7)


def test_outputs_fully_written(backend):
    """Outputs come from fresh allocations: freed memory full of NaN must not leak into them."""
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    ws = _inputs(3, (9, 8), (torch.float32,), device, gen)
    poison_allocator((9, 2, 2), (9, 2), (9, 2), (9, 2))
    got = L.unit_gram(ws, backend=name, atol=1e-3)
    for t in got:
        assert torch.isfinite(t.double()).all()


def test_near_zero_tolerances_count_exactly(backend):
    name, device = backend
    w0 = torch.tensor([[1.0, 2.0, -4.0, 0.0], [1.0, 1.0, 1.0, 1.0]], device=device)
    w1 = torch.tensor([[1.0, 2.5, -4.25, 0.001], [1.0, 1.0, 1.0, 1.0]], device=device)
    g = L.unit_gram([w0, w1], atol=0.0, rtol=0.1, backend=name)
    assert g.zeros.cpu().tolist() == [[1], [4]]
    assert g.near_zeros.cpu().tolist() == [[2], [4]]  # 0 and 0.25 <= 0.4; 0.5 > 0.2; 0.001 > 0
    assert g.abs_max.cpu().tolist() == [[0.5], [0.0]]


def test_bf16_differences_are_exact(backend):
    """Widen then subtract: two bf16 values one ulp apart differ by exactly that ulp."""
    name, device = backend
    a = torch.full((3, 5), 1.0, dtype=torch.bfloat16, device=device)
    b = torch.full((3, 5), 1.0078125, dtype=torch.bfloat16, device=device)  # 1 + 2^-7
    g = L.unit_gram([a, b], backend=name)
    assert torch.equal(g.abs_max.cpu(), torch.full((3, 1), 2.0 ** -7))
    assert torch.allclose(g.abs_sum.cpu(), torch.full((3, 1), 5 * 2.0 ** -7))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), k=st.integers(1, 6), axis=st.sampled_from([0, 1]),
       mode=st.sampled_from(["consecutive", "base", "given"]), block=st.integers(1, 4),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=3),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), data=st.data())
def test_property_cpu(rows, cols, k, axis, mode, block, dtypes, layout, data):
    if mode != "given" and k < 2:
        k = 2
    shape = [rows, cols]
    shape[axis] = max(block, shape[axis] - shape[axis] % block)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    ws = _inputs(k, tuple(shape), dtypes, "cpu", gen, layout=layout, shared_rows=(0,))
    n_units = shape[axis] // block
    index = data.draw(st.none() | st.lists(st.integers(0, n_units - 1), max_size=8))
    atol, rtol = data.draw(st.sampled_from([(1e-3, 1e-2), (0.0, 0.0), (1e-2, 0.0), (0.0, 1e-1)]))
    _check(("cpu", None), ws, axis=axis, block=block, mode=mode, index=index, atol=atol, rtol=rtol)
