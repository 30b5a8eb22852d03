"""pytest-benchmark timings of every op (CPU backend) beside its torch eager peer, at sizes beyond the L3.

Not part of the test suite (the suite's testpaths is tests/, and benchmarks/conftest.py skips these unless asked):

    pytest benchmarks/ --benchmark-only [--benchmark-group-by=group] [--benchmark-json=out.json]

Each benchmark rotates through a few input sets (together 150-250 MB, beyond the 105 MB L3) so repeated rounds do
not read from the cache, and stores ``bytes`` (the minimum bytes one call must move) and ``GB/s`` (bytes / median) in
its extra_info. The peers are the same functions as in bench_ops.py. For the read ceiling, the torch.compile peers and
the table, run ``python benchmarks/bench_ops.py``.
"""
import itertools

import pytest
import torch

import lpt_kernels
from bench_ops import (ACT_THRESHOLD, ATOL, HIDDEN, INTER, act_stats_peer, chunks_of_permutation, make_chain,
                       masked_cosine_peer, rollback_peer, unit_gram_peer)

pytestmark = pytest.mark.bench

ROUNDS = {"lpt": 15, "eager": 3}


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    d = {"gate": make_chain(6, (INTER, HIDDEN), gen),        # 6 x 50 MB
         "down": make_chain(4, (HIDDEN, INTER), gen),        # 4 x 50 MB
         "acts": [torch.randn(4096, INTER, generator=gen).to(torch.bfloat16) for _ in range(2)]}  # 2 x 80 MB
    d["targets"] = [w.clone() for w in d["gate"][3:5]]      # rollback targets; sources are gate[0:2]
    d["gen"] = gen
    return d


def _run(benchmark, fn, sets, nbytes, impl):
    """Time fn(set) over the rotating sets; record the bytes and the GB/s of the median."""
    it = itertools.cycle(sets)
    benchmark.extra_info["bytes"] = nbytes
    benchmark.pedantic(lambda: fn(next(it)), rounds=ROUNDS[impl], iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 3)


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("impl", ["lpt", "eager"])
@pytest.mark.parametrize("k,axis", [(2, 0), (5, 0), (2, 1)], ids=["K2-axis0", "K5-axis0", "K2-axis1"])
def test_unit_gram(benchmark, data, impl, k, axis):
    chain = data["gate"] if axis == 0 else data["down"]
    if k == 2:
        sets = [tuple(chain[i:i + 2]) for i in range(0, 4, 2)]  # two disjoint pairs: 200 MB
    else:
        sets = [tuple(chain[0:5])]                              # 250 MB, read in one pass
    benchmark.group = f"unit_gram K={k} axis={axis}"
    if impl == "lpt":
        def fn(s):
            return lpt_kernels.unit_gram(list(s), axis=axis, mode="consecutive", atol=ATOL, backend="cpu")
    else:
        peer = unit_gram_peer(axis, ATOL, 0.0)

        def fn(s):
            return peer(*s)
    _run(benchmark, fn, sets, _nbytes(sets[0]), impl)


@pytest.mark.parametrize("impl", ["lpt", "eager"])
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_masked_cosine(benchmark, data, impl, axis):
    chain = data["gate"] if axis == 0 else data["down"]
    n_units = chain[0].shape[axis]
    u = round(0.10 * n_units)
    idxs = chunks_of_permutation(n_units, u, 10, data["gen"])  # disjoint index sets: touched rows stay cold
    sets = [(chain[0], chain[1], chain[2], i) for i in idxs]
    benchmark.group = f"masked_cosine 10% axis={axis}"
    if impl == "lpt":
        def fn(s):
            return lpt_kernels.masked_cosine((s[0], s[1]), (s[1], s[2]), s[3], axis=axis, backend="cpu")
    else:
        peer = masked_cosine_peer(axis)

        def fn(s):
            return peer(*s)
    _run(benchmark, fn, sets, 3 * u * chain[0].shape[1 - axis] * chain[0].element_size(), impl)


@pytest.mark.parametrize("impl", ["lpt", "eager"])
def test_act_stats(benchmark, data, impl):
    sets = [(x, lpt_kernels.new_act_stats(x.shape[-1])) for x in data["acts"]]
    benchmark.group = "act_stats_"
    if impl == "lpt":
        def fn(s):
            return lpt_kernels.act_stats_(s[0], s[1], threshold=ACT_THRESHOLD, backend="cpu")
    else:
        fn = (lambda peer: (lambda s: peer(*s)))(act_stats_peer(ACT_THRESHOLD))
    _run(benchmark, fn, sets, _nbytes([data["acts"][0]]), impl)


@pytest.mark.parametrize("impl", ["lpt", "eager"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_rollback(benchmark, data, impl, alpha):
    targets, sources = data["targets"], data["gate"][0:2]
    rows, cols = targets[0].shape
    u = round(0.02 * rows)
    idxs = chunks_of_permutation(rows, u, rows // u, data["gen"])
    sets = [(t, s, i) for i in idxs for t, s in zip(targets, sources)]
    benchmark.group = f"rollback_ 2% rows alpha={alpha:g}"
    if impl == "lpt":
        def fn(s):
            return lpt_kernels.rollback_(s[0], s[1], s[2], alpha=alpha, backend="cpu")
    else:
        fn = (lambda peer: (lambda s: peer(*s)))(rollback_peer(alpha))
    ROUNDS_RB = {"lpt": 200, "eager": 50}  # sub-millisecond calls: more rounds
    it = itertools.cycle(sets)
    nbytes = 3 * u * cols * targets[0].element_size()
    benchmark.extra_info["bytes"] = nbytes
    benchmark.pedantic(lambda: fn(next(it)), rounds=ROUNDS_RB[impl], iterations=1, warmup_rounds=2)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 3)
