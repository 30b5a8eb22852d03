"""Bad inputs raise ValueError/TypeError naming the argument, and leave outputs untouched."""
import pytest
import torch

import lpt_kernels as L

W = torch.randn(6, 4)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(ws=[W.int(), W.int()]), TypeError, "ws[0]"),
    (dict(ws=[W, torch.randn(6, 5)]), ValueError, "ws[1]"),
    (dict(ws=[W.reshape(-1), W.reshape(-1)]), ValueError, "ws[0]"),
    (dict(ws=[W]), ValueError, "ws"),
    (dict(ws=[W] * 9), ValueError, "ws"),
    (dict(ws=W), TypeError, "ws"),
    (dict(ws=[W, W], axis=2), ValueError, "axis"),
    (dict(ws=[W, W], block=4), ValueError, "block"),
    (dict(ws=[W, W], block=0), ValueError, "block"),
    (dict(ws=[W, W], mode="delta"), ValueError, "mode"),
    (dict(ws=[W, W], index=[6]), ValueError, "index"),
    (dict(ws=[W, W], index=[-1]), ValueError, "index"),
    (dict(ws=[W, W], index=[[0]]), ValueError, "index"),
    (dict(ws=[W, W], index=[0.5]), TypeError, "index"),
    (dict(ws=[W, W], atol=-1.0), ValueError, "atol"),
    (dict(ws=[W, W], backend="gpu"), ValueError, "backend"),
    (dict(ws=[W, W], backend="cuda"), (ValueError, RuntimeError), "cuda"),
])
def test_unit_gram_errors(kwargs, exc, word):
    ws = kwargs.pop("ws")
    with pytest.raises(exc) as e:
        L.unit_gram(ws, **kwargs)
    assert word in str(e.value)


def test_device_mix_rejected():
    with pytest.raises(ValueError, match=r"ws\[1\]"):
        L.unit_gram([W, W.to("meta")])


def test_act_stats_errors_leave_stats_untouched():
    stats = torch.rand(5, 4, dtype=torch.float64)
    before = stats.clone()
    x = torch.randn(3, 4)
    cases = [
        (dict(x=x.int()), TypeError, "x"),
        (dict(x=torch.randn(3, 5)), ValueError, "stats"),
        (dict(stats=stats.float()), TypeError, "stats"),
        (dict(token_mask=torch.ones(3)), TypeError, "token_mask"),
        (dict(token_mask=torch.ones(4, dtype=torch.bool)), ValueError, "token_mask"),
        (dict(threshold="a"), TypeError, "threshold"),
    ]
    for kw, exc, word in cases:
        args = dict(x=x, stats=stats)
        args.update(kw)
        with pytest.raises(exc, match=word):
            L.act_stats_(args.pop("x"), args.pop("stats"), **args)
        assert torch.equal(stats, before)


def test_rollback_errors_leave_target_untouched():
    target = torch.randn(6, 4)
    before = target.clone()
    cases = [
        (dict(source=torch.randn(6, 5)), ValueError, "source"),
        (dict(source=torch.randn(6, 4).int()), TypeError, "source"),
        (dict(index=[1, 6]), ValueError, "index"),
        (dict(index=[-2, 1]), ValueError, "index"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(block=4), ValueError, "block"),
        (dict(axis=-1), ValueError, "axis"),
        (dict(backend="nope"), ValueError, "backend"),
    ]
    for kw, exc, word in cases:
        args = dict(source=torch.randn(6, 4), index=[1, 2])
        args.update(kw)
        with pytest.raises(exc, match=word):
            L.rollback_(target, args.pop("source"), args.pop("index"), **args)
        assert torch.equal(target, before), f"target changed by a failed call {kw}"


def test_rollback_refuses_grad_leaf():
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="target"):
        L.rollback_(p, torch.randn(4, 3), [0])
    with torch.no_grad():
        L.rollback_(p, torch.zeros(4, 3), [0])
    assert torch.equal(p[0].detach(), torch.zeros(3))


def test_in_place_ops_follow_torchs_rules():
    """rollback_ and act_stats_ write through a pointer: they bump the version counter as torch's in-place ops do
    (autograd then refuses a backward through changed values) and refuse what torch refuses: one memory location
    for several elements, an inference tensor outside inference mode, a tensor that requires grad."""
    p = torch.randn(6, 4, requires_grad=True)
    y = (p * p).sum()
    with torch.no_grad():
        L.rollback_(p, torch.zeros(6, 4), [0, 2])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    stats = L.new_act_stats(4)
    v = stats._version
    L.act_stats_(torch.randn(3, 4), stats)
    assert stats._version > v

    for target in (torch.zeros(1, 4).expand(6, 4), torch.zeros(24).as_strided((6, 4), (2, 1))):
        with pytest.raises(ValueError, match="target: its elements may share memory"):
            L.rollback_(target, torch.randn(6, 4), [0, 2])
        assert not target.any()
    stats = torch.zeros(5, 1, dtype=torch.float64).expand(5, 4)
    with pytest.raises(ValueError, match="stats: its elements may share memory"):
        L.act_stats_(torch.ones(2, 4), stats)
    assert not stats.any()
    for target in (torch.randn(4, 6).t(), torch.randn(6, 8)[:, ::2], torch.randn(1, 4).expand(1, 4)):  # distinct
        L.rollback_(target, torch.zeros(6, 4) if target.shape[0] == 6 else torch.zeros(1, 4), [0])
        assert not target[0].any()

    w = torch.arange(24.).reshape(6, 4)  # a source overlapping the target in part: refused (torch's copy_ too)
    for target, source in ((w[1:], w[:-1]), (w[:4], w[:4].t()), (w[:, ::2], w[:, 1::2])):
        with pytest.raises(ValueError, match="source: shares memory with target"):
            L.rollback_(target, source, [0, 1])
    assert torch.equal(w, torch.arange(24.).reshape(6, 4))
    L.rollback_(w, w, [0, 1])  # the same view: nothing changes, as w.copy_(w)
    assert torch.equal(w, torch.arange(24.).reshape(6, 4))
    L.rollback_(torch.empty(0, 1).expand(0, 5), torch.empty(0, 5), [])  # no element, nothing shared
    L.act_stats_(torch.randn(3, 0), torch.zeros(1, 0, dtype=torch.float64).expand(5, 0))
    with pytest.raises(ValueError, match="source: a meta tensor"):
        L.rollback_(torch.zeros(6, 4), torch.zeros(6, 4, device="meta"), [0])

    with torch.inference_mode():
        it, ist = torch.zeros(6, 4), L.new_act_stats(4)
    with pytest.raises(RuntimeError, match="target: an inference tensor"):
        L.rollback_(it, torch.ones(6, 4), [0])
    with pytest.raises(RuntimeError, match="stats: an inference tensor"):
        L.act_stats_(torch.ones(2, 4), ist)
    assert not it.any() and not ist.any()
    with torch.inference_mode():
        L.rollback_(it, torch.ones(6, 4), [0])
        L.act_stats_(torch.ones(2, 4), ist)
    assert it[0].eq(1).all() and ist[0].eq(2).all()
    with pytest.raises(ValueError, match="stats: requires grad"):
        L.act_stats_(torch.ones(2, 4), L.new_act_stats(4).requires_grad_())


def test_numpy_scalars_and_odd_ids():
    np = pytest.importorskip("numpy")
    g = L.unit_gram([W, W * 2], atol=np.float32(1e-3), axis=np.int64(1), block=np.int64(2))
    assert torch.equal(g.gram, L.unit_gram([W, W * 2], atol=1e-3, axis=1, block=2).gram)
    t = torch.zeros(6, 4)
    L.rollback_(t, torch.ones(6, 4), np.array([1]), alpha=np.float32(0.5))
    assert t[1].eq(0.5).all() and t.sum() == 2
    with pytest.raises(ValueError, match="index: unit id 9223372036854775808 out of range"):
        L.masked_cosine(W, W, torch.tensor([2**63], dtype=torch.uint64))
    with pytest.raises(TypeError, match="index: a meta tensor"):
        L.masked_cosine(W, W, torch.tensor([0], device="meta"))
    t = torch.zeros(8, 4)
    L.rollback_(t, torch.ones(8, 4), np.argsort(np.array([5., 1., 7., 3., 0., 2., 6., 4.]))[::-1][:3])  # top 3
    assert t.sum(1).tolist() == [4, 0, 4, 0, 0, 0, 4, 0]  # rows 2, 6, 0: the three largest


def test_bad_backend_from_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("LPT_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"LPT_BACKEND \(environment\): unknown backend 'bogus'"):
        L.unit_gram([W, W])
    monkeypatch.setenv("LPT_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"LPT_BACKEND \(environment\): 'cuda' runs on CUDA tensors"):
        L.unit_gram([W, W])


def test_masked_cosine_errors():
    with pytest.raises(ValueError, match="index"):
        L.masked_cosine(W, W, None)
    with pytest.raises(ValueError, match="index"):
        L.masked_cosine(W, W, [9])
    with pytest.raises(TypeError, match="u"):
        L.masked_cosine((W,), W, [0])
    with pytest.raises(ValueError, match="v"):
        L.masked_cosine(W, torch.randn(5, 4), [0])
    # a pair beside an update: the shapes are checked before the pair's difference is formed
    with pytest.raises(ValueError, match=r"u\[1\]: shape \(5, 4\) differs from u\[0\]'s \(6, 4\)"):
        L.masked_cosine((W, W[:5]), W, [0])
    with pytest.raises(ValueError, match=r"v\[1\]: shape \(5, 4\) differs from u's \(6, 4\)"):
        L.masked_cosine(W, (W, W[:5]), [0])
    with pytest.raises(ValueError, match=r"v\[0\]: on meta, but u\[0\] is on cpu"):
        L.masked_cosine((W, W), (W.to("meta"), W), [0])


def test_c_extension_rejects_bad_arguments_without_crashing():
    """The C++ layer checks what it relies on: a direct bad call is a Python exception, not a segfault."""
    from lpt_kernels.backends import cpu
    if not cpu.AVAILABLE:
        pytest.skip("CPU extension not built")
    with pytest.raises(ValueError):
        cpu._C.unit_gram([0], [1], [1], [1], 2, 2, 0, 1, 2, 0, 2, 0.0, 0.0, 0, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError):
        cpu._C.unit_gram([W.data_ptr()], [7], [4], [1], 6, 4, 0, 1, 2, 0, 6, 0.0, 0.0, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        cpu._C.set_isa("sse9")


NON_FLOAT = [torch.int8, torch.uint8, torch.int32, torch.bool, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


def _as(dtype, t):
    return t.to(dtype) if dtype != torch.bool else t > 0


def _one_line_naming(e, *words):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("dtype", NON_FLOAT, ids=str)
def test_non_float_dtypes_name_argument_and_dtype(dtype):
    """Quantized or integer data (int8/uint8 packs, float8 codes) is refused with a one-line TypeError naming the
    argument and the dtype, by every op, through the public functions and the torch.ops entry points alike."""
    bad = _as(dtype, torch.randn(6, 4) * 3)
    good = torch.randn(6, 4)
    stats = L.new_act_stats(4)
    calls = [
        (lambda: L.unit_gram([good, bad]), "ws[1]"),
        (lambda: L.masked_cosine(bad, good, [0]), "u"),
        (lambda: L.masked_cosine(good, (good, bad), [0]), "v[1]"),
        (lambda: L.act_stats_(bad, stats), "x"),
        (lambda: L.rollback_(good.clone(), bad, [1]), "source"),
        (lambda: L.rollback_(bad.clone(), good, [1]), "target"),
        (lambda: torch.ops.lpt.unit_gram(ws=[good, bad], axis=0, block=1, mode="consecutive", index=None, atol=0.0,
                                         rtol=0.0, backend="cpu"), "ws[1]"),
        (lambda: torch.ops.lpt.act_stats_(bad, stats, None, 0.0, "cpu"), "x"),
        (lambda: torch.ops.lpt.rollback_(good.clone(), bad, torch.tensor([1]), 0, 1, 1.0, False, "cpu"), "source"),
        (lambda: torch.ops.lpt.masked_cosine([good, bad], "given", 0, 1, torch.tensor([0]), 0, 1, "cpu"), "ws[1]"),
    ]
    for call, arg in calls:
        with pytest.raises(TypeError) as e:
            call()
        _one_line_naming(e, arg, str(dtype))
    assert torch.equal(stats, L.new_act_stats(4))


def test_backend_entry_points_name_argument_and_dtype():
    """The CPU backend's own entry points say which argument has which dtype (not a bare KeyError)."""
    from lpt_kernels.backends import cpu
    if not cpu.AVAILABLE:
        pytest.skip("CPU extension not built")
    bad = torch.zeros(3, 2, dtype=torch.int8)
    with pytest.raises(TypeError) as e:
        cpu.unit_gram([torch.zeros(3, 2), bad], 0, 1, "consecutive", None, 0.0, 0.0)
    _one_line_naming(e, "ws[1]", "torch.int8")
    with pytest.raises(TypeError) as e:
        cpu.act_stats_(bad, L.new_act_stats(2), None, 0.0)
    _one_line_naming(e, "x", "torch.int8")


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_two_d_ops_refuse_other_ranks(shape):
    """unit_gram, masked_cosine and rollback_ work on weight matrices: 0-d, 1-D and 3-D tensors are refused with
    one line naming the argument and the shape (zero-size 2-D tensors are fine); act_stats_ refuses only 0-d x."""
    t = torch.zeros(shape)
    with pytest.raises(ValueError) as e:
        L.unit_gram([t, t])
    _one_line_naming(e, "ws[0]", "2-D", str(tuple(shape)))
    with pytest.raises(ValueError) as e:
        L.masked_cosine(t, t, [])
    _one_line_naming(e, "u", "2-D")
    with pytest.raises(ValueError) as e:
        L.rollback_(t, t, [])
    _one_line_naming(e, "target", "2-D")
    if shape == ():
        with pytest.raises(ValueError) as e:
            L.act_stats_(t, L.new_act_stats(1))
        _one_line_naming(e, "x", "0-d")


def test_c_extension_accepts_empty_tensors_and_refuses_null_data():
    """A zero-size tensor may carry a null data pointer; the C++ layer accepts that (nothing is read) and still
    refuses a null pointer for a tensor that has elements."""
    from lpt_kernels.backends import cpu
    if not cpu.AVAILABLE:
        pytest.skip("CPU extension not built")
    out = [torch.zeros(2, 1), torch.zeros(2, 1), torch.ones(2, 1), torch.ones(2, 1, dtype=torch.int64),
           torch.ones(2, 1, dtype=torch.int64)]
    ptrs = [o.data_ptr() for o in out]
    cpu._C.unit_gram([0, 0], [0, 0], [0, 0], [1, 1], 2, 0, 0, 1, 0, 0, 2, 0.0, 0.0, *ptrs[:1], ptrs[1], ptrs[2],
                     ptrs[3], ptrs[4], 1)
    assert not any(o.any() for o in out)
    with pytest.raises(ValueError, match="null data pointer"):
        cpu._C.unit_gram([0, 0], [0, 0], [2, 2], [1, 1], 2, 2, 0, 1, 0, 0, 2, 0.0, 0.0, *ptrs, 1)
    cpu._C.act_stats(0, 0, 0, 1, 0, 3, 0, L.new_act_stats(3).data_ptr(), 3, 1, 0.0, 1)
    cpu._C.rollback(0, 0, 0, 1, 0, 0, 0, 1, 0, 4, 0, 0, 0, 1, 1.0, False, 1)
