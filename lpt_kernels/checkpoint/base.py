"""What every checkpoint format shares: the error type, the description of one stored tensor, dtype names.

This package depends on torch and the standard library only (nothing above it in the layers of docs/architecture.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be read or checkpoints do not match; the message is one line naming the file, the
    tensor and the problem."""


# safetensors dtype strings -> torch dtypes (those this torch has). Sub-byte formats (F4, F6_*) are listed with
# dtype None: they can be named and aligned, but not materialised.
_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64",
    "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
DTYPES: Dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
_DTYPE_STR = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `start`/`end` are absolute byte offsets in `file`. `dtype` is None for a dtype this
    torch cannot represent (listed, not loadable)."""
    name: str
    dtype: Optional[torch.dtype]
    shape: tuple
    file: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _dtype_name(dtype) -> str:
    return _DTYPE_STR.get(dtype, str(dtype))


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _read_json(file: str, what: str):
    try:
        with open(file, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read {what}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: corrupt {what} (invalid JSON: {msg})") from None
