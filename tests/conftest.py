"""Test setup: without a GPU, Triton runs under its interpreter on CPU (set before triton is imported; importing
torch does not import triton), and every backend that can run here is parametrised into the kernel tests; one that
cannot is reported as skipped with the reason. With a GPU the triton and cuda backends run on it for real."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lpt_kernels import ops  # noqa: E402  (after TRITON_INTERPRET is settled)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Examples per property test and backend (benchmarks/gpu_check.py lowers it to fit a short GPU window).
PROPERTY_EXAMPLES = int(os.environ.get("LPT_PROPERTY_EXAMPLES", "25"))
DTYPES = (BF16, FP16, FP32)


def _cpu_isas():
    try:
        from lpt_kernels.backends import cpu
    except ImportError:
        return []
    if not cpu.AVAILABLE:
        return []
    order = ["base", "avx2", "avx512"]
    return order[: order.index(cpu._C.best_isa()) + 1]


def _other_tuning():
    """The vendor tuning the running CPU does not take (see backends.cpu.set_tuning)."""
    from lpt_kernels.backends import cpu
    return "intel" if cpu.tuning() == "amd" else "amd"


def backend_params():
    """(id, backend name, device, cpu ISA, cpu tuning) for every backend the kernel tests run on; unavailable ones
    skip. The CPU backend runs at every ISA level the machine has, and at the best one also with the other vendor's
    tuning (row blocks, prefetch distances, count paths chosen per vendor), so both are tested on any machine."""
    params = [pytest.param(("reference", "cpu", None, None), id="reference")]
    isas = _cpu_isas()
    if isas:
        params += [pytest.param(("cpu", "cpu", isa, None), id=f"cpu-{isa}") for isa in isas]
        other = _other_tuning()
        params.append(pytest.param(("cpu", "cpu", isas[-1], other), id=f"cpu-{isas[-1]}-{other}"))
    else:
        params.append(pytest.param(("cpu", "cpu", None, None), id="cpu",
                                   marks=pytest.mark.skip(reason="CPU extension not built")))
    try:
        ops._load("triton")
        params.append(pytest.param(("triton", "cuda" if torch.cuda.is_available() else "cpu", None, None),
                                   id="triton"))
    except RuntimeError as e:
        params.append(pytest.param(("triton", "cpu", None, None), id="triton", marks=pytest.mark.skip(reason=str(e))))
    cuda_ok = torch.cuda.is_available()
    try:
        ops._load("cuda")
    except RuntimeError as e:
        cuda_ok, why = False, str(e)
    else:
        why = "no CUDA device on this machine"
    params.append(pytest.param(("cuda", "cuda", None, None), id="cuda",
                               marks=[] if cuda_ok else pytest.mark.skip(reason=why)))
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    """Yields (backend name, device); for the CPU backend, forces the instruction-set variant and tuning under test."""
    name, device, isa, tuning = request.param
    if isa is not None:
        from lpt_kernels.backends import cpu
        cpu.set_isa(isa)
        cpu.set_tuning(tuning or "auto")
    yield name, torch.device(device)
    if isa is not None:
        cpu.set_isa("auto")
        cpu.set_tuning("auto")


def is_slow(name):
    """Triton under the interpreter runs at a few MB/s: those tests use smaller shapes."""
    return name == "triton" and not torch.cuda.is_available()


def poison_allocator(*shapes):
    """Fill freed CPU memory of these sizes with NaN so that uninitialised outputs would show up as NaN."""
    junk = [torch.full(s, float("nan")) for s in shapes]
    del junk


def gpu_params():
    """(id, backend) for the GPU backends, each skipped with its reason where it cannot run on a CUDA device."""
    out = []
    for name in ("triton", "cuda"):
        try:
            ops._load(name)
            why = None if torch.cuda.is_available() else "no CUDA device on this machine"
        except RuntimeError as e:
            why = str(e)
        out.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=why) if why else []))
    return out
