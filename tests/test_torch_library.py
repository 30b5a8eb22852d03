"""The ops as torch.library custom ops: opcheck, torch.compile(fullgraph=True), dispatch and fallbacks."""
import os
import subprocess
import sys

import pytest
import torch

import lpt_kernels as L
from lpt_kernels import ops


def _samples():
    w = [torch.randn(6, 4) for _ in range(3)]
    idx = torch.tensor([0, 2, 2])
    mask = torch.tensor([True, False, True, True, True])
    return [
        (torch.ops.lpt.unit_gram.default, (w, 0, 1, "consecutive", None, 1e-3, 0.0, "cpu")),
        (torch.ops.lpt.unit_gram.default, (w[:2], 1, 2, "given", idx[:1], 0.0, 0.0, "cpu")),
        (torch.ops.lpt.masked_cosine.default, (w, "consecutive", 0, 1, idx, 0, 1, "cpu")),
        (torch.ops.lpt.act_stats_.default, (torch.randn(5, 4), torch.zeros(5, 4, dtype=torch.float64), mask, 0.1,
                                            "cpu")),
        (torch.ops.lpt.rollback_.default, (torch.randn(6, 4), torch.randn(6, 4), torch.tensor([1, 3]), 0, 1, 0.5,
                                           False, "cpu")),
    ]


@pytest.mark.parametrize("op,args", _samples())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    w0, w1, w2 = (torch.randn(32, 16) for _ in range(3))
    x = torch.randn(4, 7, 16)

    def f(a, b, c, x, stats):
        g = L.unit_gram([a, b, c], atol=1e-3)
        pooled, _ = L.masked_cosine((a, b), (b, c), torch.arange(8))
        L.act_stats_(x, stats)
        return g.gram.sum() + g.zeros.sum() + pooled

    s1, s2 = L.new_act_stats(16), L.new_act_stats(16)
    got = torch.compile(f, fullgraph=True)(w0, w1, w2, x, s1)
    want = f(w0, w1, w2, x, s2)
    assert torch.allclose(got, want) and torch.equal(s1, s2)


def test_compile_rollback_in_place():
    t, s = torch.randn(8, 4), torch.randn(8, 4)
    t2 = t.clone()

    @torch.compile(fullgraph=True)
    def f(t, s):
        L.rollback_(t, s, torch.tensor([1, 5]))
        return t.sum()

    f(t, s)
    L.rollback_(t2, s, [1, 5])
    assert torch.equal(t, t2)


def test_backend_env_and_explicit():
    w = [torch.randn(4, 3), torch.randn(4, 3)]
    assert L.resolve_backend(None, torch.device("cpu")) in ("cpu", "reference")
    os.environ["LPT_BACKEND"] = "reference"
    try:
        assert L.resolve_backend(None, torch.device("cpu")) == "reference"
        ref = L.unit_gram(w)
    finally:
        del os.environ["LPT_BACKEND"]
    assert torch.allclose(L.unit_gram(w, backend="cpu").gram, ref.gram)
    assert "reference" in L.available_backends()


def test_missing_extension_degrades_with_one_warning():
    """With the CPU extension unimportable, the package still works through the reference backend, warns once,
    and an explicit request for the missing backend is a clear error."""
    code = r"""
import sys, warnings
sys.modules['lpt_kernels._C_cpu'] = None  # makes the import fail
import torch, lpt_kernels as L
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    w = [torch.randn(4, 3), torch.randn(4, 3)]
    L.unit_gram(w); L.unit_gram(w)
assert sum('falling back to the reference' in str(r.message) for r in rec) == 1, [str(r.message) for r in rec]
try:
    L.unit_gram(w, backend='cpu')
except RuntimeError as e:
    assert "backend 'cpu' is not available" in str(e)
else:
    raise AssertionError('no error')
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_isa_variants_listed():
    from lpt_kernels.backends import cpu
    assert cpu.isa() in ("base", "avx2", "avx512")


def test_eager_calls_skip_the_dispatcher_and_tracing_sees_the_ops():
    """Plain eager calls run the op's function directly (no torch._dynamo import, no dispatcher cost) with the op's
    results; a dispatch mode (as make_fx/export/FakeTensor use) sees the registered op."""
    code = ("import sys, torch, lpt_kernels as L\n"
            "w = [torch.randn(6, 4) for _ in range(3)]\n"
            "g = L.unit_gram(w); s = L.act_stats_(torch.randn(5, 4), L.new_act_stats(4))\n"
            "L.rollback_(w[0], w[1], [1]); L.masked_cosine((w[0], w[1]), (w[1], w[2]), [0, 2])\n"
            "p = torch.nn.Parameter(torch.randn(6, 4), requires_grad=False); L.rollback_(p, w[1], [2])\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    w = [torch.randn(6, 4) for _ in range(3)]
    t, t_op = w[0].clone(), w[0].clone()
    with Seen() as seen:
        traced = L.unit_gram(w, atol=1e-3)
        L.rollback_(t_op, w[1], [1, 4], alpha=0.5)
    assert "lpt.unit_gram.default" in seen.ops and "lpt.rollback_.default" in seen.ops
    eager = L.unit_gram(w, atol=1e-3)
    L.rollback_(t, w[1], [1, 4], alpha=0.5)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    assert torch.equal(t, t_op)
    assert not L.unit_gram([x.requires_grad_() for x in w]).gram.requires_grad


def test_eager_calls_restore_grad_mode():
    """The eager path turns autograd off for the kernel's call only: on return, on error, and inside no_grad."""
    w = [torch.randn(6, 4, requires_grad=True) for _ in range(3)]
    pooled, per_unit = L.masked_cosine((w[0], w[1]), (w[1], w[2]), [0, 5])
    assert torch.is_grad_enabled() and not pooled.requires_grad and not per_unit.requires_grad
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="unit id 6 out of range"):
            L.masked_cosine((w[0], w[1]), (w[1], w[2]), torch.tensor([0, 6]), backend=backend)
        assert torch.is_grad_enabled()
    with torch.no_grad():
        L.unit_gram(w)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_compiled_rollback_refuses_a_leaf_that_requires_grad():
    def f(w, s):
        L.rollback_(w, s, [0, 2])
        return w.sum()
    p, s = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6)
    before = p.detach().clone()
    with pytest.raises(Exception, match="target: requires grad"):
        torch.compile(f, fullgraph=True)(p, s)
    assert torch.equal(p.detach(), before)
