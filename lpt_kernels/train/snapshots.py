"""Frozen copies of a model's parameters at one point of training (a domain boundary), where the tracker keeps them.

``snapshot=`` of :class:`~lpt_kernels.train.DeltaTracker`:

- ``"cpu"``: host RAM, one copy of the parameters in their own dtype (pinned when the model is on a GPU, so that the
  per-step copies to the device are asynchronous); memory: the parameters' bytes, in host RAM, per snapshot;
- ``"device"``: on the parameters' device (GPU memory for a GPU model); memory: the parameters' bytes on the device,
  per snapshot; nothing crosses the bus on a step;
- ``"disk:PATH"``: a safetensors file per snapshot under the directory PATH (``NN-<label>.safetensors``, written
  tensor by tensor, atomically), read back memory-mapped through :class:`~lpt_kernels.checkpoint.Checkpoint`; memory:
  the parameters' bytes on disk, and in RAM only the page cache the kernel lends (reclaimable, not resident anonymous
  memory). The files are left in PATH (they are ordinary checkpoints ``lpt diff`` reads) and are overwritten by a
  later tracker writing the same names.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Dict, Iterator, List, Tuple

import torch

from lpt_kernels import distributed
from lpt_kernels.checkpoint import Checkpoint, CheckpointError, write_safetensors
from lpt_kernels.train._model import Tensor2D, TrainError, as_2d

MODES = ("cpu", "device", "disk")


def parse_snapshot(spec) -> Tuple[str, str]:
    """``(kind, path)`` from ``"cpu"``, ``"device"`` or ``"disk:PATH"``."""
    if isinstance(spec, str):
        if spec in ("cpu", "device"):
            return spec, ""
        if spec.startswith("disk:") and len(spec) > 5:
            return "disk", spec[5:]
    raise TrainError(f"snapshot: expected 'cpu', 'device' or 'disk:PATH', got {spec!r}")


class Snapshot(Mapping):
    """The parameters at one point, read-only: a mapping ``name -> tensor`` (original shapes) on its storage.

    ``label`` names the point (``base`` or the domain that ended there), ``location`` where it lives (``cpu``,
    ``device``, or the file), ``nbytes`` its size."""

    def __init__(self, label: str, location: str, tensors: Dict[str, torch.Tensor], shapes: Dict[str, torch.Size],
                 ckpt: Checkpoint = None):
        self.label, self.location = label, location
        self._t, self._shapes, self._ckpt = tensors, shapes, ckpt
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) if ckpt is None else ckpt.nbytes
        dts = {ckpt.info(n).dtype for n in shapes} if ckpt is not None else {t.dtype for t in tensors.values()}
        self.dtypes = sorted(str(d).replace("torch.", "") for d in dts)  # as a profile's meta lists them

    def tensor2d(self, name: str) -> torch.Tensor:
        """The tensor as the 2-D view the kernels take (1-D as one row)."""
        if self._ckpt is not None:
            return as_2d(self._ckpt.tensor(name))
        return self._t[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        return self.tensor2d(name).view(self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __repr__(self) -> str:
        return f"Snapshot({self.label!r}, {len(self)} tensors, {self.nbytes / 2**20:.1f} MiB, {self.location})"

    def close(self) -> None:
        self._t = {}
        if self._ckpt is not None:
            self._ckpt.close()


def take(kind: str, path: str, index: int, label: str, tensors: List[Tensor2D]) -> Snapshot:
    """A snapshot of the tracked parameters now (``index``: its position in the chain, for the file name). Of a
    sharded parameter each rank keeps its local shard (1/world of it; a file per rank on disk)."""
    shapes = {t.name: t.local().shape for t in tensors}
    with torch.no_grad():
        if kind == "disk":
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise TrainError(f"snapshot: cannot create directory {path} ({e.strerror})") from None
            rank, world = distributed.world()
            part = f".rank{rank}" if world > 1 and any(distributed.is_dtensor(t.param) for t in tensors) else ""
            file = os.path.join(path, f"{index:02d}-{label}{part}.safetensors")
            by_name = {t.name: t.local() for t in tensors}
            try:
                write_safetensors(file, [(t.name, t.param.dtype, tuple(by_name[t.name].shape)) for t in tensors],
                                  lambda n: by_name[n], metadata={"format": "pt", "lpt_snapshot": label})
                ckpt = Checkpoint(file)
            except OSError as e:
                raise TrainError(f"snapshot: cannot write {file} ({e.strerror or e})") from None
            except CheckpointError as e:
                raise TrainError(f"snapshot: {e}") from None
            return Snapshot(label, file, {}, shapes, ckpt)
        out = {}
        for t in tensors:
            p = t.local()
            if kind == "device":
                c = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            else:
                c = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=p.device.type == "cuda")
            c.copy_(p)  # a device-to-pinned-host copy is ordered on the current stream like the kernels reading it
            out[t.name] = as_2d(c)
        return Snapshot(label, kind, out, shapes)
