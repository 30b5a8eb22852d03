"""A Selection: which units (per group and layer) an intervention touches, with the provenance of the choice.

It is plain data — the selectors in `lpt_kernels.analysis.select` produce it and the rollback functions consume it —
saved as JSON:

```json
{"format": "lpt-selection/1",
 "layout": {...layout spec (Layout.to_spec())...}, "tensors": [...the member tensors' names...],
 "units": {"mlp": {"0": [5, 17, 230], "3": [8]}, "attn": {"2": [1]}},
 "meta": {"selector": "AMC", "budget": 0.02, "earlier": "math", "later": "qa", ...}}
```
"""
from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

from lpt_kernels.checkpoint.writer import replace_file
from lpt_kernels.layout import Layout, Member, layout_from_spec

FORMAT = "lpt-selection/1"


class SelectionError(ValueError):
    """A selection that cannot be read or does not fit a checkpoint/model (one-line message)."""


@dataclass
class Selection:
    layout: Layout
    units: Dict[str, Dict[int, List[int]]]  # group -> layer -> sorted unique unit ids
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        def unit_id(u, g, layer):
            try:
                if not isinstance(u, bool):
                    return operator.index(u)  # ints, numpy ints, 0-d integer tensors; not 1.5, "1" or true
            except TypeError:
                pass
            raise SelectionError(f"selection: unit {u!r} of {g} layer {layer} is not an integer id")

        def layer_no(layer, g):
            if isinstance(layer, str) and layer.lstrip("-").isdigit():  # JSON keys are strings of digits
                return int(layer)
            try:
                if not isinstance(layer, bool):
                    return operator.index(layer)
            except TypeError:
                pass
            raise SelectionError(f"selection: layer {layer!r} of group {g!r} is not a layer number")

        units = {}
        for g, layers in self.units.items():
            if not isinstance(layers, Mapping):
                raise SelectionError(f"selection: group {g!r} must map layers to lists of unit ids")
            units[g] = {}
            for layer, ids in layers.items():
                n = layer_no(layer, g)
                if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                    raise SelectionError(f"selection: units of {g} layer {n} must be a list of ids, got {ids!r}")
                ids = sorted({unit_id(u, g, n) for u in ids})
                if ids:
                    units[g][n] = ids
        self.units = units
        for g, layers in self.units.items():
            if g not in self.layout.groups:
                raise SelectionError(f"selection: group {g!r} is not in the layout ({', '.join(self.layout.groups)})")
            n = self.layout.units.get(g)
            for layer, ids in layers.items():
                if layer not in self.layout.groups[g]:
                    raise SelectionError(f"selection: layer {layer} of group {g!r} is not in the layout")
                if ids and (ids[0] < 0 or (n is not None and ids[-1] >= n)):
                    raise SelectionError(f"selection: unit {ids[-1] if ids[0] >= 0 else ids[0]} of {g} layer "
                                         f"{layer} is out of range ({n} units)")

    def __repr__(self) -> str:
        per = ", ".join(f"{g}: {self.count(g)} units in {len(ls)} layers" for g, ls in self.units.items()) or "empty"
        keys = ("selector", "budget", "earlier", "later")
        prov = ", ".join(f"{k}={self.meta[k]!r}" for k in keys if k in self.meta)
        return f"Selection({per}" + (f"; {prov}" if prov else "") + ")"

    def count(self, group: str = None) -> int:
        """Number of selected units (in one group, or all)."""
        groups = [group] if group else list(self.units)
        return sum(len(ids) for g in groups for ids in self.units.get(g, {}).values())

    def fraction(self, group: str) -> float:
        """Selected share of the group's units."""
        total = self.layout.units[group] * len(self.layout.groups[group])
        return self.count(group) / total if total else 0.0

    def per_layer(self, group: str) -> List[int]:
        """Units selected in each layer (the per-layer budget profile)."""
        return [len(self.units.get(group, {}).get(layer, [])) for layer in range(self.layout.num_layers)]

    def slices(self) -> Iterator[Tuple[Member, List[int]]]:
        """(member, unit ids) for every tensor slice the selection touches, tensor by tensor."""
        for g, layers in self.units.items():
            for layer, ids in sorted(layers.items()):
                for m in self.layout.groups[g][layer]:
                    yield m, ids

    def to_dict(self) -> dict:
        tensors = sorted({m.tensor for layers in self.layout.groups.values() for ms in layers.values() for m in ms})
        return {"format": FORMAT, "layout": self.layout.to_spec(), "tensors": tensors,
                "units": {g: {str(l): ids for l, ids in sorted(layers.items())} for g, layers in self.units.items()},
                "meta": self.meta}

    def save(self, path: str) -> str:
        """Write the JSON atomically (temp file + rename)."""
        doc = self.to_dict()

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)

        return replace_file(path, write)

    @classmethod
    def from_dict(cls, doc: dict) -> "Selection":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SelectionError(f"selection: not an {FORMAT} document")
        try:
            layout = layout_from_spec(doc["layout"], doc["tensors"], None)
            return cls(layout=layout, units={g: {int(l): ids for l, ids in layers.items()}
                                            for g, layers in doc["units"].items()}, meta=doc.get("meta", {}))
        except (KeyError, TypeError, AttributeError) as e:
            raise SelectionError(f"selection: malformed document ({e})") from None

    @classmethod
    def load(cls, path: str) -> "Selection":
        try:
            with open(path) as f:
                doc = json.load(f)
        except OSError as e:
            raise SelectionError(f"{path}: cannot read the selection ({e.strerror})") from None
        except ValueError as e:
            raise SelectionError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(doc)

