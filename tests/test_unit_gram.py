"""unit_gram against the float64 reference on every backend: modes, K, axes, blocks, indices, dtypes, strides."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpt_kernels as L
from conftest import DTYPES, PROPERTY_EXAMPLES, is_slow, poison_allocator
from helpers import INDEX_LAYOUTS, assert_gram_close, index_as, rand


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
@pytest.mark.parametrize("mode,k", [("consecutive", 2), ("consecutive", 5), ("base", 3), ("given", 1), ("given", 4),
                                    ("consecutive", 6), ("base", 7), ("given", 5)])  # K > 5: the runtime-sized kernel
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
@pytest.mark.parametrize("k", [3, 6])
def test_dtypes_and_strides(backend, dtypes, layout, k):
    name, device = backend
    gen = torch.Generator().manual_seed(7)
    shape = (12, 10) if is_slow(name) else (40, 34)
    ws = _inputs(k, shape, dtypes, device, gen, layout=layout, shared_rows=(1,))
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


@pytest.mark.parametrize("mode,k", [("consecutive", 6), ("base", 8), ("given", 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_runtime_sized_kernel_long_units(backend, mode, k, dtype):
    """K > 5 runs each strip in rounds of passes over an L1 buffer of its deltas: rows long enough for several rounds
    and several calls a unit (axis 0), and columns over more rows than one fp32 fold period (axis 1), on 2 threads."""
    name, device = backend
    gen = torch.Generator().manual_seed(100 + k)
    rows, cols = (9, 70) if is_slow(name) else (7, 2600)
    ws = _inputs(k, (rows, cols), (dtype,), device, gen, shared_rows=(1, 4))
    for w in ws[1:]:  # a quarter of the elements equal to the base's (given: zero), so that every kind of delta has zeros
        keep = (torch.rand(w.shape, generator=gen) < 0.25).to(device)
        w[keep] = 0.0 if mode == "given" else ws[0][keep]
    was = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _check(backend, ws, axis=0, mode=mode, atol=1e-3, rtol=1e-2)
        t = [w.t().contiguous() for w in ws]  # [cols, rows]: columns are units of `cols` rows
        _check(backend, [w[: 40 if is_slow(name) else 600] for w in t], axis=1, mode=mode, atol=1e-3, rtol=0.0)
    finally:
        torch.set_num_threads(was)
    assert got.zeros.sum() > 0


def test_outputs_fully_written(backend):
    """Outputs come from fresh allocations: freed memory full of NaN must not leak into them."""
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    ws = _inputs(3, (9, 8), (torch.float32,), device, gen)
    poison_allocator((9, 2, 2), (9, 2), (9, 2), (9, 2))
    got = L.unit_gram(ws, backend=name, atol=1e-3)
    for t in got:
        assert torch.isfinite(t.double()).all()


@pytest.mark.parametrize("k", [3, 5, 7])
def test_listed_columns_split_by_rows(backend, k):
    """Listed columns of many rows on 2 threads: each thread gathers its rows into its own column totals, which are
    added (sums, counts) and maxed (abs_max) into one before the units are stored. Whole vector strips and a scalar
    tail of listed columns, ids unsorted and repeated, zero and near-zero deltas, every statistic exact or close.
    K = 7 takes the runtime-sized kernel (passes over L1 buffers of its deltas)."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CPU backend's OpenMP threads (thousands of rows would take minutes under Triton's interpreter)")
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(3001, 300, generator=gen)
    ws = [w]
    for i in range(1, k):  # deltas: a third of the elements unchanged, some tiny, the rest of unit size
        d = torch.randn(w.shape, generator=gen)
        d[torch.rand(w.shape, generator=gen) < 0.33] = 0.0
        d[torch.rand(w.shape, generator=gen) < 0.1] *= 1e-4
        ws.append(ws[-1] + d)
    ws = [x.to(torch.bfloat16).to(device) for x in ws]
    index = torch.randperm(300, generator=gen)[:45].tolist() + [7, 7]
    kw = {"index": index, "atol": 1e-3, "rtol": 0.01}
    was = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = L.unit_gram(ws, axis=1, backend=name, **kw)
    finally:
        torch.set_num_threads(was)
    ref = L.unit_gram(ws, axis=1, backend="reference", **kw)
    assert got.zeros.sum() > 0 and (got.near_zeros > got.zeros).any()  # the counts are exercised
    assert_gram_close(got, ref, ws[0].shape[0])


def test_near_zero_tolerances_count_exactly(backend):
    name, device = backend
    w0 = torch.tensor([[1.0, 2.0, -4.0, 0.0], [1.0, 1.0, 1.0, 1.0]], device=device)
    w1 = torch.tensor([[1.0, 2.5, -4.25, 0.001], [1.0, 1.0, 1.0, 1.0]], device=device)
    g = L.unit_gram([w0, w1], atol=0.0, rtol=0.1, backend=name)
    assert g.zeros.cpu().tolist() == [[1], [4]]
    assert g.near_zeros.cpu().tolist() == [[2], [4]]  # 0 and 0.25 <= 0.4; 0.5 > 0.2; 0.001 > 0
    assert g.abs_max.cpu().tolist() == [[0.5], [0.0]]


@pytest.mark.parametrize("case", ["15 columns", "listed columns", "units of 3 across threads",
                                  "units of 40 across threads"])
def test_columns_on_more_threads_than_strips(backend, case):
    """Columns on 2 threads where one thread gets none (fewer strips than threads): it must not fold the other's
    column sums (it zeroed them while they were being added into, and counts came out off by multiples of 16). And
    units whose columns two threads share (each thread stores the units inside its columns, these after both)."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CPU backend's OpenMP threads (100000-row inputs would take minutes under Triton's interpreter)")
    gen = torch.Generator().manual_seed(3)
    if case == "15 columns":
        w = torch.randn(100_000, 15, generator=gen).to(device)
        ws, kw = [w, w.clone(), (w * 2).round()], {}
    elif case == "listed columns":
        w = torch.randn(70_000, 64, generator=gen).to(torch.bfloat16).to(device)
        ws, kw = [w, w.clone(), w * 3], {"block": 2, "index": [3, 3, 0, 31, 5]}
    else:  # the threads split at column 64 (strips of 16): inside unit 21 of 3 columns, unit 1 of 40
        block = 3 if "of 3" in case else 40
        w = torch.randn(800, 111 if block == 3 else 120, generator=gen).to(torch.bfloat16).to(device)
        ws, kw = [w, (w * 1.5).to(torch.bfloat16), (w * 3).to(torch.bfloat16)], {"block": block}
    was = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = L.unit_gram(ws, axis=1, backend=name, **kw)
    finally:
        torch.set_num_threads(was)
    ref = L.unit_gram(ws, axis=1, backend="reference", **kw)
    assert got.zeros.cpu().tolist() == ref.zeros.cpu().tolist()
    assert_gram_close(got, ref, ws[0].shape[0] * kw.get("block", 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_columns_read_in_place_keep_their_lanes(backend, dtype, k):
    """Columns of one dtype read in place: the CPU kernel widens 16-bit strips into lanes out of element order at
    some widths (AVX-512, K = 4, 5) and keeps the column sums in that order, so every column's statistics must still
    be its own: a different update per column, rows past a fold period (256) and a row block, a tail of columns."""
    name, device = backend
    rows, cols = (20, 20) if is_slow(name) else (300, 75)
    gen = torch.Generator().manual_seed(k)
    w = rand((rows, cols), dtype, device, gen)
    scale = torch.arange(1, cols + 1, dtype=torch.float32, device=device)  # column j moves by ~j
    ws = [w]
    for i in range(1, k):
        keep = torch.rand(rows, cols, generator=gen).to(device) < (torch.arange(cols, device=device) % 7) / 7
        ws.append(torch.where(keep, ws[-1], (ws[-1].float() + 1e-2 * i * scale).to(dtype)))
    for block in (1, 5):
        got = _check(backend, ws, axis=1, block=block, mode="consecutive", atol=1e-3)
        ref = L.unit_gram(ws, axis=1, block=block, mode="consecutive", atol=1e-3, backend="reference")
        assert torch.equal(got.zeros.cpu(), ref.zeros.cpu()) and torch.equal(got.abs_max.cpu(), ref.abs_max.cpu())


@pytest.mark.parametrize("k", [2, 3, 5])
def test_long_rows_span_fold_periods(backend, k):
    """Rows longer than the CPU kernel's fp32 run on every ISA (160 strips of up to 32 elements) plus a tail: each
    run folds into fp64 once, no strip lost or added, on both the in-place (bf16) and buffered (mixed) paths."""
    name, device = backend
    gen = torch.Generator().manual_seed(20 + k)
    shape = (3, 300) if is_slow(name) else (3, 2 * 160 * 32 + 37)
    for dtypes in ((torch.bfloat16,), (torch.float32, torch.bfloat16)):
        ws = _inputs(k, shape, dtypes, device, gen, shared_rows=(1,))
        got = _check(backend, ws, axis=0, mode="consecutive", atol=1e-3)
        if len(dtypes) == 1:  # the shared row: every element of its first delta an exact zero, counted once
            assert got.zeros[1, 0] == shape[1]


def test_bf16_differences_are_exact(backend):
    """Widen then subtract: two bf16 values one ulp apart differ by exactly that ulp."""
    name, device = backend
    a = torch.full((3, 5), 1.0, dtype=torch.bfloat16, device=device)
    b = torch.full((3, 5), 1.0078125, dtype=torch.bfloat16, device=device)  # 1 + 2^-7
    g = L.unit_gram([a, b], backend=name)
    assert torch.equal(g.abs_max.cpu(), torch.full((3, 1), 2.0 ** -7))
    assert torch.allclose(g.abs_sum.cpu(), torch.full((3, 1), 5 * 2.0 ** -7))


def test_strided_index_is_read_as_listed(backend):
    """A strided index (column 0 of an int64 [3, 2] tensor: [5, 2, 9]) means those units on every backend, not the
    first three words of its storage ([5, 0, 2]); an expanded (stride 0) index repeats its one id."""
    name, device = backend
    gen = torch.Generator().manual_seed(16)
    ws = _inputs(3, (12, 7), (torch.bfloat16,), device, gen)
    ids = torch.tensor([[5, 0], [2, 7], [9, 1]])
    for axis, kw in ((0, {}), (1, dict(block=1))):
        w = ws if axis == 0 else [x.t() for x in ws]
        got = L.unit_gram(w, axis=axis, index=ids[:, 0], mode="base", backend=name, **kw)
        want = L.unit_gram(w, axis=axis, index=[5, 2, 9], mode="base", backend="reference", **kw)
        assert_gram_close(got, want, 7)
    got = L.unit_gram(ws, index=torch.tensor([4]).expand(3), backend=name)
    assert_gram_close(got, L.unit_gram(ws, index=[4, 4, 4], backend="reference"), 7)


# fp32 w_ref and w with atol = 1e-3, rtol = 1e-2: d = w - w_ref equals the bound atol + rtol*|w_ref| when the product is
# rounded before the sum (the contract) and exceeds it when the two are fused into one fma.
W_REF_BITS, W_BITS = 0x3AC7C022, 0x3B2668F7


def _f32(bits):
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("mode", ["consecutive", "base"])
def test_near_zero_bound_is_rounded_not_fused(backend, mode, axis):
    name, device = backend
    shape = (3, 37) if is_slow(name) else (9, 67)  # vector strips and scalar tails on the CPU
    w_ref = torch.full(shape, _f32(W_REF_BITS).item()).to(device)
    w = torch.full(shape, _f32(W_BITS).item()).to(device)
    assert (w - w_ref).abs()[0, 0] == (torch.tensor(1e-2, dtype=torch.float32) * w_ref.abs()
                                       + torch.tensor(1e-3, dtype=torch.float32))[0, 0]
    ws = [w_ref, w] if mode == "consecutive" else [w_ref, w, w]  # base: both deltas are w - w_ref
    g = L.unit_gram(ws, axis=axis, mode=mode, atol=1e-3, rtol=1e-2, backend=name)
    per_unit = shape[1 - axis]
    assert g.near_zeros.cpu().tolist() == [[per_unit] * g.near_zeros.shape[1]] * shape[axis], \
        "a boundary delta was not counted"
    assert torch.equal(g.near_zeros.cpu(), L.unit_gram(ws, axis=axis, mode=mode, atol=1e-3, rtol=1e-2,
                                                      backend="reference").near_zeros)


def _boundary_pairs(n, atol, rtol, gen):
    """fp32 (w_ref, w) whose difference lies within 2 ulps of the rounded bound atol + rtol*|w_ref| (either sign),
    and how many of them the fused bound would classify differently (> 0: the data can tell the two apart)."""
    a32, r32 = torch.tensor(atol, dtype=torch.float32), torch.tensor(rtol, dtype=torch.float32)
    w_ref = (torch.rand(n, generator=gen, dtype=torch.float64) * 1e-3 + 1e-3).float()
    bound = r32 * w_ref.abs() + a32  # two roundings
    w = (w_ref.double() + bound.double()).float()
    for _ in range(2):
        step = torch.randint(-1, 2, (n,), generator=gen)
        w = torch.where(step > 0, torch.nextafter(w, torch.tensor(1.0)),
                        torch.where(step < 0, torch.nextafter(w, torch.tensor(0.0)), w))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    w_ref, w = w_ref * sign, w * sign
    d = (w - w_ref).abs()
    fused = (r32.double() * w_ref.double().abs() + a32.double()).float()  # one rounding (double rounding aside)
    return w_ref, w, int(((d <= bound) != (d <= fused)).sum())


@pytest.mark.parametrize("axis", [0, 1])
def test_near_zero_boundary_pairs(backend, axis):
    name, device = backend
    gen = torch.Generator().manual_seed(31)
    shape = (16, 64) if is_slow(name) else (61, 67)
    w_ref, w, teeth = _boundary_pairs(shape[0] * shape[1], 1e-3, 1e-2, gen)
    assert teeth > 0, "no pair where fma and rounding disagree: the test would not see a fused bound"
    ws = [w_ref.reshape(shape).to(device), w.reshape(shape).to(device)]
    got = L.unit_gram(ws, axis=axis, atol=1e-3, rtol=1e-2, backend=name)
    ref = L.unit_gram(ws, axis=axis, atol=1e-3, rtol=1e-2, backend="reference")
    assert torch.equal(got.near_zeros.cpu(), ref.near_zeros)


def test_nan_rule(backend):
    """Maxima ignore NaN (the largest non-NaN |d|, 0 if none); sums propagate it; NaN is neither zero nor near zero."""
    name, device = backend
    w0 = torch.zeros(4, 37)
    w1 = torch.arange(4 * 37, dtype=torch.float32).reshape(4, 37) / 100 - 0.7
    w1[1, 5] = float("nan")
    w1[2, :] = float("nan")
    w1[3, 9] = -float("nan")
    ws = [w0.to(device), w1.to(device)]
    for g in (L.unit_gram(ws, atol=0.5, backend=name), L.unit_gram(ws, atol=0.5, backend="reference")):
        g = [t.cpu() for t in g]
        finite = torch.nan_to_num(w1, nan=0.0).abs()
        assert torch.equal(g[2][:, 0], finite.amax(1)), "abs_max"
        assert g[1][:, 0].isnan().tolist() == [False, True, True, True], "abs_sum"
        assert g[3][:, 0].tolist() == [(w1[u] == 0).sum().item() for u in range(4)]
        assert g[4][:, 0].tolist() == [(w1[u].abs() <= 0.5).sum().item() for u in range(4)]


@pytest.mark.parametrize("shape", [(0, 5), (6, 0), (0, 0)])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("mode,k", [("consecutive", 2), ("base", 4), ("given", 1)])
def test_zero_size(backend, shape, axis, mode, k):
    """Zero-size dimensions in any position: U = shape[axis] // block units with zero statistics."""
    name, device = backend
    ws = [torch.empty(shape, dtype=DTYPES[i % 3], device=device) for i in range(k)]
    m = k if mode == "given" else k - 1
    for index, block in [(None, 1), (None, 3), ([], 1)] + ([([shape[axis] - 1, 0, 0], 1)] if shape[axis] else []):
        if shape[axis] % block:
            continue
        g = L.unit_gram(ws, axis=axis, block=block, mode=mode, index=index, atol=1e-3, rtol=1e-2, backend=name)
        u = shape[axis] // block if index is None else len(index)
        assert g.gram.shape == (u, m, m) and g.zeros.shape == (u, m) and g.zeros.dtype == torch.int64
        for t in g:
            assert not t.any(), "statistics of empty units must be 0"


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 24), cols=st.integers(0, 24), k=st.integers(1, 6), axis=st.sampled_from([0, 1]),
       mode=st.sampled_from(["consecutive", "base", "given"]), block=st.integers(1, 4),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=3),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), index_layout=st.sampled_from(INDEX_LAYOUTS),
       data=st.data())
def test_property(backend, rows, cols, k, axis, mode, block, dtypes, layout, index_layout, data):
    """Every backend against the reference: odd and zero-size shapes, mixed dtypes, any strides, ids as lists,
    tensors, strided / int32 / expanded views."""
    name, device = backend
    if is_slow(name):
        rows, cols, k = min(rows, 10), min(cols, 10), min(k, 4)
    if mode != "given" and k < 2:
        k = 2
    shape = [rows, cols]
    shape[axis] -= shape[axis] % block  # may leave 0 units
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    ws = _inputs(k, tuple(shape), dtypes, device, gen, layout=layout, shared_rows=(0,))
    n_units = shape[axis] // block
    index = data.draw(st.none() | st.lists(st.integers(0, n_units - 1), max_size=8)) if n_units else \
        data.draw(st.none() | st.just([]))
    if index is not None:
        index = index_as(index, index_layout)
    atol, rtol = data.draw(st.sampled_from([(1e-3, 1e-2), (0.0, 0.0), (1e-2, 0.0), (0.0, 1e-1)]))
    _check(backend, ws, axis=axis, block=block, mode=mode, index=index, atol=atol, rtol=rtol)


def _guarded(shape, dtype):
    """A tensor filling whole pages with inaccessible pages right before and after it (libc mmap + mprotect), so
    that any read outside its storage crashes the test; returns it and a function that unmaps it."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    assert nbytes % page == 0
    base = libc.mmap(None, nbytes + 2 * page, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    assert libc.mprotect(base, page, 0) == 0 and libc.mprotect(base + page + nbytes, page, 0) == 0
    buf = (ctypes.c_char * nbytes).from_address(base + page)
    return torch.frombuffer(buf, dtype=dtype).view(shape), lambda: libc.munmap(base, nbytes + 2 * page)


@pytest.mark.parametrize("listed", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_listed_columns_read_nothing_outside_the_tensor(backend, dtype, listed):
    """The listed-column gathers read the 32-bit word that ends with each 16-bit element: never before the first
    element (column 0 of row 0 is listed) or after the last (the last column of the last row). Sparse lists are
    gathered; dense ones (a third of the lines or more) are read in place with AMD's tuning on AVX-512."""
    name, device = backend
    if name != "cpu":
        pytest.skip("checks the C++ gathers of the cpu backend")
    shape = (16, 1024)  # whole pages
    gen = torch.Generator().manual_seed(7)
    guarded, unmaps = [], []
    try:
        for i in range(3):
            t, unmap = _guarded(shape, dtype)
            unmaps.append(unmap)
            t.copy_(rand(shape, dtype, device, gen, scale=1.0 + i))
            guarded.append(t)
        dense = [0, 3, 17, 31, 32] + list(range(40, 1024, 3))
        index = torch.tensor([0, 3, 17, 500, 1023] if listed == "sparse" else dense)
        for k in (2, 3):
            got = L.unit_gram(guarded[:k], axis=1, index=index, backend=name)
            ref = L.unit_gram(guarded[:k], axis=1, index=index, backend="reference")
            assert_gram_close(got, ref, shape[0])
    finally:
        guarded.clear()
        t = None
        for unmap in unmaps:
            unmap()


@pytest.mark.parametrize("atol", [0.0, 1e-40, 1e-3, 3.0e38, float("inf")])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_counts_at_their_edges(backend, atol, axis):
    """Exact zeros and near zeros (|d| <= atol, rtol = 0: a constant bound) exactly as the reference on deltas at and
    around the bound (signed zeros, subnormals, inf, NaN), on units wide enough for every vector path."""
    name, device = backend
    a = torch.tensor(atol)
    edge = [0.0, -0.0, 1e-40, -1e-40, 1e-3, -1e-3, 3.0e38, float("inf"), -float("inf"), float("nan"), atol, -atol,
            torch.nextafter(a, torch.tensor(float("inf"))).item(), torch.nextafter(a, torch.tensor(0.0)).item()]
    gen = torch.Generator().manual_seed(12)
    vals = torch.tensor(edge, dtype=torch.float32)
    n = 9 if is_slow(name) else 67
    d = vals[torch.randint(len(edge), (n, n + 3), generator=gen)]
    ws = [torch.zeros_like(d).to(device), d.to(device)]  # consecutive: the delta is d exactly
    got = [t.cpu() for t in L.unit_gram(ws, axis=axis, atol=atol, backend=name)]
    ref = L.unit_gram([w.cpu() for w in ws], axis=axis, atol=atol, backend="reference")
    assert torch.equal(got[3], ref.zeros) and torch.equal(got[4], ref.near_zeros), "counts"
    assert torch.equal(got[2], ref.abs_max), "abs_max"
