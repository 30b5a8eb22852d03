"""Streaming, zero-copy reads of (sharded) safetensors checkpoints.

A :class:`Checkpoint` parses the safetensors headers itself (8-byte little-endian header length, JSON header),
validates them against the file sizes, and maps every shard once, privately (copy-on-write): a tensor it returns is a
view of that mapping, built with ``torch.frombuffer`` — no bytes are copied and none are read until they are touched,
and a write into a returned tensor changes this process's private copy only, never the file.

:func:`align` checks that several checkpoints hold the same tensors with the same shapes; :func:`stream` walks a list of
tensor names over K checkpoints in lockstep while a background thread asks the kernel to read ahead
(``POSIX_FADV_WILLNEED``, the kernel path of ``madvise(MADV_WILLNEED)`` on a file mapping, without holding the GIL)
so that disk reads overlap the compute of the caller.

This module depends on torch and the standard library only (DESIGN.md section 2: nothing above it).
"""
from __future__ import annotations

import json
import mmap
import operator
import os
import platform
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["CheckpointError", "TensorInfo", "Checkpoint", "Alignment", "align", "stream"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or checkpoints do not match; the message is one line naming the file, the
    tensor and the problem."""


# safetensors dtype strings -> torch dtypes (those this torch has). Sub-byte formats (F4, F6_*) are listed with
# dtype None: they can be named and aligned, but not materialised.
_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64",
    "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
DTYPES: Dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
_DTYPE_STR = {v: k for k, v in DTYPES.items()}

_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"
_PAGE = mmap.PAGESIZE
_MIN_CHUNK = 128 << 10  # the smallest readahead window a Linux block device is configured with
# mmap.MAP_NORESERVE exists from Python 3.12; its Linux value is 0x4000 except on a few architectures.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0) or (
    0x4000 if sys.platform.startswith("linux") and platform.machine().lower() in (
        "x86_64", "amd64", "aarch64", "arm64", "riscv64", "s390x", "i386", "i686", "loongarch64") else 0)


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


def _parse_header(file: str) -> Tuple[List[TensorInfo], int]:
    """Read and validate one safetensors header; returns the tensors (in data order) and the file size."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{file}: corrupt safetensors header (file of {size} bytes is too short "
                                      f"to hold the 8-byte header length)")
            hlen = int.from_bytes(raw_len, "little")
            if hlen > size - 8:
                raise CheckpointError(f"{file}: corrupt safetensors header (header length {hlen} exceeds the "
                                      f"file size {size}; not a safetensors file?)")
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    if len(raw) < hlen:
        raise CheckpointError(f"{file}: truncated shard (header of {hlen} bytes, file has {size} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: corrupt safetensors header (invalid JSON: {msg})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (JSON is a {type(header).__name__}, "
                              f"not an object)")
    base = 8 + hlen
    data_size = size - base
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{file}: corrupt safetensors header: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} entry is not an object")
        dstr, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dstr, str):
            raise CheckpointError(f"{where} has no dtype string")
        if (not isinstance(shape, list)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise CheckpointError(f"{where} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{where} has invalid data_offsets {offs!r}")
        dtype = DTYPES.get(dstr)
        numel = 1
        for s in shape:
            numel *= s
        if dtype is not None and (offs[1] - offs[0]) != numel * dtype.itemsize:
            raise CheckpointError(f"{where} has data_offsets {offs} ({offs[1] - offs[0]} bytes) but shape "
                                  f"{_fmt_shape(shape)} of {dstr} needs {numel * dtype.itemsize} bytes")
        if offs[1] > data_size:
            raise CheckpointError(f"{file}: truncated shard: tensor {name!r} ends at byte {base + offs[1]} "
                                  f"but the file has only {size} bytes")
        infos.append(TensorInfo(name, dtype, tuple(shape), file, base + offs[0], base + offs[1]))
    infos.sort(key=lambda i: (i.start, i.end))
    prev = None
    for info in infos:
        if prev is not None and info.start < prev.end and info.end > info.start:
            raise CheckpointError(f"{file}: corrupt safetensors header: tensors {prev.name!r} and {info.name!r} "
                                  f"overlap (bytes {prev.start}-{prev.end} and {info.start}-{info.end})")
        if prev is None or info.end > prev.end:
            prev = info
    return infos, size


def _read_json(file: str, what: str):
    try:
        with open(file, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read {what}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: corrupt {what} (invalid JSON: {msg})") from None


def _map_private(fd: int) -> mmap.mmap:
    """The whole file, mapped private and writable (copy-on-write, like ACCESS_COPY): writes stay in this process.
    MAP_NORESERVE keeps the kernel from charging the mapping's size to the commit limit up front: only pages that
    are actually written cost anonymous memory, so a 16 GB fp32 shard maps on a machine with less RAM."""
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "PROT_WRITE"):
        return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)


def _readahead_chunk(file: str) -> int:
    """Bytes one MADV_WILLNEED call makes the kernel read: Linux caps each call at max(read_ahead_kb,
    max_sectors_kb) of the backing device, so longer ranges are advised in chunks of that size."""
    try:
        dev = os.stat(file).st_dev
        mm = f"{os.major(dev)}:{os.minor(dev)}"
        kb = 0
        for p in (f"/sys/class/bdi/{mm}/read_ahead_kb", f"/sys/dev/block/{mm}/queue/max_sectors_kb",
                  f"/sys/dev/block/{mm}/../queue/max_sectors_kb"):
            try:
                with open(p) as f:
                    kb = max(kb, int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return min(max(kb << 10, _MIN_CHUNK), 64 << 20)
    except (OSError, ValueError, AttributeError):
        return _MIN_CHUNK


_HAS_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED")


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def looks_cached(fd: int, start: int, end: int, samples: int = 8) -> bool:
    """Whether `samples` bytes spread over [start, end) of a file are all in the page cache: a one-byte preadv with
    RWF_NOWAIT fails rather than wait for the disk. Lets read-ahead threads skip a warm cache, where their advice
    only costs CPU the kernels need; a wrong guess costs only the advice (faults still read ahead)."""
    if _RWF_NOWAIT is None or end <= start:
        return False
    buf = bytearray(1)
    for i in range(samples):
        off = start + (end - 1 - start) * i // max(samples - 1, 1)
        try:
            if os.preadv(fd, [buf], off, _RWF_NOWAIT) != 1:
                return False
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: cannot tell
            return False
    return True


def _advise(fh, mm: mmap.mmap, start: int, end: int, advice: int, chunk: int, stop=None) -> None:
    """Advice over bytes [start, end) of one file, page-aligned, in chunks of `chunk` bytes; stops early when
    `stop()` turns true. MADV_WILLNEED goes through posix_fadvise(POSIX_FADV_WILLNEED) on the file where the platform
    has it: the kernel does the same thing for both (madvise on a file mapping calls the fadvise code), but Python's
    mmap.madvise keeps the GIL while the kernel queues the reads (milliseconds per call on a cold disk) and
    os.posix_fadvise releases it, so the consumer's thread never waits for the read-ahead thread. Other advice
    (MADV_COLD) is about the mapping's pages and goes through mmap.madvise. (Module-level so tests can observe it.)"""
    s = start - start % _PAGE
    fadvise = advice == getattr(mmap, "MADV_WILLNEED", None) and _HAS_FADVISE and fh is not None
    while s < end:
        if stop is not None and stop():
            return
        n = min(chunk, end - s)
        if fadvise:
            os.posix_fadvise(fh.fileno(), s, n, os.POSIX_FADV_WILLNEED)
        else:
            mm.madvise(advice, s, n)
        s += n


class Checkpoint:
    """A read-only, memory-mapped view of a safetensors checkpoint.

    `path` is a directory in Hugging Face layout (``model.safetensors``, or ``model.safetensors.index.json`` plus
    shards; ``config.json`` is read where present), an ``*.safetensors.index.json`` file, or a single
    ``.safetensors`` file (a ``config.json`` beside it is read too).
    """

    def __init__(self, path):
        self.path: str = os.fspath(path)
        self.config: Optional[dict] = None
        self._closed = False
        self._maps: Dict[str, mmap.mmap] = {}
        self._views: Dict[str, memoryview] = {}
        self._fhs: Dict[str, object] = {}  # kept open for posix_fadvise read-ahead
        self._chunks: Dict[str, int] = {}
        p = self.path
        if not os.path.exists(p):
            raise CheckpointError(f"no such checkpoint: {p}")
        index_file, cfg_dir = None, None
        if os.path.isdir(p):
            cfg_dir = p
            if os.path.isfile(os.path.join(p, _INDEX_NAME)):
                index_file = os.path.join(p, _INDEX_NAME)
                files = None
            elif os.path.isfile(os.path.join(p, _SINGLE_NAME)):
                files = [os.path.join(p, _SINGLE_NAME)]
            else:
                entries = sorted(os.listdir(p))
                idx = [e for e in entries if e.endswith(".safetensors.index.json")]
                st = [e for e in entries if e.endswith(".safetensors") and os.path.isfile(os.path.join(p, e))]
                if len(idx) == 1:
                    index_file, files = os.path.join(p, idx[0]), None
                elif len(idx) > 1:
                    raise CheckpointError(f"{p}: several safetensors indexes ({', '.join(idx)}); pass one of them")
                elif st:
                    files = [os.path.join(p, e) for e in st]
                else:
                    bins = [e for e in entries if e.endswith(".bin") or e.endswith(".pt") or e.endswith(".pth")]
                    hint = (f" (found {', '.join(bins[:3])}: convert PyTorch pickles to safetensors first)"
                            if bins else "")
                    raise CheckpointError(f"{p}: no safetensors weights in this directory (expected "
                                          f"{_SINGLE_NAME} or {_INDEX_NAME}){hint}")
        elif p.endswith(".json"):
            index_file, files = p, None
            cfg_dir = os.path.dirname(os.path.abspath(p))
        else:
            files = [p]
            cfg_dir = os.path.dirname(os.path.abspath(p))

        cfg = os.path.join(cfg_dir, "config.json") if cfg_dir else None
        if cfg and os.path.isfile(cfg):
            conf = _read_json(cfg, "config.json")
            if not isinstance(conf, dict):
                raise CheckpointError(f"{cfg}: corrupt config.json (not a JSON object)")
            self.config = conf

        index_map = None
        if index_file is not None:
            idx = _read_json(index_file, "safetensors index")
            wm = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{index_file}: corrupt safetensors index (no 'weight_map' object of "
                                      f"tensor name -> shard file)")
            base_dir = os.path.dirname(os.path.abspath(index_file)) if os.path.isfile(p) else p
            shards = sorted(set(wm.values()))
            if not shards:
                raise CheckpointError(f"{index_file}: the index names no shards (empty weight_map)")
            files = []
            for s in shards:
                f = os.path.join(base_dir, s)
                if not os.path.isfile(f):
                    raise CheckpointError(f"{index_file}: shard {s!r} named by the index is missing ({f})")
                files.append(f)
            index_map = {name: os.path.join(base_dir, s) for name, s in wm.items()}
        self.files: List[str] = files

        infos: Dict[str, TensorInfo] = {}
        order: List[str] = []
        try:
            for f in files:
                tensors, size = _parse_header(f)
                for info in tensors:
                    if info.name in infos:
                        raise CheckpointError(f"{self.path}: tensor {info.name!r} appears in both "
                                              f"{infos[info.name].file} and {f}")
                    infos[info.name] = info
                    order.append(info.name)
                try:
                    fh = open(f, "rb")
                    self._fhs[f] = fh
                    self._maps[f] = _map_private(fh.fileno())
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{f}: cannot map: {getattr(e, 'strerror', None) or e}") from None
                self._views[f] = memoryview(self._maps[f])
            if index_map is not None:
                for name, f in index_map.items():
                    have = infos.get(name)
                    if have is None or have.file != f:
                        raise CheckpointError(f"{index_file}: tensor {name!r} is mapped to shard "
                                              f"{os.path.basename(f)!r} but that shard does not hold it")
        except BaseException:
            self.close()
            raise
        self._infos = infos
        self.names: List[str] = order
        self.nbytes: int = sum(i.end - i.start for i in infos.values())

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
        return (f"Checkpoint({self.path!r}, {len(self)} tensors, {len(self.files)} file(s), "
                f"{self.nbytes / 2**30:.2f} GiB{', closed' if self._closed else ''})")

    # -- tensors --------------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor in this checkpoint's private (copy-on-write) mapping. Writes into it stay
        in this process (later views of the same Checkpoint see them); the file is never modified."""
        info = self.info(name)
        if self._closed:
            raise CheckpointError(f"{self.path}: checkpoint is closed (reading {name!r})")
        if info.dtype is None:
            raise CheckpointError(f"{info.file}: tensor {name!r} has a dtype torch cannot represent")
        numel = info.numel
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        view = self._views[info.file]
        if info.start % info.dtype.itemsize:
            # Never written by the safetensors library (it aligns every tensor); an aligned private copy keeps
            # vectorised kernels safe.
            raw = torch.frombuffer(view, dtype=torch.uint8, count=info.end - info.start, offset=info.start)
            return raw.clone().view(info.dtype).view(info.shape)
        t = torch.frombuffer(view, dtype=info.dtype, count=numel, offset=info.start)
        return t.view(info.shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """A zero-copy view of rows [start, stop) (the first dimension) of a tensor."""
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
        return self.tensor(name)[start:stop]

    def gather(self, name: str, units, axis: int = 0, block: int = 1) -> torch.Tensor:
        """Just the listed units of a tensor: unit u covers indices [u*block, (u+1)*block) along `axis`. Reads only
        those bytes of the mapping and returns a new tensor, [len(units)*block, cols] for axis 0 or
        [rows, len(units)*block] for axis 1, units in the given order."""
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
        idx = _as_index(units, f"{self.path}: units for {name!r}")
        nunits = dim // block
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= nunits:
                bad = lo if lo < 0 else hi
                raise CheckpointError(f"{self.path}: unit {bad} out of range for tensor {name!r} ({nunits} units "
                                      f"of {block} along axis {axis})")
        full = (idx[:, None] * block + torch.arange(block)).reshape(-1) if block > 1 else idx
        return self.tensor(name).index_select(axis, full)

    # -- lifetime -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the files. A mapping that returned tensors still use stays valid until the last of them is freed
        (it is unmapped then); nothing dangles."""
        self._closed = True
        views, self._views = self._views, {}
        maps, self._maps = self._maps, {}
        fhs, self._fhs = self._fhs, {}
        del views
        for mm in maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # tensors still reference it: unmapped when they go
        for fh in fhs.values():
            fh.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- private, for stream() ------------------------------------------------------------------------------------
    def _mapping(self, file: str) -> Optional[mmap.mmap]:
        return self._maps.get(file)

    def _handle(self, file: str):
        return self._fhs.get(file)

    def _chunk(self, file: str) -> int:
        c = self._chunks.get(file)
        if c is None:
            c = self._chunks[file] = _readahead_chunk(file)
        return c


def _as_index(units, what: str) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------------------------
# alignment of several checkpoints

@dataclass
class Alignment:
    names: List[str]                                       # common tensors, in file order of the first checkpoint
    skipped: Dict[str, str] = field(default_factory=dict)  # name -> reason (only with intersect=True)
    mixed_dtypes: List[str] = field(default_factory=list)  # names whose (float) dtype differs between checkpoints


def align(ckpts: Sequence[Checkpoint], intersect: bool = False) -> Alignment:
    """The tensors that every checkpoint holds with the same shape.

    Without `intersect` any difference (a tensor missing from some checkpoint, a shape difference, a dtype difference
    other than between floating-point formats) raises :class:`CheckpointError` listing the first few. With it, those
    tensors are left out and reported in `skipped`. Floating-point dtypes may differ (bf16 vs fp32 master weights):
    such tensors are kept and listed in `mixed_dtypes`.
    """
    ckpts = list(ckpts)
    if not ckpts:
        raise CheckpointError("align: no checkpoints given")
    order: List[str] = list(ckpts[0].names)
    seen = set(order)
    for c in ckpts[1:]:
        for n in c.names:
            if n not in seen:
                seen.add(n)
                order.append(n)
    common, mixed, problems = [], [], {}
    for n in order:
        missing = [c.path for c in ckpts if n not in c]
        if missing:
            problems[n] = f"missing from {', '.join(missing)}"
            continue
        infos = [c.info(n) for c in ckpts]
        ref = infos[0]
        reason = None
        for c, i in zip(ckpts[1:], infos[1:]):
            if i.shape != ref.shape:
                reason = (f"shape {_fmt_shape(ref.shape)} in {ckpts[0].path} but {_fmt_shape(i.shape)} "
                          f"in {c.path}")
                break
        if reason is None:
            dts = [i.dtype for i in infos]
            if any(d != dts[0] for d in dts):
                if all(d is not None and d.is_floating_point for d in dts):
                    mixed.append(n)
                else:
                    c, i = next((c, i) for c, i in zip(ckpts[1:], infos[1:]) if i.dtype != ref.dtype)
                    reason = (f"dtype {_dtype_name(ref.dtype)} in {ckpts[0].path} but {_dtype_name(i.dtype)} "
                              f"in {c.path}")
        if reason is not None:
            problems[n] = reason
            continue
        common.append(n)
    if problems and not intersect:
        shown = [f"{n!r} {r}" for n, r in list(problems.items())[:3]]
        more = len(problems) - len(shown)
        msg = "checkpoints differ: " + "; ".join(shown)
        if more:
            msg += f"; ... ({more} more)"
        msg += f"; use --intersect to analyse the {len(common)} common tensors"
        raise CheckpointError(msg)
    return Alignment(names=common, skipped=problems if intersect else {}, mixed_dtypes=mixed)


# ---------------------------------------------------------------------------------------------------------------
# streaming

class _Prefetcher(threading.Thread):
    """Issues MADV_WILLNEED on the byte ranges of the tensors after the one being consumed, up to `budget` bytes
    (summed over checkpoints) ahead — always at least the next tensor — and MADV_COLD on consumed ones (a
    non-destructive hint: those pages are reclaimed first, before the ones read ahead)."""

    def __init__(self, jobs, sizes, budget):
        super().__init__(name="lpt-checkpoint-prefetch", daemon=True)
        self.jobs = jobs          # per tensor: [(file object, mmap, start, end, chunk)] over checkpoints
        self.prefix = [0]
        for s in sizes:
            self.prefix.append(self.prefix[-1] + s)
        self.budget = budget
        self.cur = -1             # index of the tensor the consumer holds
        self.stopped = False
        self.cond = threading.Condition()
        self.cold_ok = hasattr(mmap, "MADV_COLD")

    def advance(self, k: int) -> None:
        with self.cond:
            self.cur = k
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)

    def _wanted(self, nxt: int) -> bool:
        if nxt >= len(self.jobs):
            return False
        return nxt <= self.cur + 1 or self.prefix[nxt + 1] - self.prefix[self.cur + 1] <= self.budget

    def run(self) -> None:
        nxt, cooled = 0, 0
        try:
            while True:
                with self.cond:
                    while not self.stopped and not self._wanted(max(nxt, self.cur)) and cooled >= self.cur:
                        self.cond.wait()
                    if self.stopped:
                        return
                    cur = self.cur
                # consumed tensors: hint that their pages go first
                while cooled < cur:
                    if self.cold_ok:
                        for fh, mm, s, e, chunk in self.jobs[cooled]:
                            try:
                                _advise(fh, mm, s, e, mmap.MADV_COLD, max(chunk, e - s))
                            except OSError:
                                self.cold_ok = False
                                break
                    cooled += 1
                nxt = max(nxt, cur)
                if not self._wanted(nxt):
                    continue
                stale = lambda k=nxt: self.stopped or self.cur > k  # noqa: E731
                for fh, mm, s, e, chunk in self.jobs[nxt]:
                    if fh is None or not looks_cached(fh.fileno(), s, e):
                        _advise(fh, mm, s, e, mmap.MADV_WILLNEED, chunk, stale)
                nxt += 1
        except (ValueError, OSError):
            return  # a mapping was closed under us, or the kernel refused: read-ahead is only advice


def stream(ckpts: Sequence[Checkpoint], names: Sequence[str], prefetch_bytes: int = 256 << 20,
           progress: Optional[Callable[[int], object]] = None) -> Iterator[Tuple[str, List[torch.Tensor]]]:
    """Yield ``(name, [tensor from each checkpoint])`` for every name, in the order of `names`.

    The tensors are zero-copy views of the mappings (see :meth:`Checkpoint.tensor`): resident anonymous memory does
    not grow with the checkpoints. A background thread asks the kernel to read ahead the byte ranges of the
    upcoming tensors of every checkpoint, up to `prefetch_bytes` (summed over checkpoints; at least the next tensor;
    0 disables it), so that disk reads overlap the caller's compute. `progress`, if given, is called after each
    tensor with the number of bytes just processed (summed over checkpoints) — e.g. ``tqdm(...).update``.
    """
    ckpts = list(ckpts)
    names = list(names)
    if not ckpts:
        raise CheckpointError("stream: no checkpoints given")
    for n in names:
        for c in ckpts:
            if n not in c:
                raise CheckpointError(f"stream: tensor {n!r} missing from {c.path}")
    return _stream(ckpts, names, prefetch_bytes, progress)


def _stream(ckpts, names, prefetch_bytes, progress):
    sizes = [sum(c.info(n).end - c.info(n).start for c in ckpts) for n in names]
    pre = None
    if prefetch_bytes and prefetch_bytes > 0 and hasattr(mmap, "MADV_WILLNEED") and names:
        jobs = []
        for n in names:
            row = []
            for c in ckpts:
                i = c.info(n)
                mm = c._mapping(i.file)
                if mm is not None and i.end > i.start:
                    row.append((c._handle(i.file), mm, i.start, i.end, c._chunk(i.file)))
            jobs.append(row)
        pre = _Prefetcher(jobs, sizes, int(prefetch_bytes))
        pre.start()
    try:
        for k, n in enumerate(names):
            if pre is not None:
                pre.advance(k)
            yield n, [c.tensor(n) for c in ckpts]
            if progress is not None:
                progress(sizes[k])
    finally:
        if pre is not None:
            pre.stop()
