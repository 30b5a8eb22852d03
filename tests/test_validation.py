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


def test_masked_cosine_errors():
    with pytest.raises(ValueError, match="index"):
        L.masked_cosine(W, W, None)
    with pytest.raises(ValueError, match="index"):
        L.masked_cosine(W, W, [9])
    with pytest.raises(TypeError, match="u"):
        L.masked_cosine((W,), W, [0])
    with pytest.raises(ValueError, match="v"):
        L.masked_cosine(W, torch.randn(5, 4), [0])


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
