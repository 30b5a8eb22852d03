"""torch.distributed.checkpoint (DCP) directories, read through DCP's own reader: no full copy, no parsing of ours.

``torch.distributed.checkpoint.save`` (torchtitan, verl's DCP mode, accelerate's FSDP2 saves) writes a directory of
``*.distcp`` files and a ``.metadata`` file: for every tensor of the flattened state dict its global size, dtype and
the chunks the ranks saved (offsets, sizes), each stored as a ``torch.save`` of that chunk at a byte range of one
``.distcp`` file. :class:`DcpCheckpoint` reads the metadata with ``FileSystemReader.read_metadata`` and every request
(a whole tensor, some rows, the chunks holding some units) is turned into DCP read items
(``create_read_items_for_chunk_list``, the resharding DCP does on load) and served by ``FileSystemReader.read_data``,
without process groups: a read touches only the saved chunks that overlap what was asked for, and memory holds only
the rectangle asked for plus one saved chunk at a time.
"""
from __future__ import annotations

import io
import os
from typing import Dict, List, Optional

import torch

from lpt_kernels.checkpoint.base import Checkpoint, CheckpointError, TensorInfo


def _dcp():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    return FileSystemReader, ChunkStorageMetadata, TensorStorageMetadata, LoadPlan, LoadPlanner, \
        create_read_items_for_chunk_list


def _planner_type():
    LoadPlanner = _dcp()[4]

    class _BoxPlanner(LoadPlanner):
        """The LoadPlanner side of one read: DCP's reader hands each saved piece to resolve_tensor, which answers
        with the part of the destination rectangle it fills."""

        def __init__(self, dest: torch.Tensor):
            self.dest = dest

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            pass

        def create_local_plan(self):
            raise NotImplementedError

        def create_global_plan(self, global_plan):
            return global_plan

        def finish_plan(self, central_plan):
            return central_plan

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raise CheckpointError(f"tensor {read_item.dest_index.fqn!r} is stored as bytes, not a tensor")

        def resolve_tensor(self, read_item):
            t = self.dest
            for d, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                t = t.narrow(d, o, n)
            return t

        def commit_tensor(self, read_item, tensor) -> None:
            pass

    return _BoxPlanner


class DcpCheckpoint(Checkpoint):
    """A torch.distributed.checkpoint directory (``.metadata`` + ``*.distcp``), read in place. Its tensors are the
    tensor entries of the saved (flattened) state dict, in the order they were saved; non-tensor entries are left
    out. `prefix` keeps only the entries under one key of a nested state dict, with that prefix removed (e.g.
    ``prefix="model."`` for ``dcp.save({"model": model.state_dict(), "optim": ...})``). ``config.json`` is read from
    the directory or a ``huggingface/`` directory in it, where present."""

    format = "dcp"

    def __init__(self, path, prefix: Optional[str] = None):
        self.path = os.fspath(path)
        self.config = None
        self._closed = False
        self._infos: Dict[str, TensorInfo] = {}
        self.names: List[str] = []
        p = self.path
        if not os.path.isdir(p) or not os.path.isfile(os.path.join(p, ".metadata")):
            raise CheckpointError(f"{p}: not a torch.distributed.checkpoint directory (no .metadata)")
        FileSystemReader, _, TensorStorageMetadata, _, _, _ = _dcp()
        try:
            self._reader = FileSystemReader(p)
            md = self._reader.read_metadata()
            self._reader.set_up_storage_reader(md, True)
        except Exception as e:  # a corrupt or foreign .metadata raises whatever unpickling raised
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{os.path.join(p, '.metadata')}: cannot read the DCP metadata: {msg}") from None
        self._md: Dict[str, object] = {}
        files = set()
        for key, m in md.state_dict_metadata.items():
            if not isinstance(m, TensorStorageMetadata):
                continue
            if prefix:
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix):]
            else:
                name = key
            shape = tuple(int(s) for s in m.size)
            dtype = m.properties.dtype
            numel = 1
            for s in shape:
                numel *= s
            self._md[name] = (key, m)
            self.names.append(name)
            self._infos[name] = TensorInfo(name, dtype, shape, os.path.join(p, ".metadata"), 0,
                                           numel * dtype.itemsize)
        for idx, st in md.storage_data.items():
            files.add(os.path.join(p, st.relative_path))
        if prefix and not self.names:
            raise CheckpointError(f"{p}: no tensor under prefix {prefix!r}")
        self.files = sorted(files)
        self.nbytes = sum(i.nbytes for i in self._infos.values())
        self._load_config(os.path.join(p, "config.json"), os.path.join(p, "huggingface", "config.json"))

    # -- tensors --------------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor, read into a new tensor through DCP's reader."""
        info = self.info(name)
        self._check_open(name)
        return self._box(name, (0,) * len(info.shape), info.shape)

    def _read(self, name: str, offsets, sizes, out: torch.Tensor) -> None:
        """Fill `out` (shape `sizes`) with the rectangle at `offsets` of tensor `name`, through DCP's reader."""
        _, ChunkStorageMetadata, _, LoadPlan, _, create_items = _dcp()
        key, m = self._md[name]
        if out.numel() == 0:
            return
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_items(key, m, [chunk])
        plan = self._reader.prepare_local_plan(LoadPlan(items))
        plan = self._reader.prepare_global_plan([plan])[0]
        try:
            self._reader.read_data(plan, _planner_type()(out)).wait()
        except CheckpointError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r}: {msg}") from None

    def _box(self, name, offsets, sizes):
        out = torch.empty(tuple(sizes), dtype=self.info(name).dtype)
        self._read(name, offsets, sizes, out)
        return out

    def _take(self, name, idx, axis, within):
        """The listed indices, read saved chunk by saved chunk: for each chunk holding some of them, the part of the
        chunk from the first to the last of those (and within `within` on the other axis), then the indices picked
        out."""
        info = self.info(name)
        shape = info.shape
        nd = len(shape)
        if nd == 1:
            lo_o, hi_o = 0, 1
            out = torch.empty(idx.numel(), dtype=info.dtype)
        else:
            lo_o, hi_o = within if within is not None else (0, shape[1 - axis])
            out_shape = [0, 0]
            out_shape[axis], out_shape[1 - axis] = idx.numel(), hi_o - lo_o
            out = torch.empty(out_shape, dtype=info.dtype)
        if out.numel() == 0:
            return out
        _, m = self._md[name]
        for c in m.chunks:  # each saved chunk once: memory holds at most one chunk's rectangle besides the output
            a0 = int(c.offsets[axis]) if nd else 0
            a1 = a0 + int(c.sizes[axis])
            pos = ((idx >= a0) & (idx < a1)).nonzero().reshape(-1)
            if pos.numel() == 0:
                continue
            sel = idx[pos]
            s0, s1 = int(sel.min()), int(sel.max()) + 1
            if nd == 1:
                box = self._box(name, (s0,), (s1 - s0,))
                out.index_copy_(0, pos, box.index_select(0, sel - s0))
                continue
            o0 = int(c.offsets[1 - axis])
            lo, hi = max(lo_o, o0), min(hi_o, o0 + int(c.sizes[1 - axis]))
            if lo >= hi:
                continue
            offs, sizes = [0, 0], [0, 0]
            offs[axis], sizes[axis] = s0, s1 - s0
            offs[1 - axis], sizes[1 - axis] = lo, hi - lo
            box = self._box(name, offs, sizes)
            out.narrow(1 - axis, lo - lo_o, hi - lo).index_copy_(axis, pos, box.index_select(axis, sel - s0))
        return out

    def close(self) -> None:
        self._closed = True
        self._reader = None
