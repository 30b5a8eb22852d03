"""Smoke test of an installed wheel, run from a directory outside the repository: the package imports from the
environment (not from a source tree), and each op runs on every backend that was built and can run here, against the
float64 reference. Exit code 0 when all pass; one line per check."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on a CPU machine: the interpreter (set before the import)

import torch  # noqa: E402

import lpt_kernels as L  # noqa: E402
from lpt_kernels import ops  # noqa: E402

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        failures.append(name)


where = os.path.dirname(L.__file__)
check("imported from the installed environment", "site-packages" in where, where)
for sub in ("", ".ci", "csrc"):
    if os.path.isdir(os.path.join(os.getcwd(), sub, "lpt_kernels")):
        check("not run from a source tree", False, os.getcwd())

backends = list(dict.fromkeys(["reference"] + ops.available_backends()))
try:
    from lpt_kernels.backends import cpu
    check("CPU extension built", cpu.AVAILABLE, getattr(cpu, "REASON", "") or f"ISA {cpu.isa()}")
except ImportError as e:
    check("CPU extension built", False, str(e))
    cpu = None
try:
    ops._load("cuda")
    print("note cuda extension built but no GPU here" if not torch.cuda.is_available() else "note cuda extension built")
except RuntimeError as e:
    print(f"note cuda extension: {e}")

gen = torch.Generator().manual_seed(0)
ws = [torch.randn(37, 29, generator=gen).to(torch.bfloat16) for _ in range(3)]
ref = L.unit_gram(ws, axis=0, mode="consecutive", backend="reference")
tgt0 = torch.randn(37, 29, generator=gen).to(torch.bfloat16)
src = torch.randn(37, 29, generator=gen).to(torch.bfloat16)
idx = torch.tensor([0, 5, 36])


def run(backend, isa=None):
    label = backend + (f"-{isa}" if isa else "")
    dev = "cuda" if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    if backend == "cuda" and not torch.cuda.is_available():
        print(f"skip {label}: no GPU")
        return
    g = L.unit_gram([w.to(dev) for w in ws], axis=0, mode="consecutive", backend=backend)
    err = (g.gram.cpu().double() - ref.gram.double()).abs().max().item()
    scale = ref.gram.double().abs().max().item()
    check(f"unit_gram on {label}", err <= 1e-5 * scale and torch.equal(g.zeros.cpu(), ref.zeros), f"max err {err:.2e}")
    t = tgt0.clone().to(dev)
    L.rollback_(t, src.to(dev), idx.to(dev), axis=0, alpha=1.0, backend=backend)
    want = tgt0.clone()
    want[idx] = src[idx]
    check(f"rollback_ on {label}", torch.equal(t.cpu(), want))


for b in backends:
    if b == "cpu" and cpu is not None and cpu.AVAILABLE:
        order = ["base", "avx2", "avx512"]
        for isa in order[: order.index(cpu._C.best_isa()) + 1]:
            cpu.set_isa(isa)
            run("cpu", isa)
        cpu.set_isa("auto")
    else:
        run(b)

print(f"lpt_kernels {L.__version__}: {len(failures)} failure(s)")
sys.exit(1 if failures else 0)
