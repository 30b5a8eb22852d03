"""rollback_: bit-exact copies, lerp within one ulp, nothing outside the units touched, on every backend."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpt_kernels as L
from conftest import DTYPES, PROPERTY_EXAMPLES, is_slow
from helpers import INDEX_LAYOUTS, index_as, rand, strided_view, ulp


def _unit_mask(shape, axis, block, index):
    m = torch.zeros(shape, dtype=torch.bool)
    for u in set(index):
        if axis == 0:
            m[u * block:(u + 1) * block] = True
        else:
            m[:, u * block:(u + 1) * block] = True
    return m


@pytest.mark.parametrize("tdtype,sdtype", [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32),
                                                                     (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("axis,block", [(0, 1), (1, 1), (0, 3), (1, 2)])
def test_copy_is_exact_and_local(backend, tdtype, sdtype, axis, block):
    name, device = backend
    gen = torch.Generator().manual_seed(11)
    shape = (12, 18) if is_slow(name) else (48, 66)
    target = rand(shape, tdtype, device, gen)
    source = rand(shape, sdtype, device, gen, scale=3.0)
    n_units = shape[axis] // block
    index = [n_units - 1, 1, 1, 3]  # duplicates applied once
    before = target.clone()
    L.rollback_(target, source, index, axis=axis, block=block, backend=name)
    m = _unit_mask(shape, axis, block, index).to(device)
    assert torch.equal(target[m].view(torch.int16 if tdtype != torch.float32 else torch.int32),
                       source.to(tdtype)[m].view(torch.int16 if tdtype != torch.float32 else torch.int32))
    assert torch.equal(target[~m], before[~m]), "an element outside the listed units changed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_lerp_within_one_ulp(backend, dtype, layout):
    name, device = backend
    gen = torch.Generator().manual_seed(12)
    shape = (10, 12) if is_slow(name) else (40, 52)
    target = rand(shape, dtype, device, gen, layout=layout)
    source = rand(shape, torch.float32, device, gen, layout="transposed")
    before = target.clone()
    index = [0, 3, 4]
    for axis in (0, 1):
        t = before.clone() if layout == "contiguous" else target
        t.copy_(before)
        L.rollback_(t, source, index, axis=axis, alpha=0.3, backend=name)
        m = _unit_mask(shape, axis, 1, index).to(device)
        t64, s64 = before.double(), source.double()
        exact = t64 + 0.3 * (s64 - t64)
        err = (t.double() - exact).abs()
        slack = ulp(exact, dtype) + 4 * 2 ** -24 * (t64.abs() + s64.abs())
        assert (err[m] <= slack[m]).all(), f"max err {err[m].max()}"
        assert torch.equal(t[~m], before[~m])


@pytest.mark.parametrize("axis", [0, 1])
def test_compact_source_path(axis):
    """A source on another device is gathered to just the listed units and passed compact; check that path on the
    CPU kernel directly (a second device is not available on CI machines)."""
    target = torch.randn(10, 6)
    source = torch.randn(10, 6)
    ref = target.clone()
    L.rollback_(ref, source, [2, 5], axis=axis, alpha=0.5, backend="cpu")  # the same numerics, full source
    from lpt_kernels.backends import cpu
    idx = torch.tensor([2, 5])
    compact = source.index_select(axis, idx)
    out = target.clone()
    cpu.rollback_(out, compact, idx, axis, 1, 0.5, True)
    assert torch.equal(out, ref)


def test_alpha_zero_and_empty_index(backend):
    name, device = backend
    t = torch.randn(6, 4).to(device)
    s = torch.randn(6, 4).to(device)
    before = t.clone()
    L.rollback_(t, s, [1, 2], alpha=0.0, backend=name)
    assert torch.equal(t, before)
    L.rollback_(t, s, [], backend=name)
    assert torch.equal(t, before)


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, [0x7F81, 0xFF81, 0x7FC1, 0x7F80]),
                                        (torch.float16, [0x7C01, 0x7E01, 0xFC01, 0x7C00]),
                                        (torch.float32, [0x7F800001, 0x7FC00001, -0x007FFFFF, 0x7F800000])])
def test_alpha_one_copies_raw_words(backend, dtype, bits):
    """alpha = 1 with equal dtypes copies the raw words: NaN payloads (signalling ones included) survive on every
    backend, as the CPU backend always did (a trip through fp32 turns bf16 0x7F81 into 0x7FC1)."""
    name, device = backend
    words = torch.int16 if dtype != torch.float32 else torch.int32
    w = torch.tensor(bits * 3, dtype=torch.int64).to(words).reshape(-1, 4)  # [3, 4] of raw words
    for axis in (0, 1):
        source = w.view(dtype).to(device)
        target = torch.zeros(3, 4, dtype=dtype, device=device)
        L.rollback_(target, source, [0, 2] if axis == 0 else [1, 3], axis=axis, backend=name)
        got = target.cpu().view(words)
        m = torch.zeros(3, 4, dtype=torch.bool)
        if axis == 0:
            m[[0, 2]] = True
        else:
            m[:, [1, 3]] = True
        assert torch.equal(got[m], w[m]), f"axis {axis}: {[hex(v & 0xFFFFFFFF) for v in got[m].tolist()]}"
        assert not got[~m].any()


def test_strided_index_and_target(backend):
    """A strided index (column 0 of an int64 [n, 2] tensor) and non-contiguous targets on every backend."""
    name, device = backend
    gen = torch.Generator().manual_seed(4)
    ids = torch.tensor([[4, 0], [1, 99], [4, 7]])
    for layout in ("contiguous", "transposed", "sliced"):
        for axis in (0, 1):
            base = torch.randn(6, 5, generator=gen)
            source = torch.randn(6, 5, generator=gen)
            target = strided_view(base, layout).to(device)
            want = base.clone()
            L.rollback_(target, source.to(device), ids[:, 0], axis=axis, alpha=0.5, backend=name)
            L.rollback_(want, source, [4, 1], axis=axis, alpha=0.5, backend="reference")
            assert torch.allclose(target.cpu(), want, rtol=1e-6, atol=1e-7), (layout, axis)


@pytest.mark.parametrize("shape,axis,index", [((0, 4), 0, []), ((5, 0), 0, [4, 1]), ((0, 3), 1, [2, 0]),
                                               ((0, 0), 1, [])])
def test_zero_size(backend, shape, axis, index):
    """Zero-size targets: the listed units hold no elements; nothing is read or written, no error."""
    name, device = backend
    t = torch.empty(shape, dtype=torch.bfloat16, device=device)
    s = torch.empty(shape, device=device)
    assert L.rollback_(t, s, index, axis=axis, alpha=0.5, backend=name) is t
    assert L.rollback_(t, s.to(torch.bfloat16), index, axis=axis, backend=name).shape == shape


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 20), cols=st.integers(0, 20), axis=st.sampled_from([0, 1]), block=st.integers(1, 3),
       tdtype=st.sampled_from(DTYPES), sdtype=st.sampled_from(DTYPES), alpha=st.sampled_from([1.0, 0.5, 0.0]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       source_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       index_layout=st.sampled_from(INDEX_LAYOUTS),
       data=st.data())
def test_property(backend, rows, cols, axis, block, tdtype, sdtype, alpha, layout, source_layout, index_layout, data):
    """Every backend against the reference: zero-size and odd shapes, any strides of target (the output) and source,
    ids as lists, tensors and strided / int32 / expanded views (duplicates applied once)."""
    name, device = backend
    if is_slow(name):
        rows, cols = min(rows, 10), min(cols, 10)
    shape = [rows, cols]
    shape[axis] -= shape[axis] % block
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    target = rand(tuple(shape), tdtype, "cpu", gen, layout=layout)
    source = rand(tuple(shape), sdtype, "cpu", gen, layout=source_layout)
    n_units = shape[axis] // block
    index = data.draw(st.lists(st.integers(0, n_units - 1), max_size=6)) if n_units else []
    got, ref = strided_view(target, layout).to(device), target.clone()
    L.rollback_(got, source.to(device), index_as(index, index_layout), axis=axis, block=block, alpha=alpha,
                backend=name)
    L.rollback_(ref, source, index, axis=axis, block=block, alpha=alpha, backend="reference")
    got = got.cpu()
    if alpha == 1.0:
        assert torch.equal(got, ref)
    else:
        # one rounding to the target dtype, plus fp32 rounding of (s - t) scaled by alpha
        slack = ulp(ref.double(), tdtype) + 4 * 2 ** -24 * (target.double().abs() + source.double().abs())
        assert ((got.double() - ref.double()).abs() <= slack).all()
