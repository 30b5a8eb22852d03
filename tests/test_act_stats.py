"""act_stats_ against the float64 reference on every backend: dtypes, leading shapes, strides, masks, accumulation."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpt_kernels as L
from conftest import DTYPES, is_slow


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


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(0, 40), c=st.integers(1, 70), dtype=st.sampled_from(DTYPES), masked=st.booleans(),
       threshold=st.floats(0, 2), seed=st.integers(0, 2 ** 31))
def test_property_cpu(t, c, dtype, masked, threshold, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=gen).to(dtype)
    mask = (torch.rand(t, generator=gen) > 0.5) if masked else None
    got = L.act_stats_(x, L.new_act_stats(c), token_mask=mask, threshold=threshold, backend="cpu")
    ref = L.act_stats_(x, L.new_act_stats(c), token_mask=mask, threshold=threshold, backend="reference")
    _check(got, ref, t)
