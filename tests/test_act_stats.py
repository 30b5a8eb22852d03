"""act_stats_ against the float64 reference on every backend: dtypes, leading shapes, strides, masks, accumulation."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpt_kernels as L
from conftest import BF16, DTYPES, PROPERTY_EXAMPLES, is_slow


def _check(got, ref, n_tokens):
    g, r = got.cpu(), ref.cpu()
    assert torch.equal(g[0], r[0]), "token counts"
    assert torch.equal(g[3], r[3]), "max |x|"
    assert torch.equal(g[4], r[4]), "active counts"
    tol = 1e-5 * max(1.0, n_tokens ** 0.5 / 16)
    assert torch.allclose(g[1:3], r[1:3], rtol=tol, atol=1e-12), f"sums: {(g[1:3] - r[1:3]).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(37,), (3, 11), (2, 3, 5)])
def test_against_reference(backend, dtype, lead):
    name, device = backend
    c = 13 if is_slow(name) else 301
    gen = torch.Generator().manual_seed(len(lead))
    x = (torch.randn(*lead, c, generator=gen) * 3).to(dtype).to(device)
    init = torch.rand(5, c, generator=gen, dtype=torch.float64).to(device)  # accumulation onto existing values
    got = L.act_stats_(x, init.clone(), threshold=0.5, backend=name)
    ref = L.act_stats_(x, init.clone(), threshold=0.5, backend="reference")
    _check(got, ref, x.numel() // c)


def test_mask_strides_and_repeated_calls(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(5)
    t, c = (9, 10) if is_slow(name) else (70, 129)
    base = torch.randn(2, t, 2 * c, generator=gen).to(torch.bfloat16).to(device)
    x = base[:, :, ::2]  # non-contiguous channels
    mask = torch.rand(2, t, generator=gen) > 0.4
    mask[0, :] = False  # a fully padded sequence
    stats, ref = L.new_act_stats(c, device), L.new_act_stats(c, device)
    for _ in range(3):
        L.act_stats_(x, stats, token_mask=mask.to(device), backend=name)
        L.act_stats_(x, ref, token_mask=mask.to(device), backend="reference")
    _check(stats, ref, 3 * t)
    assert stats[0, 0].item() == 3 * mask.sum().item()


def test_strided_stats_and_empty_input(backend):
    name, device = backend
    c = 7
    holder = torch.zeros(c, 5, dtype=torch.float64, device=device)
    stats = holder.t()  # a [5, C] view with strides (1, 5)
    x = torch.randn(4, c).to(device)
    L.act_stats_(x, stats, threshold=0.0, backend=name)
    ref = L.act_stats_(x, L.new_act_stats(c, device), backend="reference")
    _check(stats, ref, 4)
    before = stats.clone()
    L.act_stats_(torch.empty(0, c, device=device), stats, backend=name)
    assert torch.equal(stats, before)


def test_noncontiguous_mask_and_stats(backend):
    """A token mask that is a strided view (every other column of a larger bool tensor, and a transposed one) and
    stats that are a transposed view are read and written through their strides."""
    name, device = backend
    gen = torch.Generator().manual_seed(8)
    t, c = (6, 9) if is_slow(name) else (40, 70)
    x = torch.randn(2, t, c, generator=gen).to(device)
    wide = torch.rand(2, 2 * t, generator=gen) > 0.5
    for mask in (wide[:, ::2], (torch.rand(t, 2, generator=gen) > 0.3).t()):
        assert not mask.is_contiguous()
        stats = torch.rand(c, 5, dtype=torch.float64, generator=gen).to(device).t()
        want = stats.clone()
        L.act_stats_(x, stats, token_mask=mask.to(device), threshold=0.25, backend=name)
        L.act_stats_(x, want, token_mask=mask.contiguous().to(device), threshold=0.25, backend="reference")
        _check(stats, want, t)
    flat = torch.rand(3 * t, generator=gen) > 0.5  # one sequence: a 1-D mask with stride 3
    x1 = x[0]
    stats, want = L.new_act_stats(c, device), L.new_act_stats(c, device)
    L.act_stats_(x1, stats, token_mask=flat[::3].to(device), backend=name)
    L.act_stats_(x1, want, token_mask=flat[::3].contiguous().to(device), backend="reference")
    _check(stats, want, t)


@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (0, 0), (2, 0, 7), (0, 3, 0), (7,), (0,)])
def test_zero_size_and_one_token(backend, shape):
    """Leading dimensions of size 0 add nothing; C == 0 has no statistics to add; a 1-D x [C] is one token."""
    name, device = backend
    gen = torch.Generator().manual_seed(2)
    c = shape[-1]
    x = torch.randn(shape, generator=gen).to(torch.bfloat16).to(device)
    init = torch.rand(5, c, dtype=torch.float64, generator=gen).to(device)
    got = L.act_stats_(x, init.clone(), threshold=0.1, backend=name)
    ref = L.act_stats_(x, init.clone(), threshold=0.1, backend="reference")
    _check(got, ref, 1)
    tokens = x.numel() // c if c else 0
    assert torch.equal(got[0].cpu(), init[0].cpu() + tokens)
    if x.dim() == 1:  # the mask of one token is 0-d
        got = L.act_stats_(x, init.clone(), token_mask=torch.tensor(False, device=device), backend=name)
        assert torch.equal(got.cpu(), init.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_rule(backend, dtype):
    """max|x| ignores NaN (0 for a channel of NaN only) while sums propagate it; NaN is not > threshold. Channels of
    NaN only inside the vector strips as well as in the scalar tail."""
    name, device = backend
    c = 37
    x = torch.randn(70, c).to(dtype)
    x[2, 1] = float("nan")
    nan_only = [3, 20, c - 1]
    x[:, nan_only] = float("nan")
    for b in (name, "reference"):
        s = L.act_stats_(x.to(device), L.new_act_stats(c, device), threshold=0.0, backend=b).cpu()
        assert torch.equal(s[3], torch.nan_to_num(x.float(), nan=0.0).abs().amax(0).double()), b
        assert s[1].isnan().nonzero().flatten().tolist() == [1, *nan_only], b
        assert torch.equal(s[4], (x.abs() > 0).sum(0).double()), b


def _triton_programs(monkeypatch, n):
    import importlib
    monkeypatch.setattr(importlib.import_module("lpt_kernels.backends.triton.act_stats"), "TARGET_PROGRAMS", n)


def test_many_chunks(backend, monkeypatch):
    """Several token chunks per channel tile (the GPU grid's split, forced here off CUDA), with a mask."""
    name, device = backend
    if name == "triton":
        _triton_programs(monkeypatch, 5)
    gen = torch.Generator().manual_seed(6)
    t, c = (300, 11) if is_slow(name) else (3000, 33)
    x = torch.randn(t, c, generator=gen).to(torch.float16)
    mask = torch.rand(t, generator=gen) > 0.2
    got = L.act_stats_(x.to(device), L.new_act_stats(c, device), token_mask=mask.to(device), backend=name)
    _check(got, L.act_stats_(x, L.new_act_stats(c), token_mask=mask, backend="reference"), t)


def test_long_runs_fold_into_float64(backend, monkeypatch):
    """4096 tokens in one chunk (one program per channel tile): the fp32 sums are folded into float64 every few
    hundred tokens, so their error does not grow with the token count. |x| = 1000.1 rounds the same way at every
    fp32 addition: a sum kept in fp32 over all the tokens is ~4e-6 off, folded sums ~2.5e-7."""
    name, device = backend
    if name == "triton":
        _triton_programs(monkeypatch, 1)
    t, c = 4096, 2
    x = torch.full((t, c), 1000.1, dtype=torch.float32)
    x[::2, 1] *= -1
    got = L.act_stats_(x.to(device), L.new_act_stats(c, device), backend=name).cpu()
    exact = x.double().abs().sum(0)
    err = ((got[1] - exact).abs() / exact).max().item()
    assert err < 1.5e-6, f"abs_sum relative error {err:.1e}"
    exact_sq = (x.double() ** 2).sum(0)
    assert ((got[2] - exact_sq).abs() / exact_sq).max().item() < 1.5e-6


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lead=st.lists(st.integers(0, 5), min_size=0, max_size=2), t=st.integers(0, 40), c=st.integers(0, 70),
       dtype=st.sampled_from(DTYPES), masked=st.booleans(), mask_layout=st.sampled_from(["contiguous", "strided"]),
       stats_layout=st.sampled_from(["contiguous", "transposed"]), x_layout=st.sampled_from(["contiguous", "sliced"]),
       threshold=st.floats(0, 2), seed=st.integers(0, 2 ** 31))
def test_property(backend, lead, t, c, dtype, masked, mask_layout, stats_layout, x_layout, threshold, seed):
    """Every backend against the reference: any leading shape (zero sizes included), strided x, masks and stats."""
    name, device = backend
    if is_slow(name):
        t, c = min(t, 12), min(c, 20)
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, t, c)
    x = torch.randn(shape, generator=gen).to(dtype)
    if x_layout == "sliced":
        x = torch.cat([x, x], -1)[..., ::2]
    mask = None
    if masked:
        mask = torch.rand(*lead, 2 * t, generator=gen) > 0.5
        mask = mask[..., ::2] if mask_layout == "strided" else mask[..., :t].contiguous()
    init = torch.rand(5, c, dtype=torch.float64, generator=gen)
    stats = torch.empty(c, 5, dtype=torch.float64, device=device).t() if stats_layout == "transposed" else \
        torch.empty(5, c, dtype=torch.float64, device=device)
    stats.copy_(init)
    got = L.act_stats_(x.to(device), stats, token_mask=None if mask is None else mask.to(device),
                       threshold=threshold, backend=name)
    ref = L.act_stats_(x, init.clone(), token_mask=mask, threshold=threshold, backend="reference")
    _check(got, ref, max(t, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [float("-inf"), -1.0, -0.0, 0.0, 1e-40, 0.5, 0.3, 3.0e38, float("inf")])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_active_count_at_its_edges(backend, threshold, dtype):
    """count(|x| > threshold) and max|x| exactly as the reference on values at and around the threshold (signed
    zeros, subnormals, inf, NaN; the neighbours in x's dtype, of a threshold that dtype can and cannot hold), on
    channels wide enough for every vector path and tokens over several blocks."""
    name, device = backend
    edge = torch.tensor([0.0, 1e-40, 0.5, 0.3, 3.0e38, float("inf"), float("nan"), threshold]).to(dtype)
    t = torch.tensor(threshold).to(dtype)
    if t.isfinite():  # the neighbours of the threshold as x's dtype rounds it
        edge = torch.cat([edge, torch.nextafter(t, torch.tensor(0.0, dtype=dtype)).view(1),
                          torch.nextafter(t, torch.tensor(float("inf"), dtype=dtype)).view(1)])
    edge = torch.cat([edge, -edge])
    if is_slow(name) and dtype == BF16:  # Triton's interpreter widens bf16 subnormals to 0 (a GPU shifts the bits)
        edge = edge[(edge.float().abs() >= torch.finfo(torch.float32).tiny) | (edge == 0) | edge.isnan()]
    gen = torch.Generator().manual_seed(11)
    c = 19 if is_slow(name) else 131
    x = edge[torch.randint(len(edge), (70, c), generator=gen)]
    got = L.act_stats_(x.to(device), L.new_act_stats(c, device), threshold=threshold, backend=name).cpu()
    ref = L.act_stats_(x, L.new_act_stats(c), threshold=threshold, backend="reference")
    assert torch.equal(got[4], ref[4]), "active counts"
    assert torch.equal(got[3], ref[3]), "max |x|"


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 1e-40, 0.3, 0.5, 3.3895e38])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # inf and NaN inputs, on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_every_bf16_pattern(backend, threshold):
    """All 65536 bf16 bit patterns (NaNs with payloads and signs, subnormals, infinities), shuffled over 32 channels:
    counts and maxima exactly as the reference (the CPU kernel works on the 16-bit patterns themselves)."""
    name, device = backend
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    if is_slow(name):  # Triton's interpreter widens bf16 subnormals to 0 (see test_active_count_at_its_edges)
        x = x[(x.float().abs() >= torch.finfo(torch.float32).tiny) | (x == 0) | x.isnan()]
        x = x[: x.numel() // 32 * 32]
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(5))].view(-1, 32)
    got = L.act_stats_(x.to(device), L.new_act_stats(32, device), threshold=threshold, backend=name).cpu()
    ref = L.act_stats_(x, L.new_act_stats(32), threshold=threshold, backend="reference")
    assert torch.equal(got[4], ref[4]), "active counts"
    assert torch.equal(got[3], ref[3]), "max |x|"
