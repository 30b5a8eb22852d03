"""verl's FSDP checkpoints, read in place: no merge into a full copy first.

verl's ``FSDPCheckpointManager`` saves, for each rank r of W, ``model_world_size_{W}_rank_{r}.pt``: a ``torch.save`` of
that rank's *sharded* model state dict, whose values are DTensors (FSDP2 parameters, and FSDP1's sharded state dict
over a device mesh); beside them ``fsdp_config.json`` (``{"FSDP_version": .., "world_size": W}``) and
``huggingface/config.json`` (the model config, saved on rank 0). Each DTensor records its global shape, its
``placements`` (``Shard(d)`` on any dim — verl shards the first dim divisible by the group, not always dim 0 — or
``Replicate``) and its device mesh, so every rank's local shard can be placed in the global tensor.

:class:`VerlCheckpoint` loads every rank file with ``torch.load(mmap=True, weights_only=True)`` (the local shards stay
on disk, memory-mapped copy-on-write; nothing is unpickled but DTensor metadata) and assembles a tensor, some of its
rows, or some of its units from the ranks' local shards only when asked: ``rows`` and ``gather`` touch just the bytes
of the pieces they need, ``tensor`` of a sharded tensor builds that one tensor. Plain tensors in the state dicts
(buffers) are full copies on each rank, as in torch's sharded state dicts.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch

from lpt_kernels.checkpoint.base import _VERL_FILE, Checkpoint, CheckpointError, TensorInfo, _fmt_shape
from lpt_kernels.distributed import shard_region

Piece = Tuple[Tuple[int, ...], Tuple[int, ...], torch.Tensor]  # (global offsets, sizes, local tensor)


@contextmanager
def _quiet_mesh_unpickling():
    """A DeviceMesh unpickled without process groups logs a warning about torch.compile lookups; reading a
    checkpoint never needs those groups."""
    log = logging.getLogger("torch.distributed.device_mesh")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


class VerlCheckpoint(Checkpoint):
    """A verl FSDP checkpoint directory (``model_world_size_{W}_rank_{r}.pt`` for r < W, ``fsdp_config.json``,
    ``huggingface/config.json``), read in place. ``Checkpoint(path)`` returns one for such a directory (verl's
    ``global_step_N/actor``)."""

    format = "verl"

    def __init__(self, path):
        self.path = os.fspath(path)
        self.config = None
        self._closed = False
        self._pieces: Dict[str, List[Piece]] = {}
        self._infos: Dict[str, TensorInfo] = {}
        self.names: List[str] = []
        self.files: List[str] = []
        p = self.path
        if not os.path.isdir(p):
            raise CheckpointError(f"no such checkpoint directory: {p}")
        found: Dict[int, Dict[int, str]] = {}
        for e in os.listdir(p):
            m = _VERL_FILE.match(e)
            if m:
                found.setdefault(int(m.group(1)), {})[int(m.group(2))] = os.path.join(p, e)
        cfg_file = os.path.join(p, "fsdp_config.json")
        world = None
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file) as f:
                    world = json.load(f).get("world_size")
            except (OSError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{cfg_file}: corrupt fsdp_config.json ({e})") from None
            if not isinstance(world, int) or isinstance(world, bool) or world < 1:
                raise CheckpointError(f"{cfg_file}: world_size {world!r} is not a positive int")
        elif len(found) == 1:
            world = next(iter(found))
        if world is None:
            raise CheckpointError(f"{p}: rank files of several world sizes ({', '.join(map(str, sorted(found)))}) "
                                  f"and no fsdp_config.json to say which is the model")
        ranks = found.get(world, {})
        missing = [r for r in range(world) if r not in ranks]
        if missing:
            raise CheckpointError(f"{p}: rank file model_world_size_{world}_rank_{missing[0]}.pt is missing "
                                  f"({len(missing)} of {world} ranks missing)")
        self.world_size = world
        self.files = [ranks[r] for r in range(world)]
        self._load_config(os.path.join(p, "huggingface", "config.json"), os.path.join(p, "config.json"))
        try:
            self._index([self._load_rank(f) for f in self.files])
        except BaseException:
            self.close()
            raise
        self.nbytes = sum(i.nbytes for i in self._infos.values())

    @staticmethod
    def _load_rank(f: str) -> dict:
        _dtensor_type()  # importing it registers DTensor and its placements with the weights-only unpickler
        try:
            with _quiet_mesh_unpickling():
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{f}: cannot read this rank's state dict with torch.load(mmap=True, "
                                  f"weights_only=True): {msg}") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f}: not a state dict (a {type(sd).__name__})")
        return sd

    def _index(self, sds: List[dict]) -> None:
        DTensor = _dtensor_type()
        order: List[str] = []
        seen = set()
        for sd in sds:
            for k, v in sd.items():
                if isinstance(v, torch.Tensor) and k not in seen:
                    seen.add(k)
                    order.append(k)
        for name in order:
            pieces: Dict[Tuple, Piece] = {}
            shape = dtype = None
            for r, (f, sd) in enumerate(zip(self.files, sds)):
                v = sd.get(name)
                where = f"{f}: tensor {name!r}"
                if not isinstance(v, torch.Tensor):
                    raise CheckpointError(f"{f}: tensor {name!r} is missing from this rank (the other ranks hold it)")
                if shape is None:
                    shape, dtype = tuple(v.shape), v.dtype
                elif tuple(v.shape) != shape or v.dtype != dtype:
                    raise CheckpointError(f"{where} is {_fmt_shape(tuple(v.shape))} {v.dtype} but "
                                          f"{_fmt_shape(shape)} {dtype} on rank 0")
                if isinstance(v, DTensor):
                    mesh = v.device_mesh.mesh
                    hit = (mesh == r).nonzero()
                    if hit.shape[0] != 1:
                        raise CheckpointError(f"{where}: rank {r} is not in the tensor's device mesh "
                                              f"{mesh.tolist()}")
                    coord = hit[0].tolist()
                    off, size = shard_region(shape, tuple(mesh.shape), coord, tuple(v.placements), where,
                                             CheckpointError)
                    with torch.no_grad():
                        local = v._local_tensor if hasattr(v, "_local_tensor") else v.to_local()
                    if tuple(local.shape) != size:
                        raise CheckpointError(f"{where}: local shard of shape {_fmt_shape(tuple(local.shape))} "
                                              f"where placements {tuple(v.placements)} put {_fmt_shape(size)}")
                else:  # a plain tensor: a full copy on each rank
                    off, size, local = (0,) * len(shape), shape, v
                if (off, size) not in pieces:  # replicas: one is enough
                    pieces[(off, size)] = (off, size, local)
            plist = [p for p in pieces.values() if all(s > 0 for s in p[1])]
            numel = 1
            for s in shape:
                numel *= s
            covered = 0
            for _, size, _ in plist:
                n = 1
                for s in size:
                    n *= s
                covered += n
            if covered != numel:
                raise CheckpointError(f"{self.files[0]}: tensor {name!r}: the ranks' shards hold {covered} of its "
                                      f"{numel} elements")
            self._pieces[name] = plist
            self._infos[name] = TensorInfo(name, dtype, shape, self.files[0], 0, numel * dtype.itemsize)
            self.names.append(name)

    # -- tensors --------------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor: a zero-copy (copy-on-write) view of the mapping when one rank holds all of it, else
        assembled from the ranks' shards into a new tensor."""
        info = self.info(name)
        self._check_open(name)
        return self._box(name, (0,) * len(info.shape), info.shape)

    def _box(self, name, offsets, sizes):
        info = self.info(name)
        box = [(o, o + n) for o, n in zip(offsets, sizes)]
        parts = []
        for off, size, local in self._pieces[name]:
            inter = [(max(a, o), min(b, o + s)) for (a, b), o, s in zip(box, off, size)]
            if all(lo < hi for lo, hi in inter):
                parts.append((off, local, inter))
        if len(parts) == 1 and all(hi - lo == n for (lo, hi), n in zip(parts[0][2], sizes)):
            off, local, inter = parts[0]  # one shard holds the whole box: a view
            t = local
            for d, ((lo, hi), o) in enumerate(zip(inter, off)):
                t = t.narrow(d, lo - o, hi - lo)
            return t
        out = torch.empty(tuple(sizes), dtype=info.dtype)
        for off, local, inter in parts:
            src, dst = local, out
            for d, ((lo, hi), o, bo) in enumerate(zip(inter, off, offsets)):
                src = src.narrow(d, lo - o, hi - lo)
                dst = dst.narrow(d, lo - bo, hi - lo)
            dst.copy_(src)
        return out

    def _take(self, name, idx, axis, within):
        info = self.info(name)
        shape = info.shape
        if len(shape) == 1:
            out = torch.empty(idx.numel(), dtype=info.dtype)
            lo_o, hi_o = None, None
        else:
            lo_o, hi_o = within if within is not None else (0, shape[1 - axis])
            out_shape = [0, 0]
            out_shape[axis], out_shape[1 - axis] = idx.numel(), hi_o - lo_o
            out = torch.empty(out_shape, dtype=info.dtype)
        if idx.numel() == 0 or out.numel() == 0:
            return out
        for off, size, local in self._pieces[name]:
            a0, an = off[axis], size[axis]
            pos = ((idx >= a0) & (idx < a0 + an)).nonzero().reshape(-1)
            if pos.numel() == 0:
                continue
            if len(shape) == 1:
                out.index_copy_(0, pos, local.index_select(0, idx[pos] - a0))
                continue
            o0, on = off[1 - axis], size[1 - axis]
            lo, hi = max(lo_o, o0), min(hi_o, o0 + on)
            if lo >= hi:
                continue
            src = local.narrow(1 - axis, lo - o0, hi - lo).index_select(axis, idx[pos] - a0)
            out.narrow(1 - axis, lo - lo_o, hi - lo).index_copy_(axis, pos, src)
        return out

    def close(self) -> None:
        """Drop the state dicts; the mappings go with the last tensor that uses them."""
        self._closed = True
        self._pieces = {}
