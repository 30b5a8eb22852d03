"""RefreshMonitor: during a short "refresh" training of a damaged earlier domain E (the paper's Re-Math), how far the
model is from E's checkpoint on the conflict subspace (a Selection's units) and off it, and from the other domains'
checkpoints (docs/train.md)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Tuple

import torch

from lpt_kernels import unit_gram
from lpt_kernels.analysis.selection import Selection, SelectionError
from lpt_kernels.checkpoint import Checkpoint, CheckpointError
from lpt_kernels.layout import LayoutError
from lpt_kernels.ops import MAX_INPUTS
from lpt_kernels.train._model import (TrainError, as_2d, check_every, check_model, check_name, model_params,
                                      to_device)


def _reference(ref, label: str, shapes: Dict[str, torch.Size]) -> Tuple[Callable[[str], torch.Tensor], object]:
    """A getter name -> tensor for a checkpoint given as a path, a Checkpoint or a mapping (a state dict, a
    tracker's Snapshot); checks that it holds every parameter with the model's shape. Returns (getter, what to
    close)."""
    opened = None
    if isinstance(ref, (str, os.PathLike)):
        try:
            ref = opened = Checkpoint(ref)
        except CheckpointError as e:
            raise TrainError(f"{label}: {e}") from None
    if isinstance(ref, Checkpoint):
        have = {n: tuple(ref.info(n).shape) for n in ref.names}
        get = ref.tensor
    elif isinstance(ref, Mapping):
        have = {n: tuple(ref[n].shape) for n in shapes if n in ref}
        get = ref.__getitem__
    else:
        raise TrainError(f"{label}: expected a checkpoint path, a Checkpoint or a mapping name -> tensor, got "
                         f"{type(ref).__name__}")
    for n, s in shapes.items():
        if n not in have:
            if opened is not None:
                opened.close()
            raise TrainError(f"{label}: no tensor {n} (the model's parameter)")
        if have[n] != tuple(s):
            if opened is not None:
                opened.close()
            raise TrainError(f"{label}: tensor {n} has shape {have[n]}, the model's parameter {tuple(s)}")
    return get, opened


class RefreshMonitor:
    """Per step, ``||theta - theta_R||`` restricted to a selection's units and to everything else, for the earlier
    domain's checkpoint R = E and for each of ``others``.

    The paper's refresh (Sec. on recovery) retrains the damaged domain E briefly; its claim is that this contracts the
    harmful component of the later domains' displacement, which lives on a low-dimensional conflict subspace, while the
    other domains stay put. With the conflict units as the selection (``lpt select``), the curves show exactly that:
    ``selected_norm`` of E shrinking, ``rest_norm`` moving little, the other domains' norms flat.

    Args:
        model: the model being refreshed (starting from the damaged checkpoint).
        earlier: E's checkpoint (before the later domains): a path, a :class:`~lpt_kernels.checkpoint.Checkpoint`, or a
            mapping name -> tensor (a state dict, or ``DeltaTracker.snapshot("math")``).
        selection: a :class:`~lpt_kernels.analysis.selection.Selection` (or its JSON path): the units of the conflict
            subspace. Its layout must fit the model.
        others: ``{name: checkpoint}`` of other domains whose displacement is reported (same kinds as ``earlier``).
        name: E's name in the metric keys (default: the selection's ``meta["earlier"]``, else ``"earlier"``).
        every: measure on every ``every``-th call of :meth:`step`, ``{}`` otherwise.
        backend: kernel backend for unit_gram.

    Each tensor is read once per measured step with every reference in one :func:`~lpt_kernels.unit_gram` call (at
    most 7 references). Metrics, per reference R: ``lpt/refresh/<R>/selected_norm``, ``lpt/refresh/<R>/rest_norm``
    and ``lpt/refresh/<R>/norm`` (all the parameters; ``norm^2 = selected^2 + rest^2``).
    """

    def __init__(self, model: torch.nn.Module, earlier, selection, others: Optional[Dict[str, object]] = None, *,
                 name: Optional[str] = None, every: int = 1, backend: Optional[str] = None):
        check_model(model)
        if isinstance(selection, (str, os.PathLike)):
            try:
                selection = Selection.load(os.fspath(selection))
            except SelectionError as e:
                raise TrainError(f"selection: {e}") from None
        if not isinstance(selection, Selection):
            raise TrainError(f"selection: expected a Selection or its JSON path, got {type(selection).__name__}")
        self.every = check_every(every)
        self.backend = backend
        self.selection = selection
        params = model_params(model)
        shapes = {n: p.shape for n, p in params}
        try:
            selection.layout.validate({n: tuple(s) for n, s in shapes.items()})
        except LayoutError as e:
            raise TrainError(f"selection: does not fit the model ({e})") from None
        name = check_name(name or selection.meta.get("earlier") or "earlier", "name")
        others = dict(others or {})
        if len(others) + 1 > MAX_INPUTS - 1:
            raise TrainError(f"others: at most {MAX_INPUTS - 2} other checkpoints (one unit_gram pass of at most "
                             f"{MAX_INPUTS} inputs)")
        refs: List[Tuple[str, object]] = [(name, earlier)] + [(check_name(k, "others"), v) for k, v in others.items()]
        if len({k for k, _ in refs}) != len(refs):
            raise TrainError(f"others: a name is used twice (the earlier domain is {name!r})")
        self.names = [k for k, _ in refs]
        self._get, self._opened = [], []
        try:
            for k, ref in refs:
                get, opened = _reference(ref, "earlier" if k == name else f"others[{k!r}]", shapes)
                self._get.append(get)
                if opened is not None:
                    self._opened.append(opened)
        except TrainError:
            self.close()
            raise
        dev = params[0][1].device
        # per tensor: [(member, bool mask of selected units on the device)] — tensors with no selected unit: []
        sel: Dict[str, List[Tuple[object, torch.Tensor]]] = {}
        for m, ids in selection.slices():
            n_units = shapes[m.tensor][m.axis] // m.block
            mask = torch.zeros(n_units, dtype=torch.bool)
            mask[torch.as_tensor(ids, dtype=torch.long)] = True
            sel.setdefault(m.tensor, []).append((m, mask.to(dev)))
        self._plan = [(n, p, sel.get(n, [])) for n, p in params]
        self._steps = 0

    def step(self) -> Dict[str, float]:
        """Call after each optimizer step; the metrics on every ``every``-th call, ``{}`` otherwise (one host sync)."""
        self._steps += 1
        if self._steps % self.every:
            return {}
        with torch.no_grad():
            return self._measure()

    def _measure(self) -> Dict[str, float]:
        r_count = len(self.names)
        selected, rest = [], []
        for name, p, members in self._plan:
            live = as_2d(p.detach())
            ws = [live] + [to_device(as_2d(get(name)), live.device) for get in self._get]
            if not members:
                r = unit_gram(ws, axis=0, block=1, mode="base", backend=self.backend)
                rest.append(torch.diagonal(r.gram, dim1=1, dim2=2).double().sum(0))
                continue
            # a tensor in several selected groups (custom layouts) is split by its first member's units
            m, mask = members[0]
            r = unit_gram(ws, axis=m.axis, block=m.block, mode="base", backend=self.backend)
            sq = torch.diagonal(r.gram, dim1=1, dim2=2).double()      # [units, R]: |theta_R - theta|^2 per unit
            selected.append((sq * mask[:, None]).sum(0))
            rest.append((sq * ~mask[:, None]).sum(0))
        dev = self._plan[0][1].device
        zero = torch.zeros(r_count, dtype=torch.float64, device=dev)
        s = torch.stack([x.to(dev) for x in selected]).sum(0) if selected else zero
        o = torch.stack([x.to(dev) for x in rest]).sum(0) if rest else zero
        vals = torch.stack([s.sqrt(), o.sqrt(), (s + o).sqrt()], 1).tolist()  # the one host sync
        out = {}
        for k, (a, b, c) in zip(self.names, vals):
            out.update({f"lpt/refresh/{k}/selected_norm": a, f"lpt/refresh/{k}/rest_norm": b,
                        f"lpt/refresh/{k}/norm": c})
        return out

    def close(self) -> None:
        """Unmap the checkpoints this monitor opened from paths."""
        for c in self._opened:
            c.close()
        self._opened = []
