"""Rollback application: revert the selected units of a model or a checkpoint toward a source (docs/rollback.md).

Two entry points share one plan (which tensor slices a :class:`~lpt_kernels.analysis.selection.Selection` touches,
validated in full before the first byte is written) and one kernel (:func:`lpt_kernels.rollback_`):

- :func:`rollback_model_` — *live*, in place on a model's parameters (a ``torch.nn.Module`` on CPU or GPU, or a state
  dict). The source is a checkpoint (directory, index or ``.safetensors`` file, or an open
  :class:`~lpt_kernels.checkpoint.Checkpoint`) or a state dict / module. A checkpoint source is memory-mapped and only
  the selected rows/columns are read from it.
- :func:`rollback_checkpoint` — *files*: TARGET with the selected units of SOURCE written into a new checkpoint
  directory OUT. Every file of TARGET is copied (a reflink where the filesystem has them, else an in-kernel
  ``copy_file_range`` — never a hard link); the touched coordinates are then patched in place through a shared
  writable mapping of the *copy*. The result is built by the package's atomic writer
  (:class:`lpt_kernels.checkpoint.writer.AtomicDir`: a hidden temp directory ``.OUT.tmp-PID-XXXXXXXX`` beside OUT,
  fsynced, renamed to OUT only when complete); TARGET and SOURCE are only read. A failure or an interrupt removes the
  temp directory; a SIGKILL leaves it behind (hidden), and the next write to the same OUT removes such leftovers
  whose process is gone.

This module sits in the analysis layer: it composes the checkpoint package, layout/selection and ops.py.
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from lpt_kernels import distributed, ops
from lpt_kernels import distributed as _dist  # rollback_checkpoint has an argument of that name
from lpt_kernels.analysis.selection import Selection
from lpt_kernels.checkpoint import Checkpoint, CheckpointError, looks_cached
from lpt_kernels.checkpoint.quantized import FP8_BLOCK, FP8_DTYPES, scale_name
from lpt_kernels.checkpoint.streaming import tied_head_absence
from lpt_kernels.checkpoint.writer import AtomicDir, OutputError

__all__ = ["RollbackError", "rollback_model_", "rollback_checkpoint", "touched_elements"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+
_FICLONE = 0x40049409  # _IOW(0x94, 9, int): reflink a whole file (btrfs, XFS, bcachefs, ...)
_TEST_PAUSE_ENV = "LPT_APPLY_TEST_PAUSE"  # test-only: "STAGE:SECONDS", see _test_pause
_SIDE_FILES = re.compile(r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|vocab\..*|"
                         r"merges\.txt|added_tokens\.json|chat_template\..*|preprocessor_config\.json)$")


class RollbackError(ValueError):
    """A rollback that cannot be done (bad inputs, mismatched checkpoints, a failed write); one-line message."""


# ---------------------------------------------------------------------------------------------------------------
# the plan: which elements of which tensors, validated before anything is written


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise RollbackError(f"alpha: expected a number in [0, 1], got {type(alpha).__name__}")
    a = float(alpha)
    if not 0.0 <= a <= 1.0:  # also rejects NaN
        raise RollbackError(f"alpha: must be in [0, 1], got {alpha}")
    return a


def _as_selection(selection) -> Selection:
    if isinstance(selection, Selection):
        return selection
    if isinstance(selection, (str, os.PathLike)):
        return Selection.load(os.fspath(selection))
    raise RollbackError(f"selection: expected a Selection or the path of a selection JSON, got "
                        f"{type(selection).__name__}")


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _resolve_names(wanted: List[str], available: Iterable[str], where: str) -> Dict[str, str]:
    """Map each wanted (selection) tensor name to a name in `available`: the same name, or the same name under one
    consistent prefix rewrite (``model.layers.0...`` vs ``layers.0...`` of a bare decoder, or a wrapper's
    ``base_model.model.`` prefix). Raises RollbackError naming the tensors that cannot be found."""
    avail = set(available)
    missing = [w for w in wanted if w not in avail]
    if not missing:
        return {w: w for w in wanted}
    # candidate rewrites (strip, add) from aligning the first missing name with the longest common dotted suffix
    w0 = missing[0].split(".")
    best, rules = 0, set()
    for a in avail:
        ap = a.split(".")
        k = 0
        while k < len(w0) and k < len(ap) and w0[-1 - k] == ap[-1 - k]:
            k += 1
        if k == 0:
            continue
        rule = (".".join(w0[:len(w0) - k]), ".".join(ap[:len(ap) - k]))
        if k > best:
            best, rules = k, {rule}
        elif k == best:
            rules.add(rule)
    if best >= 3:  # e.g. "mlp.gate_proj.weight" alone is not enough to call it the same tensor
        fits = []
        for strip, add in rules:
            def rewrite(name, strip=strip, add=add):
                if strip and not (name == strip or name.startswith(strip + ".")):
                    return None
                rest = name[len(strip) + 1:] if strip else name
                return f"{add}.{rest}" if add else rest
            mapped = {w: rewrite(w) for w in wanted}
            if all(m is not None and m in avail for m in mapped.values()):
                fits.append(mapped)
        if len(fits) == 1:
            return fits[0]
    shown = ", ".join(repr(m) for m in missing[:3])
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise RollbackError(f"{where} has no tensor {shown}{more} named by the selection")


def touched_elements(selection: Selection) -> Dict[str, Dict[int, torch.Tensor]]:
    """tensor name -> {axis: sorted unique element indices along that axis} that `selection` touches (its units
    expanded by their block). A tensor in several groups gets the union; along two axes, both are listed."""
    per: Dict[str, Dict[int, List[torch.Tensor]]] = {}
    for m, ids in _as_selection(selection).slices():
        if not ids:
            continue
        u = torch.as_tensor(ids, dtype=torch.int64)
        idx = (u[:, None] * m.block + torch.arange(m.block)).reshape(-1) if m.block > 1 else u
        per.setdefault(m.tensor, {}).setdefault(m.axis, []).append(idx)
    return {n: {ax: torch.unique(torch.cat(parts)) for ax, parts in sorted(axes.items())} for n, axes in per.items()}


class _Slice:
    """One tensor of the plan: its name in the selection, in the target and in the source, and the elements."""
    __slots__ = ("sel_name", "tgt_name", "src_name", "axes", "units", "blocks")

    def __init__(self, sel_name, tgt_name, src_name, axes, units, blocks=()):
        self.sel_name, self.tgt_name, self.src_name, self.axes, self.units = sel_name, tgt_name, src_name, axes, units
        self.blocks = blocks  # the (axis, block) of the selection's members on this tensor


def _check_slice(s: _Slice, tshape, tdtype, sshape, sdtype, tgt_where: str, src_where: str) -> None:
    """All checks of one tensor of the plan (before anything is written)."""
    if tdtype not in FLOAT_DTYPES:
        raise RollbackError(f"{tgt_where}: tensor {s.tgt_name!r} has dtype {tdtype}; rollback needs bfloat16, "
                            f"float16 or float32")
    if len(tshape) != 2:
        raise RollbackError(f"{tgt_where}: tensor {s.tgt_name!r} has shape {_fmt_shape(tshape)}; the selection "
                            f"treats it as a 2-D weight")
    if tuple(sshape) != tuple(tshape):
        raise RollbackError(f"mismatched checkpoints: tensor {s.tgt_name!r} has shape {_fmt_shape(tshape)} in "
                            f"{tgt_where} but {_fmt_shape(sshape)} in {src_where}")
    if sdtype not in FLOAT_DTYPES:
        raise RollbackError(f"{src_where}: tensor {s.src_name!r} has dtype {sdtype}; rollback needs bfloat16, "
                            f"float16 or float32")
    for axis, block in s.blocks:
        if tshape[axis] % block:
            raise RollbackError(f"selection: tensor {s.sel_name!r} has units of {block} along axis {axis}, but "
                                f"{tgt_where} has {tshape[axis]} there (shape {_fmt_shape(tshape)}), not a multiple; "
                                f"the selection was made for another model")
    for axis, idx in s.axes.items():
        if idx.numel() and int(idx[-1]) >= tshape[axis]:
            raise RollbackError(f"selection: units of tensor {s.sel_name!r} reach index {int(idx[-1])} along axis "
                                f"{axis}, but {tgt_where} has only {tshape[axis]} (shape {_fmt_shape(tshape)}); "
                                f"the selection was made for another model")


def _source_dtype(ckpt: Checkpoint, name: str):
    """The dtype a checkpoint source is read in: a block-scaled FP8 weight is read dequantized (float32); a
    quantized or non-float weight that cannot be read correctly raises (CheckpointError, naming it)."""
    try:
        return torch.float32 if ckpt.kind(name) == FP8_BLOCK else ckpt.info(name).dtype
    except CheckpointError as e:
        raise RollbackError(str(e)) from None


def _source_tensor(ckpt: Checkpoint, name: str) -> Tuple[torch.Tensor, Optional[int]]:
    """(the source tensor, bytes read if the whole tensor is read): a view of the mapping, or for a block-FP8
    weight its dequantized float32 copy (codes and scales read whole)."""
    if ckpt.kind(name) == FP8_BLOCK:
        scale = ckpt.info(scale_name(name))
        return ckpt.weight(name), ckpt.info(name).nbytes + scale.nbytes
    return ckpt.tensor(name), None


def _in_place(ckpt: Checkpoint) -> bool:
    """Whether a checkpoint source hands out views of one memory mapping per file (safetensors), which rollback
    reads through with read-ahead; other formats (verl rank shards, DCP) are read unit by unit with gather."""
    return getattr(ckpt, "format", "") == "safetensors"


def _refuse_fp8_target(dtype, name: str, where: str) -> None:
    if dtype in FP8_DTYPES:
        raise RollbackError(f"{where}: tensor {name!r} is {dtype} (block-scaled FP8); rolling units back into it "
                            f"would re-quantize scale blocks shared with units outside the selection: roll back into "
                            f"a bf16/fp32 copy of it instead")


def _plan(sel: Selection, target_names, source_names, tgt_where: str, src_where: str) -> List[_Slice]:
    touched = touched_elements(sel)
    names = list(touched)
    tmap = _resolve_names(names, target_names, tgt_where)
    smap = _resolve_names(names, source_names, src_where)
    units, blocks = {}, {}
    for m, ids in sel.slices():
        units[m.tensor] = units.get(m.tensor, 0) + len(ids)
        blocks.setdefault(m.tensor, set()).add((m.axis, m.block))
    return [_Slice(n, tmap[n], smap[n], touched[n], units.get(n, 0), tuple(sorted(blocks.get(n, ()))))
            for n in names]


# ---------------------------------------------------------------------------------------------------------------
# the kernel calls, shared by the live and the file path


def _apply_tensor(target: torch.Tensor, source: torch.Tensor, axes: Dict[int, torch.Tensor], alpha: float,
                  backend: Optional[str]) -> int:
    """Roll back the listed rows (axis 0) and/or columns (axis 1) of `target` toward `source` (same shape; any
    device); returns the bytes read from `source`. Each touched element is moved once, also where a row and a column
    cross (with alpha < 1 the crossing is lerped in the row pass only)."""
    read = 0
    if distributed.is_dtensor(target):  # a sharded parameter: its local shard, from the same rectangle of source
        target, source, axes, _ = distributed.localize_rollback(target, source, axes)
    if target.numel() == 0:  # a zero-size dimension: no element to move
        return 0
    rows, cols = axes.get(0), axes.get(1)
    esize = source.element_size()
    if rows is not None and rows.numel():
        # host ids: the op checks them on the host and moves them without a sync (ids on a GPU cost one)
        ops.rollback_(target, source, rows, axis=0, block=1, alpha=alpha, backend=backend)
        read += rows.numel() * target.shape[1] * esize
    if cols is not None and cols.numel():
        if rows is not None and rows.numel() and alpha != 1.0:
            # Compact fp32 source of the columns (exact for every float dtype) in which the rows already rolled
            # back hold the target's current values: there t + alpha*(t - t) == t, bit for bit.
            s = source.index_select(1, cols.to(source.device)).to(device=target.device, dtype=torch.float32)
            r = rows.to(target.device)
            s[r] = target.index_select(1, cols.to(target.device))[r].float()
            ops._rollback_compact_(target, s, cols, 1, 1, alpha,
                                   ops.resolve_backend(backend, target.device))
        else:
            ops.rollback_(target, source, cols, axis=1, block=1, alpha=alpha, backend=backend)
        read += cols.numel() * target.shape[0] * esize
    return read


def _apply_gathered(target: torch.Tensor, ckpt: Checkpoint, name: str, axes: Dict[int, torch.Tensor], alpha: float,
                    backend: Optional[str]) -> int:
    """:func:`_apply_tensor` from a checkpoint that is not one mapping per file (verl rank shards, DCP): the touched
    rows and columns are gathered from it into compact sources — for a DTensor target, only those inside its local
    shard, so each rank reads just its slice of the selected units. Returns the bytes gathered."""
    if distributed.is_dtensor(target):
        target, _, axes, (offs, sizes) = distributed.localize_rollback(target, None, axes)
    else:
        offs, sizes = (0, 0), tuple(target.shape)
    if target.numel() == 0:
        return 0
    rows, cols = axes.get(0), axes.get(1)
    name_b = ops.resolve_backend(backend, target.device)
    read = 0
    if rows is not None and rows.numel():
        src = ckpt.gather(name, rows + offs[0], axis=0, within=(offs[1], offs[1] + sizes[1]))
        read += src.numel() * src.element_size()
        ops._rollback_compact_(target, src.to(target.device), rows.to(target.device), 0, 1, alpha, name_b)
    if cols is not None and cols.numel():
        src = ckpt.gather(name, cols + offs[1], axis=1, within=(offs[0], offs[0] + sizes[0]))
        read += src.numel() * src.element_size()
        c = cols.to(target.device)
        if rows is not None and rows.numel() and alpha != 1.0:
            # as in _apply_tensor: the rows already rolled back hold the target's values in the column source
            src = src.to(device=target.device, dtype=torch.float32)
            r = rows.to(target.device)
            src[r] = target.index_select(1, c)[r].float()
        ops._rollback_compact_(target, src.to(target.device), c, 1, 1, alpha, name_b)
    return read


def _touched_bytes(shape, itemsize: int, axes: Dict[int, torch.Tensor]) -> int:
    """Bytes of one tensor the plan changes (a crossing of a row and a column counted once)."""
    rows, cols = axes.get(0), axes.get(1)
    nr = rows.numel() if rows is not None else 0
    nc = cols.numel() if cols is not None else 0
    return (nr * shape[1] + nc * shape[0] - nr * nc) * itemsize


def _page_arrays(start: int, shape, itemsize: int, axes: Dict[int, torch.Tensor]):
    """The byte ranges of a row-major 2-D tensor stored at absolute offset `start` that hold touched elements,
    widened down to page boundaries and merged, as two int64 arrays (span starts, span ends): the runs of touched
    rows; the whole tensor where columns are touched (every row holds some). Vectorised (numpy: thousands of rows
    cost microseconds)."""
    row = shape[1] * itemsize
    cols = axes.get(1)
    if cols is not None and cols.numel():
        return np.array([start - start % _PAGE], np.int64), np.array([start + shape[0] * row], np.int64)
    rows = axes.get(0)
    if rows is None or rows.numel() == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    e = start + (rows.to("cpu", torch.int64).numpy() + 1) * row   # sorted unique rows: increasing ends
    b = e - row
    b -= b % _PAGE
    new = np.ones(b.shape, bool)
    new[1:] = b[1:] > e[:-1]                                       # a gap before this row: a new span
    last = np.ones_like(new)
    last[:-1] = new[1:]
    return b[new], e[last]


def _page_spans(start: int, shape, itemsize: int, axes: Dict[int, torch.Tensor]) -> List[Tuple[int, int]]:
    """:func:`_page_arrays` as a list of (start, end)."""
    b, e = _page_arrays(start, shape, itemsize, axes)
    return list(zip(b.tolist(), e.tolist()))


class _ReadAhead(threading.Thread):
    """Asks the kernel to read the source byte ranges of upcoming tensors (posix_fadvise WILLNEED: the reads are
    queued ahead, in file order, instead of one page fault at a time when the kernel reaches them), from a
    background thread (on a cold disk each advice call blocks while it queues its reads), up to `budget` bytes
    ahead of the tensor being applied (always at least that one and the next). Only advice: an error stops it.

    `jobs` is one (file, (span starts, span ends)) per tensor (see :func:`_page_arrays`), in the order they are
    applied; :meth:`consumed` says which one is about to run; :meth:`close` stops the thread and closes its
    files. (A tensor whose sampled spans are all in the page cache gets no advice: there it would only take CPU
    from the kernels; on a cold source the advice lets the disk stream at full bandwidth — 2.3x faster measured.)"""

    def __init__(self, jobs: list, budget: int = 512 << 20):
        super().__init__(name="lpt-rollback-readahead", daemon=True)
        self.jobs = jobs
        self.prefix = [0]
        for _, (b, e) in self.jobs:
            self.prefix.append(self.prefix[-1] + int((e - b).sum()))
        self.budget = budget
        self.cur = 0
        self.stopped = False
        self.cond = threading.Condition()
        self.fds: Dict[str, int] = {}
        if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED") and self.jobs:
            self.start()

    def _wanted(self, k: int) -> bool:
        return k < len(self.jobs) and (k <= self.cur + 1 or self.prefix[k + 1] - self.prefix[self.cur] <= self.budget)

    def consumed(self, k: int) -> None:
        with self.cond:
            self.cur = k
            self.cond.notify()

    def run(self) -> None:
        nxt = 0
        try:
            while True:
                with self.cond:
                    while not self.stopped and not self._wanted(max(nxt, self.cur)):
                        self.cond.wait()
                    if self.stopped:
                        return
                    nxt = max(nxt, self.cur)  # never advise what is already being applied behind us
                f, (starts, ends) = self.jobs[nxt]
                fd = self.fds.get(f)
                if fd is None:
                    fd = self.fds[f] = os.open(f, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                probe = starts[:: max(1, len(starts) // 8)].tolist()  # a warm source needs no advice
                if probe and all(looks_cached(fd, a, a + 1, samples=1) for a in probe):
                    nxt += 1
                    continue
                for a, b in zip(starts.tolist(), ends.tolist()):
                    if self.stopped or self.cur > nxt:
                        break
                    os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
                nxt += 1
        except (OSError, ValueError):
            return  # only advice

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.is_alive():
            self.join()
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def _source_job(info, axes) -> tuple:
    return info.file, _page_arrays(info.start, info.shape, info.dtype.itemsize, axes)


# ---------------------------------------------------------------------------------------------------------------
# live rollback


def _named_tensors(obj, what: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        distributed.settle(obj)  # FSDP2: write the sharded parameters, never unsharded copies
        return dict(obj.named_parameters(remove_duplicate=False))
    if isinstance(obj, Mapping):
        bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise RollbackError(f"{what}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor")
        return dict(obj)
    raise RollbackError(f"{what}: expected a torch.nn.Module or a state dict, got {type(obj).__name__}")


def rollback_model_(model, source, selection, alpha: float = 1.0, *, backend: Optional[str] = None) -> dict:
    """Roll the selected units of `model` back toward `source`, in place: ``w += alpha * (w_source - w)`` on the
    selected rows/columns (``alpha=1`` copies the source values exactly, rounded to the parameter's dtype).

    - `model`: a ``torch.nn.Module`` (its parameters, on CPU or GPU) or a state dict ``name -> tensor``.
    - `source`: a checkpoint (directory, ``*.safetensors.index.json``, ``.safetensors`` file, or a
      :class:`~lpt_kernels.checkpoint.Checkpoint`), memory-mapped: only the selected rows/columns are read; or a
      state dict / module (its tensors may be on another device than the model's).
    - `selection`: a :class:`~lpt_kernels.analysis.selection.Selection` or the path of its JSON.

    Names may differ by one consistent prefix (``model.layers...`` vs ``layers...``). Every slice is checked first
    (tensors exist on both sides with equal 2-D shapes, float dtypes, unit ids in range): on a bad input nothing is
    written. Returns stats: ``tensors`` (tensors touched), ``units`` (selected units), ``elements`` (coordinates
    changed), ``bytes_touched`` (their bytes in the model), ``bytes_read`` (bytes read from the source, counted),
    ``seconds``.
    """
    t0 = time.perf_counter()
    alpha = _check_alpha(alpha)
    sel = _as_selection(selection)
    params = _named_tensors(model, "model")
    own_ckpt = None
    if isinstance(source, Checkpoint):
        ckpt = source
    elif isinstance(source, (str, os.PathLike)):
        ckpt = own_ckpt = Checkpoint(source)
    else:
        ckpt = None
        src_tensors = _named_tensors(source, "source")
    try:
        src_where = f"source {ckpt.path}" if ckpt is not None else "the source state dict"
        plan = _plan(sel, params.keys(), ckpt.names if ckpt is not None else src_tensors.keys(), "the model",
                     src_where)
        # validate everything before the first write
        seen: Dict[tuple, _Slice] = {}
        merged: List[Tuple[_Slice, torch.Tensor]] = []
        for s in plan:
            t = params[s.tgt_name]
            if ckpt is not None:
                sshape, sdtype = ckpt.info(s.src_name).shape, _source_dtype(ckpt, s.src_name)
            else:
                st = src_tensors[s.src_name]
                sshape, sdtype = tuple(st.shape), st.dtype
                if st.device.type == "meta":
                    raise RollbackError(f"source: tensor {s.src_name!r} is on the meta device (not materialised)")
            _refuse_fp8_target(t.dtype, s.tgt_name, "model")
            _check_slice(s, tuple(t.shape), t.dtype, sshape, sdtype, "the model", src_where)
            if t.device.type == "meta":
                raise RollbackError(f"model: parameter {s.tgt_name!r} is on the meta device (not materialised)")
            lt = distributed.local_tensor(t)
            key = (t.device, lt.data_ptr(), tuple(t.shape), tuple(lt.stride()))
            if key in seen:  # tied aliases of one parameter: merge, so alpha < 1 is applied once
                other = seen[key]
                for ax, idx in s.axes.items():
                    other.axes[ax] = torch.unique(torch.cat([other.axes[ax], idx])) if ax in other.axes else idx
                other.units += s.units
                continue
            seen[key] = s
            merged.append((s, t))
        stats = {"tensors": len(merged), "units": sel.count(), "elements": 0, "bytes_touched": 0, "bytes_read": 0}
        for dev in {t.device for _, t in merged}:  # a bad backend name is an error before the first write
            ops.resolve_backend(backend, dev)
        ra = (_ReadAhead([_source_job(ckpt.info(s.src_name), s.axes) for s, _ in merged]) if ckpt is not None
              and _in_place(ckpt) else None)
        try:
            with torch.no_grad():
                for k, (s, t) in enumerate(merged):
                    whole = None
                    if ckpt is not None and not _in_place(ckpt) and ckpt.kind(s.src_name) != FP8_BLOCK:
                        got = _apply_gathered(t, ckpt, s.src_name, s.axes, alpha, backend)
                    else:
                        if ckpt is not None:
                            if ra is not None:
                                ra.consumed(k)
                            src, whole = _source_tensor(ckpt, s.src_name)
                        else:
                            src = src_tensors[s.src_name]
                        got = _apply_tensor(t, src, s.axes, alpha, backend)
                    stats["bytes_read"] += got if whole is None else whole
                    n = _touched_bytes(tuple(t.shape), 1, s.axes)
                    stats["elements"] += n
                    stats["bytes_touched"] += n * t.element_size()
        finally:
            if ra is not None:
                ra.close()
    finally:
        if own_ckpt is not None:
            own_ckpt.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


# ---------------------------------------------------------------------------------------------------------------
# file rollback: copy, patch through a writable mapping of the copy, fsync, rename


def _test_pause(stage: str) -> None:
    """Test-only: with LPT_APPLY_TEST_PAUSE="STAGE:SECONDS" set, sleep at STAGE ("copied": after each file is
    written into the temp dir; "patched": after a shard is patched, its writable mapping still open and unflushed),
    so that a test can SIGKILL the process at a known point of the write. Does nothing otherwise."""
    spec = os.environ.get(_TEST_PAUSE_ENV)
    if not spec:
        return
    want, _, secs = spec.partition(":")
    if want == stage:
        import sys

        print(f"lpt-test-pause {stage}", file=sys.stderr, flush=True)
        time.sleep(float(secs or 1))


def _try_reflink(src_fd: int, dst_fd: int) -> bool:
    import fcntl

    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return True
    except OSError:
        return False  # ext4, tmpfs, another filesystem, across filesystems: copy the bytes


class _Copier(threading.Thread):
    """Copies files in order in the background, in chunks, publishing how far it got, so that the patches of a
    shard run right behind the copy front (while the copy goes on, and while its pages are still in the page
    cache). Each file: a reflink (FICLONE) where the filesystem shares extents, else copy_file_range (in the
    kernel) into the file pre-sized to its length, else pread/pwrite. Never a link. The first error stops it and is
    re-raised in the caller by :meth:`wait_for`; :meth:`halt` stops it between chunks."""

    CHUNK = 256 << 20

    def __init__(self, jobs: List[Tuple[str, str]]):
        super().__init__(name="lpt-rollback-copy", daemon=True)
        self.jobs = jobs
        self.cond = threading.Condition()
        # The copy front: file index, bytes done in it. File i is published (at offset 0) only once it exists at its
        # full length: before that a patcher must not open or map it.
        self.file, self.offset = -1, 0
        self.error: Optional[BaseException] = None
        self.stopped = False
        self.reflinked = 0
        self.seconds = 0.0

    def _publish(self, i: int, off: int) -> None:
        with self.cond:
            self.file, self.offset = i, off
            self.cond.notify_all()

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            dst = None
            for i, (src, dst) in enumerate(self.jobs):
                self._copy(i, src, dst)
                shutil.copymode(src, dst)
                if self.stopped:
                    return
            self._publish(len(self.jobs), 0)
        except BaseException as e:  # noqa: B902 -- handed to the caller
            e.lpt_dst = dst  # which file, for the message
            with self.cond:
                self.error = e
                self.cond.notify_all()
        finally:
            self.seconds = time.perf_counter() - t0

    def _copy(self, i: int, src: str, dst: str) -> None:
        with open(src, "rb") as fi:
            size = os.fstat(fi.fileno()).st_size
            fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                if size and _try_reflink(fi.fileno(), fd):
                    self.reflinked += 1
                    self._publish(i, size)
                    return
                os.ftruncate(fd, size)  # mappable at full length while the copy fills it in
                self._publish(i, 0)
                done = 0
                use_cfr = hasattr(os, "copy_file_range")
                while done < size:
                    if self.stopped:
                        return
                    n = min(size - done, self.CHUNK)
                    if use_cfr:
                        try:
                            w = os.copy_file_range(fi.fileno(), fd, n, done, done)
                        except OSError as e:
                            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM,
                                           errno.ETXTBSY):
                                use_cfr = False  # not between these files: plain reads and writes
                                continue
                            raise
                    else:
                        buf = os.pread(fi.fileno(), min(n, 16 << 20), done)
                        w, view = 0, memoryview(buf)
                        while w < len(buf):
                            w += os.pwrite(fd, view[w:], done + w)
                    if w == 0:
                        raise OSError(errno.EIO, f"{src} shrank while being copied", src)
                    done += w
                    self._publish(i, done)
            finally:
                os.close(fd)

    def wait_for(self, i: int, offset: int) -> None:
        """Block until bytes [0, offset) of file i are copied (or the whole file, with offset None)."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.file > i or (self.file == i and offset is not None and self.offset >= offset):
                    return
                if not self.is_alive() and self.file <= i:
                    raise RuntimeError("the copy thread ended early")
                self.cond.wait(0.1)

    def halt(self) -> None:
        self.stopped = True
        if self.is_alive():
            self.join()


def _patch_shard(dst: str, items, src_ckpt: Checkpoint, alpha: float, backend: Optional[str],
                 ra: Optional[_ReadAhead] = None, copied: Optional[Callable[[int], None]] = None) -> int:
    """Patch the touched tensors of one copied shard in place through a shared writable mapping of the copy.
    `items`: [(slice, target TensorInfo, source TensorInfo)] in file order; `ra` a read-ahead over their sources,
    already started; `copied(offset)` blocks until the copy has written bytes [0, offset) of `dst` (the file has
    its full length from the start). Returns bytes read from the source."""
    read = 0
    fd = os.open(dst, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        populate = True
        try:
            for k, (s, ti, si) in enumerate(items):
                if ra is not None:
                    ra.consumed(k)
                if copied is not None:  # the tensor's pages, the partial last one included, hold the copy's bytes
                    copied(min(size, ti.end + _PAGE))
                # Fault the pages to be written in one call per run: faster than a trap per page, and where the
                # filesystem must allocate on write (a reflinked copy), a full disk is an error here, not a SIGBUS.
                if populate:
                    for a, b in _page_spans(ti.start, ti.shape, ti.dtype.itemsize, s.axes):
                        try:
                            mm.madvise(_MADV_POPULATE_WRITE, a, b - a)
                        except OSError as e:
                            if e.errno in (errno.EINVAL, errno.ENOSYS):  # kernel without it: fault on write
                                populate = False
                                break
                            if e.errno == errno.EFAULT:
                                raise OSError(errno.ENOSPC, "cannot allocate the pages to patch (disk full?)",
                                              dst) from None
                            raise
                numel = ti.numel
                if numel == 0:  # a zero-size dimension: nothing to write
                    continue
                if _in_place(src_ckpt) or src_ckpt.kind(s.src_name) == FP8_BLOCK:
                    src, whole = _source_tensor(src_ckpt, s.src_name)
                    apply = lambda t: _apply_tensor(t, src, s.axes, alpha, backend)  # noqa: E731
                else:
                    src, whole = None, None
                    apply = lambda t: _apply_gathered(t, src_ckpt, s.src_name, s.axes, alpha, backend)  # noqa: E731
                if ti.start % ti.dtype.itemsize == 0:
                    tgt = torch.frombuffer(mm, dtype=ti.dtype, count=numel, offset=ti.start).view(ti.shape)
                    got = apply(tgt)
                    del tgt
                else:  # unaligned (never written by the safetensors library): patch an aligned copy, write it back
                    raw = torch.frombuffer(mm, dtype=torch.uint8, count=ti.end - ti.start, offset=ti.start)
                    tgt = raw.clone().view(ti.dtype).view(ti.shape)
                    got = apply(tgt)
                    raw.copy_(tgt.view(-1).view(torch.uint8))
                    del raw, tgt
                read += got if whole is None else whole
                del src, apply
            _test_pause("patched")
            # no msync here: the dirty pages of a shared mapping are the file's page cache, written back by the
            # fsync of every file before the rename, together with the copy's own dirty pages
        finally:
            try:
                mm.close()
            except BufferError:
                pass  # a view still alive somewhere: unmapped when it goes; its writes are in the page cache
    finally:
        os.close(fd)
    return read


def _target_files(ckpt: Checkpoint, target: str) -> Tuple[str, List[Tuple[str, str]]]:
    """(base dir, [(absolute source path, path relative to the output)]) of every file the output gets."""
    if os.path.isdir(target):
        base = os.path.abspath(target)
        files = []
        for root, dirs, names in os.walk(base, followlinks=False):
            dirs.sort()
            for n in sorted(names):
                p = os.path.join(root, n)
                if os.path.isfile(p):  # regular files and symlinks to them (HF cache snapshots): their bytes
                    files.append((p, os.path.relpath(p, base)))
        return base, files
    base = os.path.dirname(os.path.abspath(target))
    wanted = {os.path.abspath(f) for f in ckpt.files}
    if target.endswith(".json"):
        wanted.add(os.path.abspath(target))
    for n in sorted(os.listdir(base)):
        if _SIDE_FILES.match(n) and os.path.isfile(os.path.join(base, n)):
            wanted.add(os.path.join(base, n))
    return base, [(p, os.path.relpath(p, base)) for p in sorted(wanted)]


def _check_match(tc: Checkpoint, sc: Checkpoint) -> None:
    """The two checkpoints hold the same tensors with the same shapes (float dtypes may differ; the scales of a
    block-FP8 weight belong to it; a tied lm_head stored by one of them follows the rule of
    :func:`~lpt_kernels.checkpoint.streaming.tied_head_absence`, as in lpt diff)."""
    problems = []
    tnames, snames = tc.weight_names, sc.weight_names
    for n in tnames:
        if n not in sc:
            if tied_head_absence([tc, sc], n) is None:
                problems.append(f"tensor {n!r} is in TARGET but not in SOURCE")
        elif tc.info(n).shape != sc.info(n).shape:
            problems.append(f"tensor {n!r} has shape {_fmt_shape(tc.info(n).shape)} in TARGET but "
                            f"{_fmt_shape(sc.info(n).shape)} in SOURCE")
        if len(problems) > 3:
            break
    if len(problems) <= 3:
        problems += [f"tensor {n!r} is in SOURCE but not in TARGET" for n in snames
                     if n not in tc and tied_head_absence([tc, sc], n) is None][:4]
    if problems:
        more = " ..." if len(problems) > 3 else ""
        raise RollbackError(f"mismatched checkpoints {tc.path} (TARGET) and {sc.path} (SOURCE): "
                            + "; ".join(problems[:3]) + more)


class _Signals:
    """While the write runs (main thread only): SIGTERM and SIGHUP raise KeyboardInterrupt (so the temp dir is
    removed, as for Ctrl-C), and SIGXFSZ is ignored, so that a write past RLIMIT_FSIZE fails with EFBIG and is
    cleaned up instead of killing the process. Handlers a caller installed are left alone."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is not threading.main_thread():
            return self

        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        for name, handler in (("SIGTERM", interrupt), ("SIGHUP", interrupt), ("SIGXFSZ", signal.SIG_IGN)):
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                if signal.getsignal(sig) == signal.SIG_DFL:
                    self.saved[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.saved.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass
        return False


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def rollback_checkpoint(target, source, selection, out, alpha: float = 1.0, progress: bool = False, *,
                        backend: Optional[str] = None, strict: bool = True, force: bool = False,
                        distributed: bool = False) -> dict:
    """Write a new checkpoint directory `out`: `target` with the units of `selection` rolled back toward `source`
    (``w += alpha * (w_source - w)`` on the selected rows/columns; ``alpha=1`` copies the source bits).

    - `target`, `source`: checkpoints (a Hugging Face directory, an ``*.safetensors.index.json`` or a
      ``.safetensors`` file); only read, never modified. With `strict` (default) they must hold the same tensors
      with the same shapes (float dtypes may differ, e.g. fp32 master weights as the source); without, only the
      touched tensors are compared.
    - `selection`: a Selection or the path of its JSON; every tensor it names must be in both checkpoints (one
      consistent name prefix difference is tolerated), 2-D, float, and its unit ids in range.
    - `out`: a new directory (or an empty one); an existing non-empty directory is refused unless `force` (then it
      is replaced, in one step, once the new checkpoint is complete); TARGET, SOURCE, a path inside them or one
      containing them are always refused. Its parent is created if missing.
    - `alpha` in [0, 1]; `progress` shows a tqdm bar on stderr; `backend` picks the kernel backend.

    Every file of the target (directory: all files, subdirectories included; a file: its shards, its index and the
    config / generation config / tokenizer files beside it) is copied into a temp directory beside `out` (reflink
    where possible, else copy_file_range; never a hard link); each shard holding a touched tensor is then patched
    in place through a shared writable mapping of the copy, right after its copy. All files and directories are
    fsynced, the temp directory is renamed to `out` (renameat2 NOREPLACE; RENAME_EXCHANGE to replace an old output
    with `force`) and the parent fsynced (:class:`lpt_kernels.checkpoint.writer.AtomicDir`). Any error or
    interrupt (KeyboardInterrupt, SIGTERM, SIGHUP) removes the temp directory and re-raises (write errors such as
    ENOSPC or EFBIG as a one-line :class:`RollbackError`); a killed process leaves ``.OUT.tmp-PID-XXXXXXXX`` in
    `out`'s parent, removed by the next call with the same `out`. Checks all come before the first write.

    With `distributed` (``lpt rollback`` under torchrun; every rank calls it with the same arguments, on storage
    they all see), the files are split across the ranks of the process group balanced by bytes: each rank copies
    and patches its own files into the one temp directory (rank 0 makes it), fsyncs them, and after every rank
    reported success rank 0 publishes the directory with the one atomic rename; a failure on any rank removes the
    temp directory and raises on every rank. The stats are summed over the ranks, with ``world_size`` and
    ``ranks`` (each rank's files, bytes copied and bytes read).

    Returns stats: ``out``, ``tensors``, ``units``, ``elements``, ``bytes_touched``, ``bytes_read`` (from the
    source), ``files_copied``, ``files_patched``, ``bytes_copied``, ``reflinked`` (files), ``stale_removed``
    (leftover temp dirs removed), ``seconds``, ``copy_seconds``, ``patch_seconds``, ``sync_seconds``.
    """
    t0 = time.perf_counter()
    alpha = _check_alpha(alpha)
    sel = _as_selection(selection)
    for what, p in (("target", target), ("source", source), ("out", out)):
        if not isinstance(p, (str, os.PathLike)):
            raise RollbackError(f"{what}: expected a path, got {type(p).__name__}")
    target, source = os.fspath(target), os.fspath(source)
    try:
        writer = AtomicDir(out, force=force, inputs=(target, source), what="out")
    except OutputError as e:
        raise RollbackError(str(e)) from None
    out, name = writer.out, writer.name

    with Checkpoint(target) as tc, Checkpoint(source) as sc:
        if tc.same_files(sc):
            warnings.warn(f"lpt rollback: TARGET {tc.path} and SOURCE {sc.path} are the same files: the rollback "
                          f"changes nothing", RuntimeWarning, stacklevel=2)
        if not _in_place(tc):
            raise RollbackError(f"TARGET {tc.path}: a {tc.format} checkpoint can be a rollback SOURCE (--from) but "
                                f"not the TARGET: the output is a copy of TARGET's safetensors files (merge it to "
                                f"safetensors first)")
        if strict:
            _check_match(tc, sc)
        plan = _plan(sel, tc.names, sc.names, f"TARGET {tc.path}", f"SOURCE {sc.path}")
        by_file: Dict[str, list] = {}
        for s in plan:
            ti, si = tc.info(s.tgt_name), sc.info(s.src_name)
            _refuse_fp8_target(ti.dtype, s.tgt_name, f"TARGET {tc.path}")
            _check_slice(s, ti.shape, ti.dtype, si.shape, _source_dtype(sc, s.src_name), f"TARGET {tc.path}",
                         f"SOURCE {sc.path}")
            by_file.setdefault(os.path.abspath(ti.file), []).append((s, ti, si))
        for items in by_file.values():
            items.sort(key=lambda it: it[1].start)
        base, files = _target_files(tc, target)
        missing = [f for f in by_file if f not in {p for p, _ in files}]
        if missing:  # a shard outside the target directory (an index pointing elsewhere): cannot be reproduced
            raise RollbackError(f"TARGET {tc.path}: shard {missing[0]} is not inside {base}; cannot copy it to out")
        total = sum(os.path.getsize(p) for p, _ in files)
        if plan:
            ops.resolve_backend(backend, torch.device("cpu"))  # a bad backend name fails before the first write

        stats = {"out": out, "tensors": len(plan), "units": sel.count(), "elements": 0, "bytes_touched": 0,
                 "bytes_read": 0, "files_copied": 0, "files_patched": 0, "bytes_copied": 0, "reflinked": 0,
                 "copy_seconds": 0.0, "patch_seconds": 0.0, "sync_seconds": 0.0}
        for s in plan:
            ti = tc.info(s.tgt_name)
            n = _touched_bytes(ti.shape, 1, s.axes)
            stats["elements"] += n
            stats["bytes_touched"] += n * ti.dtype.itemsize
        if distributed and _dist.world()[1] > 1:
            return _write_ranked(writer, files, by_file, sc, stats, alpha, backend, t0)

        stats["stale_removed"] = []
        tmp = None
        bar = _progress_bar(total, progress, f"rollback -> {name}")
        copier = None
        current = None
        try:
            with _Signals():
                tmp = writer.open()
                stats["stale_removed"] = writer.stale_removed
                dirs = {tmp}
                jobs = []
                for src_path, rel in files:
                    dst = os.path.join(tmp, rel)
                    d = os.path.dirname(dst)
                    if d not in dirs:
                        os.makedirs(d, exist_ok=True)
                        dirs.add(d)
                    jobs.append((src_path, dst))
                copier = _Copier(jobs)
                copier.start()
                for i, (src_path, rel) in enumerate(files):
                    current = rel
                    dst = jobs[i][1]
                    items = by_file.get(os.path.abspath(src_path))
                    if items:
                        _patch_behind_copy(copier, i, dst, items, sc, alpha, backend, stats)
                    copier.wait_for(i, None)
                    stats["files_copied"] += 1
                    size = os.path.getsize(dst)
                    stats["bytes_copied"] += size
                    if bar is not None:
                        bar.update(size)
                    _test_pause("copied")
                current = None
                copier.join()
                stats["copy_seconds"], stats["reflinked"] = copier.seconds, copier.reflinked
                s0 = time.perf_counter()
                writer.commit()  # fsync every file and directory, rename into place, fsync the parent
                stats["sync_seconds"] = time.perf_counter() - s0
        except BaseException as e:
            if copier is not None:
                copier.halt()
            writer.abort()
            if isinstance(e, OutputError):
                raise RollbackError(str(e)) from None
            if isinstance(e, OSError):
                bad = getattr(e, "lpt_dst", None)
                bad = os.path.relpath(bad, tmp) if bad and tmp else current
                where = f" (writing {bad})" if bad else ""
                if e.errno == errno.EEXIST and not current:
                    raise RollbackError(f"out: {out} appeared while the rollback ran; left it alone (nothing "
                                        f"written)") from None
                raise RollbackError(f"out: cannot write {out}: {e.strerror or e}{where}; nothing was written "
                                    f"there and the temp dir was removed") from None
            raise
        finally:
            if bar is not None:
                bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _patch_behind_copy(copier: "_Copier", k: int, dst: str, items, sc: Checkpoint, alpha: float,
                       backend: Optional[str], stats: dict) -> None:
    """Patch the copier's file k (dst, holding the tensors of ``items``) right behind its copy front, the source reads
    running ahead of the patch (on a source read in place) and overlapping the copy."""
    ra = _ReadAhead([_source_job(si, s.axes) for s, _, si in items] if _in_place(sc) else [])
    try:
        ra.consumed(0)
        copier.wait_for(k, 0)
        p0 = time.perf_counter()
        stats["bytes_read"] += _patch_shard(dst, items, sc, alpha, backend, ra, lambda off: copier.wait_for(k, off))
        stats["patch_seconds"] += time.perf_counter() - p0
        stats["files_patched"] += 1
    finally:
        ra.close()


def _write_ranked(writer: AtomicDir, files, by_file, sc: Checkpoint, stats: dict, alpha: float,
                  backend: Optional[str], t0: float) -> dict:
    """rollback_checkpoint's write split over the ranks of the process group: rank 0 opens the writer's temp
    directory, every rank copies and patches the files of its share (balanced by bytes) and fsyncs them, and once
    all ranks report success rank 0 commits the writer (the one atomic rename; with ``force`` the swap); any failure
    removes the temp directory and raises on every rank."""
    rank, world = _dist.world()
    out = writer.out
    mine = _dist.partition([os.path.getsize(p) for p, _ in files], world)[rank]
    tmp, err = None, None
    if rank == 0:
        try:
            tmp = writer.open()
            stats["stale_removed"] = writer.stale_removed
        except OSError as e:
            err, tmp = e, None
    tmp = _dist.broadcast_object(tmp)
    if tmp is None:
        if err is not None:
            raise RollbackError(f"out: cannot create the temp directory beside {out}: {err.strerror or err}")
        raise RollbackError(f"out: rank 0 could not create the temp directory beside {out}")
    stats.setdefault("stale_removed", [])
    copier, current = None, None
    try:
        with _Signals():
            jobs = []
            for i in mine:
                src_path, rel = files[i]
                dst = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)  # other ranks may make the same directories
                jobs.append((src_path, dst))
            copier = _Copier(jobs)
            copier.start()
            for k, i in enumerate(mine):
                src_path, rel = files[i]
                current, dst = rel, jobs[k][1]
                items = by_file.get(os.path.abspath(src_path))
                if items:
                    _patch_behind_copy(copier, k, dst, items, sc, alpha, backend, stats)
                copier.wait_for(k, None)
                stats["files_copied"] += 1
                stats["bytes_copied"] += os.path.getsize(dst)
            current = None
            copier.join()
            stats["copy_seconds"], stats["reflinked"] = copier.seconds, copier.reflinked
            s0 = time.perf_counter()
            for _, dst in jobs:  # each rank makes its own files durable (on shared storage only the writer can)
                fd = os.open(dst, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            stats["sync_seconds"] = time.perf_counter() - s0
    except BaseException as e:  # noqa: B902 -- every rank learns of it below
        if copier is not None:
            copier.halt()
        err = e if not isinstance(e, OSError) else RollbackError(
            f"out: cannot write {out}: {e.strerror or e}" + (f" (writing {current})" if current else "")
            + "; nothing was written there and the temp dir was removed")
    failed = _dist.all_ok(err)
    if failed is None and rank == 0:  # publish: every rank's files are complete and durable
        try:
            s0 = time.perf_counter()
            writer.commit()  # fsync the tree, rename into place (no-replace, or the swap with force), fsync parent
            stats["sync_seconds"] += time.perf_counter() - s0
        except OutputError as e:
            err = RollbackError(str(e))
        except OSError as e:
            err = RollbackError(f"out: cannot publish {out}: {e.strerror or e}")
        failed = _dist.all_ok(err)
    elif failed is None:
        failed = _dist.all_ok(None)
    if failed is not None:
        if rank == 0:
            writer.abort()
        if err is not None:
            raise err
        raise RollbackError(f"out: the rollback failed on another rank ({failed}); nothing was written to {out}")
    parts = _dist.gather_objects({k: stats[k] for k in ("bytes_read", "files_copied", "files_patched",
                                                         "bytes_copied", "reflinked")})
    if parts is not None:
        for k in ("bytes_read", "files_copied", "files_patched", "bytes_copied", "reflinked"):
            stats[k] = sum(p[k] for p in parts)
        stats["ranks"] = [{"files": p["files_copied"], "bytes_copied": p["bytes_copied"], "bytes_read": p["bytes_read"]}
                          for p in parts]
    stats["world_size"] = world
    stats["seconds"] = time.perf_counter() - t0
    return stats
