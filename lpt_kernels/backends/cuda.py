"""The optional CUDA backend: the extension lpt_kernels._C_cuda (csrc/cuda), built only with LPT_BUILD_CUDA=1.

The extension takes raw device pointers, strides in elements, dtype codes and the current CUDA stream, and never
synchronises with the host. This module allocates the outputs with torch and passes everything else through;
argument validation is lpt_kernels.ops' job (see backends/__init__.py for the contract). When the extension is
missing, ``AVAILABLE`` is False, ``REASON`` says why, and the entry points raise RuntimeError when called.
"""

from __future__ import annotations

import importlib

import torch

try:
    _ext = importlib.import_module("lpt_kernels._C_cuda")
except ImportError as exc:  # not built, or built but not loadable
    _ext = None
    AVAILABLE = False
    if isinstance(exc, ModuleNotFoundError) and exc.name == "lpt_kernels._C_cuda":
        REASON = "lpt_kernels._C_cuda is not installed"
    else:
        REASON = f"lpt_kernels._C_cuda failed to load: {exc}"
else:
    AVAILABLE = True
    REASON = ""

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MODE_CODES = {"consecutive": 0, "base": 1, "given": 2}


def _require() -> None:
    if _ext is None:
        raise RuntimeError(
            "the CUDA backend is not built: reinstall with LPT_BUILD_CUDA=1 (optionally LPT_CUDA_ARCHS=\"80;90\"), "
            f"e.g. LPT_BUILD_CUDA=1 pip install --no-build-isolation -e . ({REASON})"
        )


def _code(t: torch.Tensor, name: str) -> int:
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got device {t.device}")
    try:
        return _DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, bfloat16 or float16") from None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _index(index: torch.Tensor) -> torch.Tensor:
    # The kernels read index as a dense int64 array; .contiguous() is a stream-ordered copy when needed, kept
    # alive by the caching allocator until the kernel that reads it has run.
    if not index.is_cuda or index.dtype != torch.int64:
        raise ValueError(f"index must be an int64 CUDA tensor, got {index.dtype} on {index.device}")
    return index.contiguous()


def unit_gram(ws, axis, block, mode, index, atol, rtol):
    _require()
    codes = [_code(w, f"ws[{i}]") for i, w in enumerate(ws)]
    w0 = ws[0]
    dev = w0.device
    rows, cols = w0.shape
    m = len(ws) if mode == "given" else len(ws) - 1
    if index is not None:
        index = _index(index)
    u = w0.shape[axis] // block if index is None else index.numel()
    gram = torch.empty((u, m, m), dtype=torch.float32, device=dev)
    abs_sum = torch.empty((u, m), dtype=torch.float32, device=dev)
    abs_max = torch.empty((u, m), dtype=torch.float32, device=dev)
    zeros = torch.empty((u, m), dtype=torch.int64, device=dev)
    near_zeros = torch.empty((u, m), dtype=torch.int64, device=dev)
    with torch.cuda.device(dev):
        _ext.unit_gram(
            [w.data_ptr() for w in ws], codes, [w.stride(0) for w in ws], [w.stride(1) for w in ws],
            rows, cols, _MODE_CODES[mode], axis, block,
            0 if index is None else index.data_ptr(), 0 if index is None else u,
            float(atol), float(rtol),
            gram.data_ptr(), abs_sum.data_ptr(), abs_max.data_ptr(), zeros.data_ptr(), near_zeros.data_ptr(),
            dev.index, _stream(dev),
        )
    return gram, abs_sum, abs_max, zeros, near_zeros


def act_stats_(x, stats, token_mask, threshold):
    _require()
    code = _code(x, "x")
    if stats.dtype != torch.float64 or stats.device != x.device:
        raise ValueError(f"stats must be float64 on {x.device}, got {stats.dtype} on {stats.device}")
    if token_mask is not None and (token_mask.dtype != torch.bool or token_mask.device != x.device):
        raise ValueError(f"token_mask must be bool on {x.device}, got {token_mask.dtype} on {token_mask.device}")
    dev = x.device
    t, c = x.shape
    with torch.cuda.device(dev):
        _ext.act_stats(
            x.data_ptr(), code, t, c, x.stride(0), x.stride(1),
            stats.data_ptr(), stats.stride(0), stats.stride(1),
            0 if token_mask is None else token_mask.data_ptr(), 0 if token_mask is None else token_mask.stride(0),
            float(threshold), dev.index, _stream(dev),
        )


def rollback_(target, source, index, axis, block, alpha, compact):
    _require()
    tcode, scode = _code(target, "target"), _code(source, "source")
    if source.device != target.device:
        raise ValueError(f"source must be on {target.device} for the cuda backend, got {source.device}")
    index = _index(index)
    dev = target.device
    rows, cols = target.shape
    with torch.cuda.device(dev):
        _ext.rollback(
            target.data_ptr(), tcode, rows, cols, target.stride(0), target.stride(1),
            source.data_ptr(), scode, source.stride(0), source.stride(1),
            index.data_ptr(), index.numel(), axis, block, float(alpha), bool(compact),
            dev.index, _stream(dev),
        )
