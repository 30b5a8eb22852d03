"""Writing one safetensors file tensor by tensor, atomically: the header is computed from the shapes and dtypes first,
then each tensor's bytes are written as it comes, so a model on a GPU (or larger than the free RAM) is never copied
to the host as a whole, as ``safetensors.torch.save_file`` does. The file appears under its name only when complete
(a temp file in the same directory, flushed, fsync'ed and renamed); a failure leaves nothing behind.

The result is an ordinary safetensors file: :class:`~lpt_kernels.checkpoint.Checkpoint`, ``safetensors.safe_open`` and
``lpt diff`` read it.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from lpt_kernels.checkpoint.base import DTYPES, CheckpointError
from lpt_kernels.checkpoint.writer import set_default_mode

_DTYPE_STR = {v: k for k, v in DTYPES.items()}
_ALIGN = 8  # the data section starts 8-byte aligned (as the safetensors library writes it)


def write_safetensors(path: str, specs: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                      tensor: Callable[[str], torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> str:
    """Write ``path`` holding the tensors listed in ``specs`` (``(name, dtype, shape)``, in file order).

    ``tensor(name)`` is called once per name, in that order, and must return a tensor of that dtype and shape on any
    device; it is copied to the host one tensor at a time. Raises :class:`CheckpointError` naming the tensor if one
    does not match its spec or its dtype has no safetensors name; ``path`` is then left as it was.
    """
    header: Dict[str, object] = {}
    off = 0
    for name, dtype, shape in specs:
        if dtype not in _DTYPE_STR:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        n = dtype.itemsize
        for s in shape:
            n *= int(s)
        header[name] = {"dtype": _DTYPE_STR[dtype], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    out_dir = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, dtype, shape in specs:
                t = tensor(name)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                                          f"{tuple(shape)}")
                if t.numel():
                    host = t.detach().reshape(-1).to("cpu").contiguous()
                    f.write(memoryview(host.view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        set_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_state(path: str, tensors: Iterable[Tuple[str, torch.Tensor]], metadata: Optional[Dict[str, str]] = None
                ) -> str:
    """:func:`write_safetensors` of named tensors (e.g. ``model.named_parameters()``), in the order given."""
    items = [(n, t) for n, t in tensors]
    by_name = dict(items)
    if len(by_name) != len(items):
        seen = set()
        dup = next(n for n, _ in items if n in seen or seen.add(n))
        raise CheckpointError(f"{path}: tensor {dup!r} is given twice")
    return write_safetensors(path, [(n, t.dtype, tuple(t.shape)) for n, t in items], by_name.__getitem__, metadata)
