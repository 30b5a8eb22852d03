"""What the tracker and the refresh monitor share about a live model: its parameters as 2-D tensors, its layout, and
the one-line error they raise."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from lpt_kernels import distributed
from lpt_kernels.layout import Layout, LayoutError, Member, load_layout, model_config


class TrainError(ValueError):
    """Misuse of the training-loop API or a model it cannot work with (one-line message naming the culprit)."""


@dataclass
class Tensor2D:
    """One tracked parameter: its name, the parameter, and the (group, layer, member) entries of the layout's groups
    being tracked (empty: the tensor is tracked as a whole, rows as units)."""
    name: str
    param: torch.nn.Parameter
    members: List[Tuple[str, int, Member]]
    elements: int

    def live(self) -> torch.Tensor:
        """The parameter's current values as a 2-D view (1-D tensors as one row, as ``lpt diff`` reads them); a
        sharded parameter as a 2-D DTensor over its local shard. Read each time: an optimizer or a wrapper may
        replace ``param.data``."""
        p = self.param.detach()
        return distributed.as_2d(p) if distributed.is_dtensor(p) else as_2d(p)

    def local(self) -> torch.Tensor:
        """This rank's part of the parameter as a plain tensor (the whole parameter when it is not sharded)."""
        return distributed.local_tensor(self.param.detach())


def as_2d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t
    return t.reshape(1, -1) if t.dim() != 0 else t.reshape(1, 1)


def check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def model_params(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """The floating-point parameters, tied ones once (the names ``save_pretrained`` writes). Sharded parameters
    (DTensors of FSDP2) are the sharded ones even after a forward under no_grad (see docs/distributed.md)."""
    out = []
    distributed.settle(model)
    for n, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.device.type == "meta":
            raise TrainError(f"model: parameter {n} is on the meta device (not materialised)")
        out.append((n, p))
    if not out:
        raise TrainError("model: it has no floating-point parameters")
    return out


def model_layout(model, params, layout, groups: Sequence[str]) -> Layout:
    """The layout of ``model`` (a Layout, a spec dict or path, a built-in family name, or None to detect), validated
    against the shapes of ``params``; the groups asked for must be in it."""
    shapes = {n: tuple(p.shape) for n, p in params}
    try:
        if isinstance(layout, Layout):
            lay = layout
            lay.validate(shapes)
        else:
            lay = load_layout(layout, shapes, model_config(model), groups=tuple(groups))
    except LayoutError as e:
        raise TrainError(f"model {type(model).__name__}: {e}") from None
    missing = [g for g in groups if g not in lay.groups]
    if missing:
        raise TrainError(f"groups: layout {lay.name!r} has no group {missing[0]!r} (it has "
                         f"{', '.join(lay.groups) or 'none'})")
    return lay


def plan(params, layout: Layout, groups: Sequence[str]) -> List[Tensor2D]:
    return [Tensor2D(n, p, [e for e in layout.member_of(n) if e[0] in groups], p.numel()) for n, p in params]


def check_name(name, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise TrainError(f"{what}: expected a non-empty string, got {name!r}")
    if "/" in name or "|" in name:
        raise TrainError(f"{what}: {name!r} may not contain '/' or '|' (they separate the parts of array names)")
    return name


def check_every(every) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise TrainError(f"every: expected a positive int, got {every!r}")
    return every


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from pinned host memory the copy is asynchronous (stream-ordered, no host sync)."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=t.is_pinned())
