"""Safetensors checkpoints (a file, or a Hugging Face directory of shards with an index), read zero-copy.

A :class:`Checkpoint` parses the safetensors headers itself (:mod:`~lpt_kernels.checkpoint.header` refuses what the
format forbids, as the safetensors library does) and maps every shard once, privately (copy-on-write): a tensor it
returns is a view of that mapping, built with ``torch.frombuffer`` — no bytes are copied and none are read until
they are touched, and a write into a returned tensor changes this process's private copy only, never the file.
"""
from __future__ import annotations

import mmap
import os
import platform
import sys
from typing import Dict, List, Optional

import torch

from lpt_kernels.checkpoint.base import (DTYPES, Checkpoint, CheckpointError, TensorInfo,  # noqa: F401
                                         _read_json, as_index)
from lpt_kernels.checkpoint.header import parse_header as _parse_header

_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"
_MIN_CHUNK = 128 << 10  # the smallest readahead window a Linux block device is configured with
# mmap.MAP_NORESERVE exists from Python 3.12; its Linux value is 0x4000 except on a few architectures.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0) or (
    0x4000 if sys.platform.startswith("linux") and platform.machine().lower() in (
        "x86_64", "amd64", "aarch64", "arm64", "riscv64", "s390x", "i386", "i686", "loongarch64") else 0)



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


class SafetensorsCheckpoint(Checkpoint):
    """A read-only, memory-mapped view of a safetensors checkpoint.

    `path` is a directory in Hugging Face layout (``model.safetensors``, or ``model.safetensors.index.json`` plus
    shards; ``config.json`` is read where present), an ``*.safetensors.index.json`` file, or a single
    ``.safetensors`` file (a ``config.json`` beside it is read too). ``Checkpoint(path)`` returns one of these for
    any path that is not a verl or DCP directory.
    """

    format = "safetensors"

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

        self._load_config(os.path.join(cfg_dir, "config.json") if cfg_dir else None)

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

    # -- tensors --------------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor in this checkpoint's private (copy-on-write) mapping. Writes into it stay
        in this process (later views of the same Checkpoint see them); the file is never modified."""
        info = self.info(name)
        self._check_open(name)
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

