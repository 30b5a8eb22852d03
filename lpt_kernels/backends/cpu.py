"""CPU backend: the pybind11 extension lpt_kernels._C_cpu (C++/OpenMP, runtime ISA dispatch).

Passes raw pointers, shapes and strides; the extension does not link libtorch. If the extension cannot be imported,
AVAILABLE is False and REASON says why; calling a kernel then raises RuntimeError.
"""
from __future__ import annotations

import torch

try:
    from lpt_kernels import _C_cpu as _C
    AVAILABLE, REASON = True, ""
except ImportError as e:  # pragma: no cover - depends on the build
    _C, AVAILABLE, REASON = None, False, f"lpt_kernels._C_cpu could not be imported ({e})"

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MODE_CODES = {"consecutive": 0, "base": 1, "given": 2}


def _code(t, name: str) -> int:
    """The extension's dtype code of tensor `t` (argument `name`), or TypeError naming both."""
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (expected bfloat16, float16 or float32)") from None


def _codes(ws) -> list:
    """The dtype codes of tensors ``ws`` (arguments ws[i])."""
    try:
        return [DTYPE_CODES[w.dtype] for w in ws]
    except KeyError:
        return [_code(w, f"ws[{i}]") for i, w in enumerate(ws)]  # raises, naming the argument


def _ext():
    if _C is None:
        raise RuntimeError(f"the CPU backend is not available: {REASON}; reinstall lpt_kernels (pip install .)")
    return _C


def isa() -> str:
    """The instruction-set variant of the kernels in use (base, avx2 or avx512)."""
    return _ext().isa()


def set_isa(name: str) -> None:
    """Force an instruction-set variant ('auto', 'base', 'avx2', 'avx512'), e.g. to test every variant."""
    _ext().set_isa(name)


def set_tuning(name: str) -> None:
    """Force the vendor-specific tuning ('auto': the running CPU's, 'amd', 'intel'): row blocks, prefetch distances,
    gathers and count paths that were measured faster on one vendor's cores. Results are the same either way; tests
    run both on any machine."""
    _ext().set_tuning(name)


def tuning() -> str:
    """The vendor-specific tuning in effect: 'amd' or 'intel' (the latter for every non-AMD CPU)."""
    return _ext().tuning()


def index_order(index, n_units) -> int:
    """One scan of contiguous int64 unit ids: -1 if one is out of [0, n_units), 1 if strictly increasing, else 0."""
    return _ext().index_order(index.data_ptr(), index.numel(), n_units)


def unit_gram(ws, axis, block, mode, index, atol, rtol):
    C = _ext()
    rows, cols = ws[0].shape
    m = len(ws) if mode == "given" else len(ws) - 1
    n_units = index.numel() if index is not None else ws[0].shape[axis] // block
    if index is not None:
        index = index.contiguous()
    kw = dict(dtype=torch.float32, device=ws[0].device)
    gram = torch.empty(n_units, m, m, **kw)
    abs_sum, abs_max = torch.empty(n_units, m, **kw), torch.empty(n_units, m, **kw)
    zeros = torch.empty(n_units, m, dtype=torch.int64)
    near = torch.empty(n_units, m, dtype=torch.int64)
    C.unit_gram([w.data_ptr() for w in ws], _codes(ws), [w.stride(0) for w in ws],
                [w.stride(1) for w in ws], rows, cols, axis, block, MODE_CODES[mode],
                index.data_ptr() if index is not None else 0, n_units, atol, rtol, gram.data_ptr(),
                abs_sum.data_ptr(), abs_max.data_ptr(), zeros.data_ptr(), near.data_ptr(), torch.get_num_threads())
    return gram, abs_sum, abs_max, zeros, near


def masked_cosine(ws, mode, a, b, index, axis, block):
    gram = unit_gram(ws, axis, block, mode, index, 0.0, 0.0)[0]
    per_unit = torch.empty(gram.shape[0], dtype=torch.float32)
    pooled = _ext().gram_cosines(gram.data_ptr(), gram.shape[0], gram.shape[1], a, b, per_unit.data_ptr())
    return torch.scalar_tensor(pooled, dtype=torch.float32), per_unit


def log_hist(ws, rows, mode, counts, zeros, bins, lo, hi):
    """lpt diff's histograms: add the log10 bins of |d| and |d|/|w_ref| over the listed rows into counts, zeros."""
    m = len(ws) - 1
    if any(w.dim() != 2 or w.shape != ws[0].shape for w in ws) or rows.dtype != torch.int64:
        raise ValueError("log_hist: inputs must be 2-D of one shape, rows int64")
    if counts.dtype != torch.float64 or zeros.dtype != torch.float64 or counts.shape != (2 * m, bins) or \
            zeros.shape != (2 * m,) or not (counts.is_contiguous() and zeros.is_contiguous()):
        raise ValueError(f"log_hist: counts must be float64 [{2 * m}, {bins}] and zeros [{2 * m}], contiguous")
    rows = rows.contiguous()
    _ext().log_hist([w.data_ptr() for w in ws], [DTYPE_CODES[w.dtype] for w in ws], [w.stride(0) for w in ws],
                    [w.stride(1) for w in ws], ws[0].shape[0], ws[0].shape[1], rows.data_ptr(), rows.numel(),
                    MODE_CODES[mode], bins, lo, hi, counts.data_ptr(), zeros.data_ptr(), torch.get_num_threads())


def fold_unit_gram(r, acc=None):
    """lpt diff's bookkeeping of a unit_gram result ``r``: its per-delta totals (zeros, near_zeros, sq_norm, abs_max
    lists and whether its sums are finite), and with ``acc`` (gram, abs_sum, abs_max, zeros, near_zeros of a group's
    layer: float64, float64, float32, int64, int64, contiguous) r added into those."""
    r = [x.contiguous() for x in r]
    want = (torch.float32, torch.float32, torch.float32, torch.int64, torch.int64)
    if [x.dtype for x in r] != list(want) or (acc is not None and [a.dtype for a in acc] != [
            torch.float64, torch.float64, torch.float32, torch.int64, torch.int64]):
        raise TypeError("fold_unit_gram: unexpected dtypes")
    n, m = r[1].shape
    if r[0].shape != (n, m, m) or any(x.shape != (n, m) for x in r[2:]):
        raise ValueError("fold_unit_gram: a unit_gram result has gram [n, m, m] and the rest [n, m]")
    if acc is not None and not all(a.is_contiguous() and a.shape == x.shape for a, x in zip(acc, r)):
        raise ValueError("fold_unit_gram: totals must be contiguous and shaped like the result")
    ptrs = [a.data_ptr() for a in acc] if acc is not None else [0] * 5
    return _ext().fold_unit_gram(*(x.data_ptr() for x in r), n, m, *ptrs)


def act_stats_(x, stats, token_mask, threshold):
    C = _ext()
    mask = token_mask.contiguous() if token_mask is not None else None
    C.act_stats(x.data_ptr(), _code(x, "x"), x.stride(0), x.stride(1), x.shape[0], x.shape[1],
                mask.data_ptr() if mask is not None else 0, stats.data_ptr(), stats.stride(0), stats.stride(1),
                threshold, torch.get_num_threads())


def rollback_(target, source, index, axis, block, alpha, compact):
    C = _ext()
    index = index.contiguous()
    C.rollback(target.data_ptr(), _code(target, "target"), target.stride(0), target.stride(1), source.data_ptr(),
               _code(source, "source"), source.stride(0), source.stride(1), target.shape[0], target.shape[1],
               index.data_ptr(), index.numel(), axis, block, alpha, compact, torch.get_num_threads())
