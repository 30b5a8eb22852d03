"""The four kernel families as torch.library custom ops (namespace ``lpt``): validation, fakes, backend dispatch.

The public functions validate every argument before any memory is touched and raise ``ValueError``/``TypeError``
naming the argument; the custom ops then call the chosen backend (see ``lpt_kernels.backends``).
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from lpt_kernels import distributed
from lpt_kernels.backends import reference

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("consecutive", "base", "given")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
MAX_INPUTS = 8


class UnitGram(NamedTuple):
    """Per-unit statistics of M deltas (see :func:`unit_gram`)."""

    gram: torch.Tensor        # [U, M, M] float32, G[u, a, b] = sum over the unit of d_a * d_b
    abs_sum: torch.Tensor     # [U, M] float32, sum |d|
    abs_max: torch.Tensor     # [U, M] float32, max |d|
    zeros: torch.Tensor       # [U, M] int64, count of d == 0
    near_zeros: torch.Tensor  # [U, M] int64, count of |d| <= atol + rtol * |w_ref|

    @property
    def sq_norm(self) -> torch.Tensor:
        """[U, M] squared norm of each delta on each unit (the Gram diagonal)."""
        return torch.diagonal(self.gram, dim1=1, dim2=2)

    def cosine(self, a: int, b: int) -> torch.Tensor:
        """[U] cosine between deltas a and b on each unit (0 where either delta is zero on the unit)."""
        return _cosine(self.gram[:, a, b], self.gram[:, a, a], self.gram[:, b, b])


# ---- backend selection -----------------------------------------------------------------------------------------

_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


_loaded = {}  # backends that loaded: every op call looks its backend up


def _load(name: str):
    """Import a backend module, or raise RuntimeError saying why it cannot run."""
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = _import_backend(name)
    return mod


def _import_backend(name: str):
    if name == "reference":
        return reference
    if name == "cpu":
        from lpt_kernels.backends import cpu
        if not cpu.AVAILABLE:
            raise RuntimeError(f"backend 'cpu' is not available: {cpu.REASON}")
        return cpu
    if name == "cuda":
        try:
            from lpt_kernels.backends import cuda
        except ImportError as e:
            raise RuntimeError(f"backend 'cuda' is not available: {e}") from None
        if not cuda.AVAILABLE:
            raise RuntimeError(f"backend 'cuda' is not available: {cuda.REASON}")
        return cuda
    if name == "triton":
        try:
            from lpt_kernels.backends import triton as tb
        except ImportError as e:
            raise RuntimeError(f"backend 'triton' is not available: {e}") from None
        return tb
    raise ValueError(f"backend: unknown backend {name!r} (expected one of {', '.join(BACKENDS)})")


def available_backends() -> List[str]:
    """Backends that can run on this machine (triton counts on CPU only under TRITON_INTERPRET=1)."""
    out = []
    for name in BACKENDS[1:]:
        try:
            _load(name)
        except RuntimeError:
            continue
        if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        if name == "cuda" and not torch.cuda.is_available():
            continue
        out.append(name)
    return out


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend a call on `device` uses: the argument, else LPT_BACKEND, else the best one available."""
    name = backend or os.environ.get("LPT_BACKEND") or "auto"
    what = "backend" if backend else "LPT_BACKEND (environment)"
    if name not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r} (expected one of {', '.join(BACKENDS)})")
    if name == "auto":
        candidates = ("cpu",) if device.type == "cpu" else ("triton", "cuda") if device.type == "cuda" else ()
        for cand in candidates:
            try:
                _load(cand)
                return cand
            except RuntimeError as e:
                _warn_once(cand, f"lpt_kernels: {e}; falling back to the reference backend (slow)")
        return "reference"
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"{what}: 'cpu' runs on CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"{what}: 'cuda' runs on CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{what}: 'triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {device}")
    _load(name)
    return name


# ---- validation ------------------------------------------------------------------------------------------------

def _check_dtype(t: torch.Tensor, name: str) -> None:
    """A float dtype the kernels read (quantized or integer data, e.g. int8/uint8 packs or float8 codes, must be
    dequantized by the caller: their raw codes are not weights)."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (expected bfloat16, float16 or float32)")


def _check_tensor(t, name: str) -> None:
    """A 2-D float tensor: unit_gram, masked_cosine and rollback_ work on weight matrices (a unit is a block of rows
    or columns), so 0-d and 1-D tensors are refused; zero-size dimensions are fine."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _check_dtype(t, name)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")


def _check_writable(t: torch.Tensor, name: str, source: Optional[torch.Tensor] = None) -> None:
    """torch's rules for an in-place write, which a kernel writing through a pointer would otherwise skip: no two
    elements at one memory location (an expanded or overlapping as_strided view would be written twice), no
    ``source`` that overlaps the target in part (rows would be read after they were written), no inference tensor
    outside inference mode, no tensor that requires grad while grad is on. The memory checks are conservative (a
    view whose strides interleave may be refused); under torch.compile only the strides and grad are checked."""
    if t.requires_grad and torch.is_grad_enabled():  # (autograd would not see the kernel's write)
        raise ValueError(f"{name}: requires grad; update it under torch.no_grad()")
    if t.numel() == 0:
        return
    dims = sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1)
    extent = 0  # elements spanned by the faster dims: a slower stride must step past them
    for st, n in dims:
        if st <= extent:
            raise ValueError(f"{name}: its elements may share memory (an expanded or overlapping view); write into "
                             f"a tensor with distinct elements (e.g. a .clone())")
        extent += st * (n - 1)
    if torch.compiler.is_compiling():  # (data pointers and is_inference() cannot be traced)
        return
    if source is not None and source.numel() and source.device == t.device and _overlap_in_part(t, source):
        raise ValueError(f"source: shares memory with {name} (e.g. w[:-1] into w[1:]); pass a copy (.clone())")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name}: an inference tensor cannot be updated in place outside torch.inference_mode()")


def _overlap_in_part(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges of a and b intersect, unless they are the same view (rolling a tensor back to
    itself changes nothing, as copy_ of a tensor into itself)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if (a.data_ptr(), a.stride(), a.shape, a.dtype) == (b.data_ptr(), b.stride(), b.shape, b.dtype):
        return False

    def span(x):
        lo = x.data_ptr() + sum(st * (n - 1) for st, n in zip(x.stride(), x.shape) if st < 0) * x.element_size()
        return lo, lo + (sum(abs(st) * (n - 1) for st, n in zip(x.stride(), x.shape)) + 1) * x.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _check_axis_block(shape, axis, block, what: str = "tensor") -> int:
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or axis not in (0, 1):
        raise ValueError(f"axis: must be 0 or 1, got {axis!r}")
    if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block: must be a positive int, got {block!r}")
    if shape[axis] % block:
        raise ValueError(f"block: {block} does not divide axis {axis} of the {what} (size {shape[axis]})")
    return shape[axis] // block


def _host_index(index, name: str = "index") -> torch.Tensor:
    """Unit ids as a contiguous 1-D int64 CPU tensor (values are checked by `_check_index_values`).

    Ids are range-checked and (for rollback_) de-duplicated on the host and moved to a GPU without a
    synchronisation (`_to_device`). Ids that already live on a GPU are copied back once for the check (one
    synchronisation): pass a list, an array or a CPU tensor to avoid it. Any strides are accepted.
    """
    if isinstance(index, torch.Tensor):
        if (index.dtype == torch.int64 and index.dim() == 1 and index.device.type == "cpu"
                and index.is_contiguous()):
            return index  # the usual case, without two no-op conversions (a few microseconds a call)
        idx = index
    else:
        if any(st < 0 for st in getattr(index, "strides", None) or ()):
            index = index.copy()  # a reversed numpy array (argsort(x)[::-1]): torch takes no negative strides
        try:
            idx = torch.as_tensor(index)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: cannot convert to a tensor of unit ids ({e})") from None
        if idx.numel() == 0:
            idx = idx.to(torch.int64)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer unit ids, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D list of unit ids, got shape {tuple(idx.shape)}")
    if idx.device.type == "meta":
        raise TypeError(f"{name}: a meta tensor has no unit ids to read")
    if idx.dtype == torch.uint64 and idx.numel():  # ids from 2**63 on would wrap to negative ones in int64
        big = idx.view(torch.int64) < 0
        if bool(big.any()):
            raise ValueError(f"{name}: unit id {int(idx.view(torch.int64)[big][0]) + 2**64} out of range")
    return idx.to(device="cpu", dtype=torch.int64).contiguous()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (ids, a gathered source) onto `device` without a host synchronisation: a pinned,
    stream-ordered copy to a GPU (the caching host allocator keeps the pinned buffer until the copy has run)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _index_order(idx: torch.Tensor, n_units: int) -> Optional[int]:
    """For contiguous CPU ids, one C++ scan: -1 if one is out of [0, n_units), 1 if strictly increasing, else 0;
    None where that scan is not available (no CPU extension)."""
    if idx.device.type != "cpu" or not idx.is_contiguous():
        return None
    from lpt_kernels.backends import cpu
    return cpu.index_order(idx, n_units) if cpu.AVAILABLE else None


def _check_index_values(idx: torch.Tensor, n_units: int, name: str = "index") -> torch.Tensor:
    """Range check of unit ids on the host; returns them as a contiguous CPU tensor. Runs inside the custom ops
    (eagerly, also under torch.compile, where the values are not known while tracing), always before a kernel
    touches memory."""
    idx = _host_index(idx, name)
    if idx.numel() and _index_order(idx, n_units) in (None, -1):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0:
            raise ValueError(f"{name}: negative unit id {lo}")
        if hi >= n_units:
            raise ValueError(f"{name}: unit id {hi} out of range (there are {n_units} units)")
    return idx


def _unique_index(idx: torch.Tensor, n_units: int, name: str = "index") -> torch.Tensor:
    """The unit ids range-checked, sorted and without duplicates, on the host. Ids already strictly increasing (the
    usual selection) come back as they are after one C++ scan, skipping a sort and two reductions."""
    idx = _host_index(idx, name)
    order = _index_order(idx, n_units) if idx.numel() else 1
    if order == 1:
        return idx
    if order != 0:
        _check_index_values(idx, n_units, name)
    return torch.unique(idx)


def _check_float(x, name: str, lo: float, hi: float = float("inf")) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):  # (numpy scalars are Real too)
        raise TypeError(f"{name}: expected a number, got {type(x).__name__}")
    x = float(x)
    if not (lo <= x <= hi):
        raise ValueError(f"{name}: must be in [{lo}, {hi}], got {x}")
    return x


def _num_deltas(mode: str, k: int) -> int:
    return k if mode == "given" else k - 1


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter is a plain tensor to torch's dispatch
# Tracing state (private torch APIs, present since torch 2.1; without them every call takes the op path).
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _run(op, impl, tensors, *args, mutated: Tuple[torch.Tensor, ...] = ()):
    """Call ``impl(*args)`` directly in plain eager mode, else the custom op ``op`` (same function, registered).

    In eager mode the dispatcher adds nothing but cost: its first call imports torch._dynamo (about 2 s) and every
    call pays tens of microseconds, which per-slice callers (a live rollback, a hook) pay many times. Anything that
    traces — torch.compile, make_fx, fake tensors, dispatch modes, functorch transforms — goes through the op.
    ``mutated``: the tensors the kernel writes in place; their version counters are bumped as the op's would be, so
    autograd refuses a backward through values that changed.
    """
    if (torch.compiler.is_compiling() or _dispatch_modes() or _functorch_active()
            or any(t is not None and type(t) not in _PLAIN for t in tensors)):
        return op(*args)
    grad = torch.is_grad_enabled()  # torch.no_grad() without its context manager's ~2 us a call
    torch._C._set_grad_enabled(False)
    try:
        out = impl(*args)
    finally:
        torch._C._set_grad_enabled(grad)
    if mutated:
        torch.autograd.graph.increment_version(mutated)
    return out


# ---- unit_gram ---------------------------------------------------------------------------------------------------

def _unit_gram_impl(ws: List[torch.Tensor], axis: int, block: int, mode: str, index: Optional[torch.Tensor],
                    atol: float, rtol: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor]:
    for i, w in enumerate(ws):  # also for direct torch.ops.lpt calls, which skip unit_gram()'s checks
        _check_dtype(w, f"ws[{i}]")
    if index is not None:
        index = _to_device(_check_index_values(index, ws[0].shape[axis] // block), ws[0].device)
    return tuple(_load(backend).unit_gram(list(ws), axis, block, mode, index, atol, rtol))


_unit_gram_op = torch.library.custom_op("lpt::unit_gram", _unit_gram_impl, mutates_args=())


@_unit_gram_op.register_fake
def _(ws, axis, block, mode, index, atol, rtol, backend):
    n = index.shape[0] if index is not None else ws[0].shape[axis] // block
    m = _num_deltas(mode, len(ws))
    f = ws[0].new_empty
    return (f((n, m, m), dtype=torch.float32), f((n, m), dtype=torch.float32), f((n, m), dtype=torch.float32),
            f((n, m), dtype=torch.int64), f((n, m), dtype=torch.int64))


def unit_gram(ws: Sequence[torch.Tensor], *, axis: int = 0, block: int = 1, mode: str = "consecutive",
              index=None, atol: float = 0.0, rtol: float = 0.0, backend: Optional[str] = None) -> UnitGram:
    """Per-unit statistics of the deltas between K tensors of one shape, in one pass (each byte read once).

    Args:
        ws: 1 to 8 two-dimensional tensors of one shape and device (bf16, fp16 or fp32, mixed allowed, any
            strides), e.g. the same weight in K checkpoints.
        axis, block: unit u covers indices ``[u*block, (u+1)*block)`` along ``axis`` (0: rows, 1: columns).
        mode: ``"consecutive"`` d_m = ws[m+1] - ws[m]; ``"base"`` d_m = ws[m+1] - ws[0]; ``"given"`` d_m = ws[m]
            (already deltas, e.g. gradients).
        index: optional unit ids (list, array or integer tensor, any strides; duplicates allowed) to compute, in
            that order. They are range-checked on the host and moved to the inputs' device without a
            synchronisation; ids already on a GPU cost one device-to-host copy for the check.
        atol, rtol: a delta counts as near zero when |d| <= atol + rtol * |w_ref| (w_ref the subtrahend; 0 in
            ``given`` mode).
        backend: ``reference``, ``cpu``, ``triton`` or ``cuda``; default: ``LPT_BACKEND`` or the best available.

    Returns:
        :class:`UnitGram` with ``gram [U, M, M]``, ``abs_sum``, ``abs_max``, ``zeros``, ``near_zeros`` ``[U, M]``.
        Norms are ``gram.diagonal``, cosines between deltas ``G[a,b] / sqrt(G[a,a] G[b,b])``, sparsity
        ``zeros / elements``.
    """
    if isinstance(ws, torch.Tensor) or not isinstance(ws, (list, tuple)):
        raise TypeError("ws: expected a list or tuple of tensors")
    if distributed.any_dtensor(ws):  # local shards, per-unit partials all-reduced
        return distributed.unit_gram(ws, axis=axis, block=block, mode=mode, index=index, atol=atol, rtol=rtol,
                                     backend=backend)
    if not 1 <= len(ws) <= MAX_INPUTS:
        raise ValueError(f"ws: expected 1 to {MAX_INPUTS} tensors, got {len(ws)}")
    for i, w in enumerate(ws):
        _check_tensor(w, f"ws[{i}]")
    shape, device = ws[0].shape, ws[0].device
    for i, w in enumerate(ws[1:], 1):
        if w.shape != shape:
            raise ValueError(f"ws[{i}]: shape {tuple(w.shape)} differs from ws[0]'s {tuple(shape)}")
        if w.device != device:
            raise ValueError(f"ws[{i}]: on {w.device}, but ws[0] is on {device}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if _num_deltas(mode, len(ws)) < 1:
        raise ValueError(f"ws: mode {mode!r} needs at least 2 tensors")
    _check_axis_block(shape, axis, block, "inputs")
    idx = None if index is None else _host_index(index)
    atol = _check_float(atol, "atol", 0.0)
    rtol = _check_float(rtol, "rtol", 0.0)
    name = resolve_backend(backend, device)
    return UnitGram(*_run(_unit_gram_op, _unit_gram_impl, [*ws, idx], list(ws), axis, block, mode, idx, atol,
                          rtol, name))


# ---- masked_cosine -----------------------------------------------------------------------------------------------

def _cosine(dot: torch.Tensor, aa: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    den = torch.sqrt(aa.to(torch.float64) * bb.to(torch.float64))
    return torch.where(den > 0, dot.to(torch.float64) / torch.where(den > 0, den, 1.0), 0.0).to(torch.float32)


def _masked_cosine_impl(ws: List[torch.Tensor], mode: str, a: int, b: int, index: torch.Tensor, axis: int,
                        block: int, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    for i, w in enumerate(ws):  # (direct torch.ops.lpt calls: masked_cosine() named u and v already)
        _check_dtype(w, f"ws[{i}]")
    index = _to_device(_check_index_values(index, ws[0].shape[axis] // block), ws[0].device)
    impl = _load(backend)
    if hasattr(impl, "masked_cosine"):  # a backend's own finish (see lpt_kernels.backends)
        return impl.masked_cosine(list(ws), mode, a, b, index, axis, block)
    g = impl.unit_gram(list(ws), axis, block, mode, index, 0.0, 0.0)[0]
    # rows: the listed units, then their total; columns: <u, v>, |u|^2, |v|^2 (few ops: the units are thousands)
    x = g[:, [a, a, b], [b, a, b]].to(torch.float64)
    x = torch.cat([x, x.sum(0, keepdim=True)])
    den = (x[:, 1] * x[:, 2]).sqrt_()
    cos = torch.where(den > 0, x[:, 0] / den, 0.0).to(torch.float32)
    return cos[-1].clone(), cos[:-1]


_masked_cosine_op = torch.library.custom_op("lpt::masked_cosine", _masked_cosine_impl, mutates_args=())


@_masked_cosine_op.register_fake
def _(ws, mode, a, b, index, axis, block, backend):
    return ws[0].new_empty((), dtype=torch.float32), ws[0].new_empty((index.shape[0],), dtype=torch.float32)


UpdateLike = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def masked_cosine(u: UpdateLike, v: UpdateLike, index, *, axis: int = 0, block: int = 1,
                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine of two update vectors restricted to the units in ``index`` (e.g. shared top-changed neurons).

    ``u`` and ``v`` are 2-D tensors (updates) or ``(w_before, w_after)`` pairs whose difference is formed on the
    fly in the same single pass (a chain ``(a, b), (b, c)`` reads three tensors, not four). Returns
    ``(pooled, per_unit)``: the cosine over all listed units together (0-d float32) and per listed unit ([U]
    float32). A cosine with a zero vector is reported as 0.
    """
    if distributed.any_dtensor((u, v)):
        return distributed.masked_cosine(u, v, index, axis=axis, block=block, backend=backend)
    def parts(x, name):
        if isinstance(x, torch.Tensor):
            _check_tensor(x, name)
            return None, x
        if isinstance(x, (tuple, list)) and len(x) == 2:
            _check_tensor(x[0], f"{name}[0]")
            _check_tensor(x[1], f"{name}[1]")
            return x[0], x[1]
        raise TypeError(f"{name}: expected a tensor or a (before, after) pair of tensors")

    (u0, u1), (v0, v1) = parts(u, "u"), parts(v, "v")
    # shapes and devices first: before a difference is formed below, or a kernel reads
    ref_name, ref = ("u", u1) if u0 is None else ("u[0]", u0)
    named = ([] if u0 is None else [("u[1]", u1)]) + ([("v", v1)] if v0 is None else [("v[0]", v0), ("v[1]", v1)])
    for name, w in named:
        if w.shape != ref.shape:
            raise ValueError(f"{name}: shape {tuple(w.shape)} differs from {ref_name}'s {tuple(ref.shape)}")
        if w.device != ref.device:
            raise ValueError(f"{name}: on {w.device}, but {ref_name} is on {ref.device}")
    if (u0 is None) != (v0 is None):
        # One update given, one pair: form the pair's difference (a full-size fp32 temporary).
        if u0 is not None:
            u0, u1 = None, u1.float() - u0.float()
        else:
            v0, v1 = None, v1.float() - v0.float()
    if u0 is None:
        ws, mode, a, b = [u1, v1], "given", 0, 1
    elif u1 is v0:
        ws, mode, a, b = [u0, u1, v1], "consecutive", 0, 1
    else:
        # Consecutive deltas of (u0, u1, v0, v1): d0 = u1 - u0 and d2 = v1 - v0 are the two updates.
        ws, mode, a, b = [u0, u1, v0, v1], "consecutive", 0, 2
    shape, device = ws[0].shape, ws[0].device
    _check_axis_block(shape, axis, block, "updates")
    if index is None:
        raise ValueError("index: masked_cosine needs the unit ids to restrict to")
    idx = _host_index(index)
    name = resolve_backend(backend, device)
    return _run(_masked_cosine_op, _masked_cosine_impl, [*ws, idx], ws, mode, a, b, idx, axis, block, name)


# ---- act_stats_ ----------------------------------------------------------------------------------------------------

ACT_STAT_ROWS = ("tokens", "abs_sum", "sq_sum", "abs_max", "active")


def _act_stats_impl(x: torch.Tensor, stats: torch.Tensor, token_mask: Optional[torch.Tensor], threshold: float,
                    backend: str) -> None:
    _check_dtype(x, "x")
    if token_mask is not None:
        token_mask = token_mask.reshape(-1)  # 0-d for a 1-D x (one token)
    _load(backend).act_stats_(x, stats, token_mask, threshold)


_act_stats_op = torch.library.custom_op("lpt::act_stats_", _act_stats_impl, mutates_args=("stats",))


@_act_stats_op.register_fake
def _(x, stats, token_mask, threshold, backend):
    return None


def new_act_stats(channels: int, device=None) -> torch.Tensor:
    """A zeroed ``[5, channels]`` float64 accumulator for :func:`act_stats_` (rows: ``ACT_STAT_ROWS``)."""
    return torch.zeros(len(ACT_STAT_ROWS), channels, dtype=torch.float64, device=device)


def act_stats_(x: torch.Tensor, stats: torch.Tensor, *, token_mask: Optional[torch.Tensor] = None,
               threshold: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Accumulate per-channel activation statistics of ``x [..., C]`` into ``stats [5, C]`` float64, in place.

    Rows of ``stats``: tokens counted, sum|x|, sum x^2, max|x| (a running maximum; NaN values are ignored by it,
    while the sums propagate them), count(|x| > threshold). Every position of the leading dimensions is a token: a
    1-D ``x [C]`` is one token, and leading dimensions of size 0 (or ``C == 0``) add nothing. ``token_mask`` (bool,
    shape ``x.shape[:-1]``) skips padding tokens where False. No host synchronisation: safe in a forward hook on a
    GPU. Returns ``stats``.

    Raises TypeError (x not a bf16/fp16/fp32 tensor, stats not float64, token_mask not bool) or ValueError (a 0-d
    x, shapes or devices that do not match, stats whose elements share memory or that requires grad), naming the
    argument; RuntimeError for an inference-mode stats updated outside inference mode. Like torch's in-place ops it
    bumps stats' version counter.
    """
    if distributed.is_dtensor(x):
        return distributed.act_stats_(x, stats, token_mask=token_mask, threshold=threshold, backend=backend)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    _check_dtype(x, "x")
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension (the channels), got a 0-d tensor")
    if not isinstance(stats, torch.Tensor):
        raise TypeError(f"stats: expected a torch.Tensor, got {type(stats).__name__}")
    if stats.dtype != torch.float64:
        raise TypeError(f"stats: expected float64, got {stats.dtype}")
    c = x.shape[-1]
    if tuple(stats.shape) != (len(ACT_STAT_ROWS), c):
        raise ValueError(f"stats: expected shape (5, {c}), got {tuple(stats.shape)}")
    if stats.device != x.device:
        raise ValueError(f"stats: on {stats.device}, but x is on {x.device}")
    _check_writable(stats, "stats")
    mask = None
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            raise TypeError(f"token_mask: expected a torch.Tensor, got {type(token_mask).__name__}")
        if token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask: expected dtype bool, got {token_mask.dtype}")
        if tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"token_mask: expected shape {tuple(x.shape[:-1])}, got {tuple(token_mask.shape)}")
        if token_mask.device != x.device:
            raise ValueError(f"token_mask: on {token_mask.device}, but x is on {x.device}")
        mask = token_mask.reshape(-1)
    threshold = _check_float(threshold, "threshold", float("-inf"))
    name = resolve_backend(backend, x.device)
    tokens = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) cannot infer the token count
    _run(_act_stats_op, _act_stats_impl, [x, stats, mask], x.reshape(tokens, c), stats, mask, threshold, name,
         mutated=(stats,))
    return stats


# ---- rollback_ -----------------------------------------------------------------------------------------------------

def _rollback_impl(target: torch.Tensor, source: torch.Tensor, index: torch.Tensor, axis: int, block: int,
                   alpha: float, compact: bool, backend: str) -> None:
    _check_dtype(target, "target")
    _check_dtype(source, "source")
    if not compact:  # (compact: gathered by the caller, which checked and de-duplicated the ids)
        index = _unique_index(index, target.shape[axis] // block)  # sorted; duplicates applied once
    _load(backend).rollback_(target, source, _to_device(index, target.device), axis, block, alpha, compact)


_rollback_op = torch.library.custom_op("lpt::rollback_", _rollback_impl, mutates_args=("target",))


@_rollback_op.register_fake
def _(target, source, index, axis, block, alpha, compact, backend):
    return None


def _rollback_compact_(target, source, index, axis: int, block: int, alpha: float, backend: str) -> None:
    """rollback_ from a compact source (the i-th listed unit at position i along `axis`), for callers that checked,
    sorted and de-duplicated the ids and gathered the source themselves; `backend` a resolved name."""
    _run(_rollback_op, _rollback_impl, [target, source, index], target, source, index, axis, block, alpha, True,
         backend, mutated=(target,))


def rollback_(target: torch.Tensor, source: torch.Tensor, index, *, axis: int = 0, block: int = 1,
              alpha: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """In place on the listed units: ``target += alpha * (source - target)``; returns ``target``.

    Computed in fp32 and rounded to target's dtype; ``alpha=1`` copies the source values exactly (the raw words
    when the dtypes match, NaN payloads included; rounded to target's dtype if the source's differs). ``source``
    may be on another device (e.g. a CPU memory-mapped checkpoint for a GPU model) and of another dtype: only the
    listed units are read and moved. ``index``: unit ids (list, array or integer tensor, any strides), checked and
    de-duplicated on the host (duplicates are applied once). Nothing is written unless every argument is valid.

    Raises TypeError / ValueError naming the argument (dtypes, shapes, ids out of range, alpha outside [0, 1], a
    target whose elements share memory, e.g. an expanded view, or that requires grad while grad is enabled) and
    RuntimeError for an inference tensor outside inference mode. Like torch's in-place ops it bumps target's
    version counter, so autograd refuses a backward through values it changed.
    """
    if distributed.is_dtensor(target) or distributed.is_dtensor(source):
        return distributed.rollback_(target, source, index, axis=axis, block=block, alpha=alpha, backend=backend)
    _check_tensor(target, "target")
    _check_tensor(source, "source")
    if source.shape != target.shape:
        raise ValueError(f"source: shape {tuple(source.shape)} differs from target's {tuple(target.shape)}")
    n_units = _check_axis_block(target.shape, axis, block, "target")
    alpha = _check_float(alpha, "alpha", 0.0, 1.0)
    if source.device.type == "meta" and target.device.type != "meta":
        raise ValueError("source: a meta tensor has no values to roll back to")
    _check_writable(target, "target", source)
    name = resolve_backend(backend, target.device)
    if source.device != target.device:
        # Read only the listed units on the source's device, then move just those.
        idx = _unique_index(index, n_units)
        pos = _to_device((idx[:, None] * block + torch.arange(block)).reshape(-1), source.device)
        if source.device.type == "cpu" and target.device.type == "cuda":
            # Gather straight into pinned memory: one host copy, then a stream-ordered upload (no sync).
            shape = list(source.shape)
            shape[axis] = pos.numel()
            part = torch.index_select(source, axis, pos,
                                      out=torch.empty(shape, dtype=source.dtype, pin_memory=True))
            part = part.to(target.device, non_blocking=True)
        else:
            part = source.index_select(axis, pos).to(target.device)
        _rollback_compact_(target, part, idx, axis, block, alpha, name)
    else:
        idx = _host_index(index)
        _run(_rollback_op, _rollback_impl, [target, source, idx], target, source, idx, axis, block, alpha, False,
             name, mutated=(target,))
    return target
