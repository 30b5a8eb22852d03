"""What every checkpoint format shares: the error type, the description of one stored tensor, dtype names, and
:class:`Checkpoint`, the one face every on-disk format shows to the analyses.

This package depends on torch and the standard library only (nothing above it in the layers of docs/architecture.md).
"""
from __future__ import annotations

import json
import operator
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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


# ---------------------------------------------------------------------------------------------------------------
# the face

_VERL_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


def detect_format(path) -> str:
    """Which on-disk format `path` holds: ``"verl"`` (a directory of ``model_world_size_{W}_rank_{r}.pt`` files,
    verl's FSDP checkpoint), ``"dcp"`` (a torch.distributed.checkpoint directory: ``.metadata`` and ``*.distcp``) or
    ``"safetensors"`` (everything else: a file, an index, or a Hugging Face directory; that class says what is
    wrong with a path that is none of these)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        entries = os.listdir(p)
        if any(_VERL_FILE.match(e) for e in entries):
            return "verl"
        if ".metadata" in entries:
            return "dcp"
    return "safetensors"


class Checkpoint:
    """A read-only checkpoint on disk, whatever its format: ``Checkpoint(path)`` opens a safetensors file or Hugging
    Face directory (:class:`~lpt_kernels.checkpoint.safetensors.SafetensorsCheckpoint`), a verl FSDP checkpoint
    directory (:class:`~lpt_kernels.checkpoint.verl.VerlCheckpoint`) or a torch.distributed.checkpoint directory
    (:class:`~lpt_kernels.checkpoint.dcp.DcpCheckpoint`), chosen by :func:`detect_format`. Every format answers the
    same questions: ``names`` (file order), ``info(name)`` (:class:`TensorInfo` of the whole tensor), ``config``
    (config.json), ``tensor(name)``, ``rows(name, start, stop)``, ``gather(name, units, axis, block)``,
    ``kind(name)``/``weight(name)`` and ``close()``.

    Subclasses set ``path``, ``config``, ``files``, ``names``, ``nbytes``, ``quant``, ``quant_refused`` and
    ``_infos`` in their ``__init__`` and implement :meth:`tensor`; formats that do not hold whole tensors in one
    place override :meth:`_box` (a rectangle of a tensor) and :meth:`_take` (listed indices along an axis) so that
    rows and units are assembled from the stored pieces without materialising the whole tensor.
    """

    format = ""

    def __new__(cls, path=None, *args, **kwargs):
        if cls is Checkpoint:
            cls = _format_class(detect_format(path) if path is not None and os.path.exists(os.fspath(path))
                                else "safetensors")
        return object.__new__(cls)

    # -- lookup ---------------------------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def __contains__(self, name) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self):
        return iter(self.names)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, {len(self)} tensors, {len(self.files)} file(s), "
                f"{self.nbytes / 2**30:.2f} GiB{', closed' if getattr(self, '_closed', False) else ''})")

    def same_files(self, other: "Checkpoint") -> bool:
        """Whether ``other`` is stored in exactly this checkpoint's files (under any path or link); False when
        either cannot tell (no files, or one cannot be stat'ed)."""
        def ids(c):
            try:
                return frozenset((st.st_dev, st.st_ino) for st in map(os.stat, c.files)) if c.files else None
            except (OSError, TypeError):
                return None
        mine = ids(self)
        return mine is not None and mine == ids(other)

    # -- tensors --------------------------------------------------------------------------------------------------
    def tensor(self, name: str):
        """The whole tensor (a zero-copy view where the format stores it in one piece, else assembled)."""
        raise NotImplementedError

    def _check_open(self, name: str) -> None:
        if getattr(self, "_closed", False):
            raise CheckpointError(f"{self.path}: checkpoint is closed (reading {name!r})")

    def _box(self, name: str, offsets: Sequence[int], sizes: Sequence[int]):
        """The rectangle ``[offsets, offsets + sizes)`` of a tensor (bounds already checked)."""
        t = self.tensor(name)
        for d, (o, n) in enumerate(zip(offsets, sizes)):
            t = t.narrow(d, o, n)
        return t

    def _take(self, name: str, idx, axis: int, within: Optional[Tuple[int, int]]):
        """Indices `idx` (int64, checked) along `axis` of a 1-D or 2-D tensor, the other axis restricted to
        `within`."""
        t = self.tensor(name)
        if within is not None:
            t = t.narrow(1 - axis, within[0], within[1] - within[0])
        return t.index_select(axis, idx)

    def rows(self, name: str, start: int, stop: int):
        """Rows [start, stop) (the first dimension) of a tensor: a zero-copy view where the format allows it."""
        info = self.info(name)
        if not info.shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} is a scalar; it has no rows")
        n = info.shape[0]
        try:
            start, stop = operator.index(start), operator.index(stop)
        except TypeError:
            raise CheckpointError(f"{self.path}: rows of {name!r} need integer bounds, got {start!r}, "
                                  f"{stop!r}") from None
        if not 0 <= start <= stop <= n:
            raise CheckpointError(f"{self.path}: rows [{start}, {stop}) out of range for tensor {name!r} with "
                                  f"{n} rows")
        self._check_open(name)
        return self._box(name, (start,) + (0,) * (len(info.shape) - 1), (stop - start,) + tuple(info.shape[1:]))

    def gather(self, name: str, units, axis: int = 0, block: int = 1, *, within: Optional[Tuple[int, int]] = None):
        """Just the listed units of a tensor: unit u covers indices [u*block, (u+1)*block) along `axis`. Reads only
        those bytes and returns a new tensor, [len(units)*block, cols] for axis 0 or [rows, len(units)*block] for
        axis 1, units in the given order. `within` = (start, stop) restricts the other axis of a 2-D tensor to
        [start, stop) (a rank's local shard: only that part is read)."""
        info = self.info(name)
        nd = len(info.shape)
        if axis not in (0, 1) or axis >= nd:
            raise CheckpointError(f"{self.path}: axis {axis} invalid for tensor {name!r} of shape "
                                  f"{_fmt_shape(info.shape)} (gather takes axis 0 or 1)")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise CheckpointError(f"{self.path}: block must be a positive int, got {block!r}")
        dim = info.shape[axis]
        if dim % block:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {dim} indices along axis {axis}, not a "
                                  f"multiple of block {block}")
        if within is not None:
            other = info.shape[1 - axis] if nd == 2 else None
            if (other is None or not isinstance(within, (tuple, list)) or len(within) != 2
                    or not 0 <= within[0] <= within[1] <= other):
                raise CheckpointError(f"{self.path}: within={within!r} is not a range of the other axis of tensor "
                                      f"{name!r} of shape {_fmt_shape(info.shape)}")
            within = (int(within[0]), int(within[1]))
        idx = as_index(units, f"{self.path}: units for {name!r}")
        nunits = dim // block
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= nunits:
                bad = lo if lo < 0 else hi
                raise CheckpointError(f"{self.path}: unit {bad} out of range for tensor {name!r} ({nunits} units "
                                      f"of {block} along axis {axis})")
        full = (idx[:, None] * block + torch.arange(block)).reshape(-1) if block > 1 else idx
        self._check_open(name)
        return self._take(name, full, axis, within)

    # -- weights (what the analyses read) ---------------------------------------------------------------------------
    def kind(self, name: str) -> str:
        """What the tensor is to an analysis: ``"float"``, ``"fp8_block"`` (read through its block scales),
        ``"scale"`` (the companion of an FP8 weight) or ``"buffer"`` (a non-float tensor that is not a weight). A
        quantized or non-float weight that cannot be read correctly raises :class:`CheckpointError` (see
        :mod:`~lpt_kernels.checkpoint.quantized`)."""
        from lpt_kernels.checkpoint.quantized import classify
        return classify(self, name)

    @property
    def weight_names(self) -> List[str]:
        """:attr:`names` less the scales of FP8 weights (they belong to their weight), in file order."""
        from lpt_kernels.checkpoint.quantized import is_companion
        return [n for n in self.names if not is_companion(self, n)]

    def weight(self, name: str):
        """The tensor as a float weight: :meth:`tensor` for a float dtype; for a block-scaled FP8 weight a new float32
        tensor, dequantized with its ``weight_scale_inv``. Raises :class:`CheckpointError` for anything else."""
        from lpt_kernels.checkpoint.quantized import FP8_BLOCK, dequantize, scale_name
        if self.kind(name) == FP8_BLOCK:
            return dequantize(self.tensor(name), self.tensor(scale_name(name)), self.quant.block)
        if self.kind(name) != "float":
            info = self.info(name)
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {_dtype_name(info.dtype)}; it is not a "
                                  f"weight")
        return self.tensor(name)

    # -- lifetime -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for stream()'s read-ahead: formats that are not one memory mapping per file have none ----------------------
    def _mapping(self, file: str):
        return None

    def _handle(self, file: str):
        return None

    def _chunk(self, file: str) -> int:
        return 128 << 10

    def _load_config(self, *candidates: str) -> None:
        """config.json from the first of `candidates` that exists (sets ``config``, ``quant``, ``quant_refused``)."""
        from lpt_kernels.checkpoint.quantized import scheme_from_config
        self.config = None
        for cfg in candidates:
            if cfg and os.path.isfile(cfg):
                conf = _read_json(cfg, "config.json")
                if not isinstance(conf, dict):
                    raise CheckpointError(f"{cfg}: corrupt config.json (not a JSON object)")
                self.config = conf
                break
        self.quant, self.quant_refused = scheme_from_config(self.config, self.path)


def _format_class(fmt: str):
    if fmt == "verl":
        from lpt_kernels.checkpoint.verl import VerlCheckpoint
        return VerlCheckpoint
    if fmt == "dcp":
        from lpt_kernels.checkpoint.dcp import DcpCheckpoint
        return DcpCheckpoint
    from lpt_kernels.checkpoint.safetensors import SafetensorsCheckpoint
    return SafetensorsCheckpoint


def open_checkpoint(path) -> Checkpoint:
    """``Checkpoint(path)``: the checkpoint at `path` in whichever format it is stored (see :func:`detect_format`)."""
    return Checkpoint(path)


def as_index(units, what: str):
    """Unit ids as a 1-D int64 CPU tensor (a list, range, array or tensor of integers)."""
    if isinstance(units, torch.Tensor):
        t = units.detach().to("cpu")
    elif hasattr(units, "__len__") and len(units) == 0:
        t = torch.empty(0, dtype=torch.int64)
    else:
        try:
            t = torch.as_tensor(list(units) if isinstance(units, range) else units)
        except (TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{what}: not a sequence of integers ({e})") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise CheckpointError(f"{what}: must be integers, got {t.dtype}")
    if t.dim() > 1:
        raise CheckpointError(f"{what}: must be 1-D, got shape {tuple(t.shape)}")
    return t.reshape(-1).to(torch.int64)
