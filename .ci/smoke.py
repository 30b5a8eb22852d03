"""Smoke test of an installed wheel, run from a directory outside the repository: the package imports from the
environment (not from a source tree), and each op runs on every backend that was built and can run here, against the
float64 reference; and a tiny `lpt demo` runs. Exit code 0 when all pass; one line per check."""
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

# The demo from the wheel (installed with [demo]): a tiny configuration, so this checks the packaging and the
# plumbing in seconds; tests/test_demo.py runs `lpt demo --fast` and checks what it shows.
import json  # noqa: E402
from dataclasses import replace  # noqa: E402

from lpt_kernels.demo import FAST, run_demo  # noqa: E402

tiny = replace(FAST, warmup_steps=6, eval_size=16, stage_steps={"code": 1, "math": 1, "qa": 1, "cw": 1},
               refresh_steps=1, refresh_every=1, budgets=(0.02,), random_seeds=1)
run_demo("demo-tiny", seed=0, quiet=True, config=tiny)
with open("demo-tiny/results.json") as f:
    res = json.load(f)
check("lpt demo (tiny) from the wheel", [s["name"] for s in res["stages"]] == ["base", "code", "math", "qa", "cw"]
      and os.path.getsize("demo-tiny/report.html") > 10000, f"{len(res['rollback'])} rollback rows")

print(f"lpt_kernels {L.__version__}: {len(failures)} failure(s)")
sys.exit(1 if failures else 0)
