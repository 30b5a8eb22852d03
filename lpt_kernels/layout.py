"""Which tensor slices make up a *unit* (an MLP neuron, an attention head) of a model (docs/layouts.md, docs/architecture.md).

A *group* is a family of units of one layer with the same structure; each of its *members* is a
``(tensor name, axis, block)``: unit ``u`` covers ``[u*block, (u+1)*block)`` along ``axis`` of that 2-D tensor.
Per-unit statistics of a group are the sums (max for maxima) of its members' per-unit statistics.

This module knows nothing of kernels or files: it works from tensor names, shapes and a config dict.

- :func:`detect_layout` builds the built-in layout of Qwen3, Qwen2/2.5, Llama and Mistral checkpoints from
  ``config.json`` (``model_type`` / ``architectures``) or, failing that, from the tensor names;
- :func:`layout_from_spec` builds a layout from a small JSON spec of name patterns (docs/layouts.md), so that other
  architectures need no code change;
- :func:`load_layout` is what the CLI calls: a spec path/dict, a built-in family name, or ``None`` (detect).

Wherever ``names`` is taken it may be an iterable of tensor names, or a mapping ``name -> shape`` (a state dict, or
``{name: tuple(shape)}``): with shapes the layout is validated on the spot and its unit counts are filled in.
Without shapes, call :meth:`Layout.validate` once the shapes are known; it fills the unit counts that no config gave.
"""
from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["LayoutError", "Member", "Layout", "detect_layout", "layout_from_spec", "load_layout", "BUILTIN_LAYOUTS",
           "DEFAULT_GROUPS", "model_config"]

DOCS = "docs/layouts.md"
BUILTIN_LAYOUTS = ("qwen3", "qwen2", "llama", "mistral")
DEFAULT_GROUPS = ("mlp", "attn", "kv")

# group -> [(module, projection, axis, block rule)]; block rule 1 or "head_dim"
_BUILTIN_GROUPS = {
    "mlp": [("mlp", "gate_proj", 0, 1), ("mlp", "up_proj", 0, 1), ("mlp", "down_proj", 1, 1)],
    "attn": [("self_attn", "q_proj", 0, "head_dim"), ("self_attn", "o_proj", 1, "head_dim")],
    "kv": [("self_attn", "k_proj", 0, "head_dim"), ("self_attn", "v_proj", 0, "head_dim")],
}
_BUILTIN_NAME_RE = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<module>self_attn|mlp)\."
                              r"(?P<proj>[qkvo]_proj|gate_proj|up_proj|down_proj)\.weight$")
_ARCH_RE = re.compile(r"^(Qwen3|Qwen2|Llama|Mistral)(For[A-Za-z]+|Model)$")
_SPEC_KEYS = {"name", "description", "layers", "num_layers", "groups", "units", "tied"}
_MEMBER_KEYS = {"tensor", "axis", "block"}


class LayoutError(ValueError):
    """A layout that does not fit the checkpoint, or cannot be built; the message is one line naming the culprit."""


@dataclass(frozen=True)
class Member:
    """One slice family of a group: unit ``u`` covers ``[u*block, (u+1)*block)`` along ``axis`` of ``tensor``."""
    tensor: str
    axis: int
    block: int

    def __post_init__(self):
        if not isinstance(self.tensor, str) or not self.tensor:
            raise LayoutError(f"member tensor must be a non-empty name, got {self.tensor!r}")
        if self.axis not in (0, 1) or isinstance(self.axis, bool):
            raise LayoutError(f"member {self.tensor}: axis must be 0 or 1, got {self.axis!r}")
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise LayoutError(f"member {self.tensor}: block must be a positive int, got {self.block!r}")


@dataclass(repr=False)
class Layout:
    """Groups of units of a model: ``groups[group][layer]`` lists the members of that group in that layer.

    ``units[group]`` is the number of units per layer; a group whose count no config gave is filled in by
    :meth:`validate` from the shapes. ``tied`` maps an alias tensor to the tensor it duplicates (e.g.
    ``lm_head.weight -> model.embed_tokens.weight``) so that whole-model statistics do not count it twice.
    """
    name: str
    groups: dict[str, dict[int, list[Member]]]
    units: dict[str, int]
    num_layers: int
    tied: dict[str, str] = field(default_factory=dict)

    def __repr__(self):
        sizes = ", ".join(f"{g}: {len(ls)} layers x {self.units.get(g, '?')} units" for g, ls in self.groups.items())
        return f"Layout(name={self.name!r}, num_layers={self.num_layers}, groups={{{sizes}}}, tied={self.tied!r})"

    def members(self, group: str) -> dict[int, list[Member]]:
        """layer -> members of ``group``."""
        try:
            return self.groups[group]
        except KeyError:
            raise LayoutError(f"layout {self.name!r} has no group {group!r} (it has: "
                              f"{', '.join(self.groups) or 'none'})") from None

    def member_of(self, tensor: str) -> list[tuple[str, int, Member]]:
        """The ``(group, layer, member)`` entries of ``tensor``; empty if it is in no group."""
        key = (id(self.groups), len(self.groups))  # layouts are not edited in place once built
        index = getattr(self, "_index", None)
        if index is None or index[0] != key:
            table: dict[str, list[tuple[str, int, Member]]] = {}
            for g, layers in self.groups.items():
                for layer, ms in layers.items():
                    for m in ms:
                        table.setdefault(m.tensor, []).append((g, layer, m))
            index = (key, table)
            self._index = index
        return list(index[1].get(tensor, ()))

    def to_spec(self) -> dict:
        """A JSON-able spec; ``layout_from_spec(layout.to_spec(), names)`` gives this layout back.

        Groups whose members follow one ``{layer}`` pattern over all layers are written as patterns, others layer by
        layer; blocks and known unit counts are written as ints."""
        all_layers = sorted({layer for ls in self.groups.values() for layer in ls})
        groups: dict = {}
        for g, layers in self.groups.items():
            templ = _templatize(layers) if sorted(layers) == all_layers else None
            if templ is not None:
                groups[g] = templ
            else:
                groups[g] = {str(layer): [_member_dict(m) for m in ms] for layer, ms in sorted(layers.items())}
        spec = {"name": self.name, "num_layers": self.num_layers, "layers": all_layers, "groups": groups,
                "units": {g: n for g, n in self.units.items() if g in self.groups}}
        if self.tied:
            spec["tied"] = dict(self.tied)
        return spec

    def validate(self, shapes: Mapping[str, tuple]) -> None:
        """Check every member against ``shapes`` (name -> shape, or name -> tensor) and fill missing unit counts.

        Raises :class:`LayoutError` naming the tensor if a member is missing, not 2-D, its axis not divisible by its
        block, or if it gives a unit count other than its group's (from the config, or from the group's first
        member). Nothing is changed unless everything checks out."""
        found: dict[str, int] = {}
        for g, layers in self.groups.items():
            expected = self.units.get(g)
            first = None
            for layer in sorted(layers):
                for m in layers[layer]:
                    shape = _shape_of(shapes.get(m.tensor)) if m.tensor in shapes else None
                    where = f"layout {self.name!r} group {g!r} layer {layer}"
                    if m.tensor not in shapes:
                        raise LayoutError(f"{where}: tensor {m.tensor} is missing from the checkpoint")
                    if shape is None or len(shape) != 2:
                        raise LayoutError(f"{where}: tensor {m.tensor} is not 2-D (shape {_fmt(shape)})")
                    size = shape[m.axis]
                    if size % m.block:
                        raise LayoutError(f"{where}: tensor {m.tensor} axis {m.axis} has size {size}, "
                                          f"not divisible by block {m.block}")
                    n = size // m.block
                    if expected is None:
                        expected, first = n, m.tensor
                    elif n != expected:
                        source = (f"from its member {first}" if first is not None
                                  else "per config.json or the layout spec")
                        raise LayoutError(f"{where}: tensor {m.tensor} has {n} units along axis {m.axis} "
                                          f"(size {size} / block {m.block}) but the group has {expected} per layer "
                                          f"({source})")
            if expected is not None and g not in self.units:
                found[g] = expected
        for alias, target in self.tied.items():
            if alias in shapes and target in shapes:
                a, t = _shape_of(shapes[alias]), _shape_of(shapes[target])
                if a != t:
                    raise LayoutError(f"layout {self.name!r}: tied tensor {alias} (shape {_fmt(a)}) differs in shape "
                                      f"from {target} (shape {_fmt(t)})")
        self.units.update(found)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _fmt(shape):
    return "unknown" if shape is None else "(" + ", ".join(str(s) for s in shape) + ")"


def _shape_of(v):
    """A tuple of ints from a shape (tuple, list, torch.Size) or from anything with ``.shape``; None otherwise."""
    if v is None or isinstance(v, (str, bytes)):
        return None
    s = getattr(v, "shape", v)
    try:
        t = tuple(s)
    except TypeError:
        return None
    if not all(hasattr(x, "__index__") and not isinstance(x, bool) for x in t):
        return None
    return tuple(x.__index__() for x in t)


def _names_and_shapes(names) -> tuple[list[str], dict[str, tuple] | None]:
    """Names as a list, and shapes if ``names`` is a mapping whose values are all shapes (or tensors)."""
    if isinstance(names, (str, bytes)):
        raise LayoutError("names must be an iterable of tensor names or a mapping name -> shape, not a string")
    if isinstance(names, Mapping):
        keys = list(names.keys())
        shapes = {}
        for k in keys:
            s = _shape_of(names[k])
            if s is None:
                return keys, None
            shapes[k] = s
        return keys, shapes
    if names is None:
        raise LayoutError("no tensor names given")
    return list(names), None


def _member_dict(m: Member) -> dict:
    return {"tensor": m.tensor, "axis": m.axis, "block": m.block}


def spec_group_layers(spec: Mapping, group: str) -> list[int] | None:
    """The layers where ``group`` has units, read from a spec (``Layout.to_spec()``, as saved in profiles and
    activation results): a group written layer by layer names its layers, a pattern covers the spec's ``layers``.
    None when the spec does not say."""
    g = (spec or {}).get("groups", {}).get(group)
    if isinstance(g, dict):
        return sorted(int(layer) for layer in g)
    layers = (spec or {}).get("layers")
    return None if g is None or layers is None else sorted(int(x) for x in layers)


def _templatize(layers: dict[int, list[Member]]) -> list[dict] | None:
    """Member patterns with ``{layer}`` that reproduce ``layers`` exactly, or None if there are none."""
    order = sorted(layers)
    if not order:
        return None
    ref = layers[order[0]]
    if any(len(layers[layer]) != len(ref) for layer in order):
        return None
    out = []
    for i, m in enumerate(ref):
        if any(layers[layer][i].axis != m.axis or layers[layer][i].block != m.block for layer in order):
            return None
        escaped = m.tensor.replace("{", "{{").replace("}", "}}")
        spots = [x.span() for x in re.finditer(rf"(?<!\d){order[0]}(?!\d)", escaped)]
        candidates = [escaped[:a] + "{layer}" + escaped[b:] for a, b in spots]
        if len(spots) > 1:
            candidates.append(re.sub(rf"(?<!\d){order[0]}(?!\d)", "{layer}", escaped))
        for t in candidates:
            if all(t.format(layer=layer) == layers[layer][i].tensor for layer in order):
                out.append({"tensor": t, "axis": m.axis, "block": m.block})
                break
        else:
            return None
    return out


def _compile_template(template: str, what: str, *, prefix: bool = False):
    """(regex, fields) for a name pattern with ``{layer}`` and other ``{field}`` placeholders."""
    if not isinstance(template, str) or not template:
        raise LayoutError(f"{what}: pattern must be a non-empty string, got {template!r}")
    parts, fields = [], []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise LayoutError(f"{what}: bad pattern {template!r} ({e}); write a literal brace as {{{{ or }}}}") from None
    for literal, fld, fspec, conv in parsed:
        parts.append(re.escape(literal))
        if fld is None:
            continue
        if not fld.isidentifier() or fspec or conv:
            raise LayoutError(f"{what}: bad placeholder {{{fld}}} in {template!r}; use plain names like {{layer}}")
        if fld in fields:
            parts.append(f"(?P={fld})")
        else:
            fields.append(fld)
            parts.append(rf"(?P<{fld}>\d+)" if fld == "layer" else rf"(?P<{fld}>[^.]+)")
    return re.compile("".join(parts) + ("" if prefix else r"\Z")), fields


def _literal_suffix(template: str) -> str:
    """The text after the last placeholder of a pattern (a cheap filter before the regex)."""
    tail = ""
    for literal, fld, _, _ in string.Formatter().parse(template):
        tail = literal if fld is None else ""
    return tail


def _config_int(config, key, what):
    if config is None:
        raise LayoutError(f"{what} needs {key!r} from config.json, but no config was given")
    if key not in config or config[key] is None:
        raise LayoutError(f"{what}: config.json has no {key!r}")
    v = config[key]
    if isinstance(v, (list, tuple)):
        raise LayoutError(f"{what}: config.json {key!r} is a per-layer list; per-layer unit counts are not supported")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LayoutError(f"{what}: config.json {key!r} = {v!r} is not a positive int")
    return v


def _head_dim(config, what):
    if config is not None and config.get("head_dim") is not None:
        return _config_int(config, "head_dim", what)
    hidden = _config_int(config, "hidden_size", what + " (head_dim = hidden_size // num_attention_heads)")
    heads = _config_int(config, "num_attention_heads", what + " (head_dim = hidden_size // num_attention_heads)")
    if hidden % heads:
        raise LayoutError(f"{what}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                          "give head_dim in config.json")
    return hidden // heads


def _resolve_int(value, config, what):
    """An int, a config key holding one, or "head_dim" (config head_dim, else hidden_size // num_attention_heads)."""
    if isinstance(value, bool):
        raise LayoutError(f"{what}: expected an int or a config key, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise LayoutError(f"{what}: must be positive, got {value}")
        return value
    if isinstance(value, str):
        if value == "head_dim":
            return _head_dim(config, what)
        return _config_int(config, value, what)
    raise LayoutError(f"{what}: expected an int or a config key, got {value!r}")


def _sort_key(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


# ----------------------------------------------------------------------------------------------------------------
# spec layouts


def _read_spec(spec) -> dict:
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise LayoutError(f"layout spec {path}: cannot read it ({e.strerror or e})") from None
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise LayoutError(f"layout spec {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") \
                from None
    if not isinstance(spec, Mapping):
        raise LayoutError(f"layout spec must be a JSON object (or a path to one), got {type(spec).__name__}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise LayoutError(f"layout spec: unknown key {unknown[0]!r} (known: {', '.join(sorted(_SPEC_KEYS))}; "
                          f"see {DOCS})")
    if "groups" not in spec or not isinstance(spec["groups"], Mapping) or not spec["groups"]:
        raise LayoutError(f"layout spec: 'groups' must be a non-empty object of group -> members (see {DOCS})")
    return dict(spec)


def _parse_member(d, config, what) -> tuple[str, int, int]:
    if not isinstance(d, Mapping):
        raise LayoutError(f"{what}: a member must be an object with tensor, axis, block, got {d!r}")
    unknown = sorted(set(d) - _MEMBER_KEYS)
    if unknown or "tensor" not in d or "axis" not in d:
        raise LayoutError(f"{what}: a member needs 'tensor' and 'axis' (and 'block', default 1), got keys "
                          f"{sorted(d)}")
    tensor = d["tensor"]
    if not isinstance(tensor, str) or not tensor:
        raise LayoutError(f"{what}: member tensor must be a non-empty string, got {tensor!r}")
    axis = d["axis"]
    if axis not in (0, 1) or isinstance(axis, bool):
        raise LayoutError(f"{what}: member {tensor}: axis must be 0 or 1, got {axis!r}")
    block = _resolve_int(d.get("block", 1), config, f"{what}: member {tensor}: block")
    return tensor, axis, block


def _spec_layers(value, names, what="layout spec 'layers'"):
    if isinstance(value, bool):
        raise LayoutError(f"{what}: expected a pattern, a count or a list of layer indices, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise LayoutError(f"{what}: negative layer count {value}")
        return set(range(value))
    if isinstance(value, list):
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
            raise LayoutError(f"{what}: a list of layer indices must hold non-negative ints")
        return set(value)
    if isinstance(value, str):
        rx, fields = _compile_template(value, what, prefix=True)
        if fields != ["layer"]:
            raise LayoutError(f"{what}: pattern {value!r} must contain {{layer}} and no other placeholder")
        layers = {int(m.group("layer")) for n in names if (m := rx.match(n))}
        if not layers:
            raise LayoutError(f"{what}: no tensor name begins with {value!r}")
        return layers
    raise LayoutError(f"{what}: expected a pattern, a count or a list of layer indices, got {value!r}")


def _build_from_spec(spec: dict, names: list[str], config) -> Layout:
    name = spec.get("name", "custom")
    if not isinstance(name, str) or not name:
        raise LayoutError(f"layout spec: 'name' must be a non-empty string, got {name!r}")
    fixed_layers = _spec_layers(spec["layers"], names) if spec.get("layers") is not None else None
    units_spec = spec.get("units") or {}
    if not isinstance(units_spec, Mapping):
        raise LayoutError("layout spec: 'units' must be an object of group -> int or config key")
    spec_groups = spec["groups"]
    unknown_units = sorted(set(units_spec) - set(spec_groups))
    if unknown_units:
        raise LayoutError(f"layout spec: 'units' names group {unknown_units[0]!r}, which is not in 'groups'")

    name_set = set(names)
    groups: dict[str, dict[int, list[Member]]] = {}
    units: dict[str, int] = {}
    for gname, body in spec_groups.items():
        what = f"layout spec group {gname!r}"
        if not isinstance(gname, str) or not gname:
            raise LayoutError(f"layout spec: group names must be non-empty strings, got {gname!r}")
        n_units = (_resolve_int(units_spec[gname], config, f"{what}: units") if gname in units_spec else None)
        if isinstance(body, Mapping):  # explicit: layer -> members
            if "{" in gname:
                raise LayoutError(f"{what}: a group given layer by layer cannot have placeholders in its name")
            layers = {}
            for lk, members in body.items():
                try:
                    layer = int(lk)
                except (TypeError, ValueError):
                    raise LayoutError(f"{what}: layer key {lk!r} is not an integer") from None
                if layer < 0 or not isinstance(members, list) or not members:
                    raise LayoutError(f"{what}: layer {lk!r} must be a non-negative index with a non-empty list")
                layers[layer] = [Member(*_parse_member(d, config, f"{what} layer {layer}")) for d in members]
            if not layers:
                raise LayoutError(f"{what}: no layers given")
            groups[gname] = layers
            if n_units is not None:
                units[gname] = n_units
            continue
        if not isinstance(body, list) or not body:
            raise LayoutError(f"{what}: expected a non-empty list of members (or an object layer -> members)")
        parsed = [_parse_member(d, config, what) for d in body]
        _, gfields = _compile_template(gname, what) if "{" in gname or "}" in gname else (None, [])
        if "layer" in gfields:
            raise LayoutError(f"{what}: {{layer}} may not appear in a group name (layers are inside a group)")
        regexes = []
        for tensor, _, _ in parsed:
            rx, fields = _compile_template(tensor, what)
            if "layer" not in fields:
                raise LayoutError(f"{what}: member pattern {tensor!r} has no {{layer}} (give the group layer by "
                                  f"layer instead, see {DOCS})")
            extra = sorted(set(fields) - {"layer"})
            if extra != sorted(gfields):
                raise LayoutError(f"{what}: member pattern {tensor!r} has placeholders {extra or 'none'} besides "
                                  f"{{layer}} but the group name has {sorted(gfields) or 'none'}; they must match")
            regexes.append(rx)
        found: dict[tuple, set[int]] = {}
        if not gfields and fixed_layers is not None:  # no scan needed: look the layers' names up
            hits = {layer for layer in fixed_layers if any(t.format(layer=layer) in name_set for t, _, _ in parsed)}
            if hits:
                found[()] = hits
        else:
            suffixes = tuple(_literal_suffix(t) for t, _, _ in parsed)
            for n in names:
                if not n.endswith(suffixes):
                    continue
                for rx in regexes:
                    mt = rx.match(n)
                    if mt:
                        found.setdefault(tuple(mt.group(f) for f in gfields), set()).add(int(mt.group("layer")))
                        break
        if not found:
            raise LayoutError(f"{what}: no tensor name matches {parsed[0][0]!r} (nor the group's other members)")
        for combo in sorted(found, key=lambda c: [_sort_key(v) for v in c]):
            values = dict(zip(gfields, combo))
            full = gname.format(**values) if gfields else gname
            if full in groups:
                raise LayoutError(f"{what}: group {full!r} is defined twice")
            if gfields or fixed_layers is None:
                layer_set = found[combo] if fixed_layers is None else found[combo] & fixed_layers
            else:
                layer_set = fixed_layers
            if not layer_set:
                continue
            groups[full] = {layer: [Member(t.format(layer=layer, **values), axis, block) for t, axis, block in parsed]
                            for layer in sorted(layer_set)}
            if n_units is not None:
                units[full] = n_units

    tied_spec = spec.get("tied") or {}
    if not isinstance(tied_spec, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in tied_spec.items()):
        raise LayoutError("layout spec: 'tied' must be an object of alias tensor -> tensor it duplicates")
    tied = {a: t for a, t in tied_spec.items() if a in name_set and t in name_set}

    max_layer = max((layer for ls in groups.values() for layer in ls), default=-1)
    num_layers = spec.get("num_layers")
    if num_layers is None:
        num_layers = max_layer + 1
    elif not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= max_layer:
        raise LayoutError(f"layout spec: num_layers {num_layers!r} does not cover layer {max_layer}")
    return Layout(name=name, groups=groups, units=units, num_layers=num_layers, tied=tied)


# ----------------------------------------------------------------------------------------------------------------
# built-in layouts


def _unknown(what: str) -> LayoutError:
    return LayoutError(f"unknown architecture {what}: built-in layouts are {', '.join(BUILTIN_LAYOUTS)}; describe "
                       f"its units in a JSON layout spec and pass --layout spec.json (see {DOCS}), or --layout llama "
                       f"if its tensors follow Llama's names")


def _family_from_config(config) -> str | None:
    """The built-in family named by the config; None if the config names none; LayoutError if it names another."""
    if not config:
        return None
    mt = config.get("model_type")
    if mt in BUILTIN_LAYOUTS:
        return mt
    for arch in config.get("architectures") or ():
        m = _ARCH_RE.match(str(arch))
        if m:
            return m.group(1).lower()
    if mt:
        raise _unknown(f"{mt!r} (model_type in config.json)")
    archs = config.get("architectures")
    if archs:
        raise _unknown(f"{', '.join(map(str, archs))!r} (architectures in config.json)")
    return None


def _builtin(family: str | None, names: list[str], shapes, config, groups) -> Layout:
    groups = tuple(groups)
    if not groups:
        raise LayoutError("no groups requested")
    for g in groups:
        if g not in _BUILTIN_GROUPS:
            raise LayoutError(f"unknown group {g!r} for a built-in layout (known: {', '.join(_BUILTIN_GROUPS)})")
    by_prefix: dict[str, list[tuple[str, int]]] = {}
    for n in names:
        m = _BUILTIN_NAME_RE.match(n)
        if m:
            by_prefix.setdefault(m.group("prefix"), []).append((n, int(m.group("layer"))))
    if not by_prefix:
        if family is None:
            raise _unknown("(no tensor named like model.layers.{i}.mlp.gate_proj.weight / "
                           "model.layers.{i}.self_attn.q_proj.weight among "
                           f"{len(names)} tensors)")
        raise LayoutError(f"config.json says {family!r} but no tensor is named like "
                          "model.layers.{i}.mlp.gate_proj.weight or model.layers.{i}.self_attn.q_proj.weight "
                          f"among {len(names)} tensors; pass --layout spec.json (see {DOCS})")
    if len(by_prefix) > 1:
        shown = ", ".join(repr(p + "layers.") for p in sorted(by_prefix))
        raise LayoutError(f"tensor names have several decoder stacks ({shown}); pass --layout spec.json naming the "
                          f"one to use (see {DOCS})")
    prefix, found = next(iter(by_prefix.items()))
    name_set = set(names)
    if family is None:  # from names alone: Qwen3 has q_norm, Qwen2 has q/k/v biases; Llama and Mistral look alike
        if any(n.startswith(prefix + "layers.") and n.endswith(".self_attn.q_norm.weight") for n in names):
            family = "qwen3"
        elif any(n.startswith(prefix + "layers.") and n.endswith(".self_attn.q_proj.bias") for n in names):
            family = "qwen2"
        else:
            family = "llama"

    # the layers are those present in the names (a checkpoint cut to the layers two checkpoints share, as with
    # --intersect, has fewer than its config); a layer present but lacking a member is reported by validate()
    present = sorted({layer for _, layer in found})
    max_found = present[-1]
    if config is not None and config.get("num_hidden_layers") is not None:
        n_config = _config_int(config, "num_hidden_layers", f"layout {family!r}")
        if max_found >= n_config:
            bad = next(n for n, layer in found if layer == max_found)
            raise LayoutError(f"layout {family!r}: tensor {bad} is in layer {max_found} but config.json has "
                              f"num_hidden_layers={n_config}")
    n_layers = max_found + 1

    def tname(layer, module, proj):
        return f"{prefix}layers.{layer}.{module}.{proj}.weight"

    head_dim = None
    if any(g in ("attn", "kv") for g in groups):
        if config is not None and (config.get("head_dim") is not None or config.get("hidden_size") is not None):
            head_dim = _head_dim(config, f"layout {family!r}")
        else:
            norm = f"{prefix}layers.0.self_attn.q_norm.weight"
            shape = shapes.get(norm) if shapes else None
            if shape is not None and len(shape) == 1:
                head_dim = shape[0]
            else:
                raise LayoutError(f"layout {family!r}: head_dim cannot be told from tensor names and shapes alone; "
                                  "pass the checkpoint's config.json (num_attention_heads, hidden_size or head_dim)")

    units_keys = {"mlp": "intermediate_size", "attn": "num_attention_heads", "kv": "num_key_value_heads"}
    out_groups: dict[str, dict[int, list[Member]]] = {}
    units: dict[str, int] = {}
    for g in groups:
        out_groups[g] = {layer: [Member(tname(layer, mod, proj), axis, head_dim if block == "head_dim" else block)
                                 for mod, proj, axis, block in _BUILTIN_GROUPS[g]]
                         for layer in present}
        key = units_keys[g]
        if config is not None and key == "num_key_value_heads" and config.get(key) is None \
                and config.get("num_attention_heads") is not None:
            key = "num_attention_heads"  # no GQA
        if config is not None and config.get(key) is not None:
            units[g] = _config_int(config, key, f"layout {family!r} group {g!r}")
        # else: from the shapes, by validate()

    tied = {}
    tie = bool(config.get("tie_word_embeddings", False)) if config is not None else False
    embed = prefix + "embed_tokens.weight"
    heads = [n for n in names if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
    if tie and embed in name_set and heads:
        # the lm_head beside the decoder stack: "lm_head.weight" for "model.", "x.lm_head.weight" for "x.model."
        outer = prefix[:-len("model.")] if prefix.endswith("model.") else prefix
        head = outer + "lm_head.weight" if outer + "lm_head.weight" in name_set else (heads[0] if len(heads) == 1
                                                                                      else None)
        if head is not None:
            tied[head] = embed
    return Layout(name=family, groups=out_groups, units=units, num_layers=n_layers, tied=tied)


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def detect_layout(names, config: dict | None, groups=DEFAULT_GROUPS) -> Layout:
    """The built-in layout (Qwen3, Qwen2/2.5, Llama, Mistral) of a checkpoint with these tensor names.

    The family comes from ``config["model_type"]`` / ``config["architectures"]``, else from the tensor names.
    Sizes come from the config (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``
    or ``hidden_size // num_attention_heads``); without one, from the shapes where that is
    unambiguous (MLP sizes; Qwen3's head_dim from ``q_norm``), else :class:`LayoutError` asks for config.json.
    The layers are those present in the names (no tensor beyond config's ``num_hidden_layers``); ``num_layers`` is
    one past the highest. Only the requested ``groups`` are built. If ``names`` is a mapping name -> shape the layout
    is validated.
    """
    names, shapes = _names_and_shapes(names)
    if config is not None and not isinstance(config, Mapping):
        raise LayoutError(f"config must be a dict (config.json), got {type(config).__name__}")
    family = _family_from_config(config)
    layout = _builtin(family, names, shapes, config, groups)
    if shapes is not None:
        layout.validate(shapes)
    return layout


def layout_from_spec(spec, names, config: dict | None = None) -> Layout:
    """A layout from a JSON spec (a dict, or the path of a JSON file) of name patterns; format in docs/layouts.md.

    Layers and pattern placeholders are enumerated from ``names``. Unit counts come from the spec's ``units`` (ints or
    config keys) or, failing that, from the shapes: pass ``names`` as a mapping name -> shape, or call
    :meth:`Layout.validate` later.
    """
    names, shapes = _names_and_shapes(names)
    if config is not None and not isinstance(config, Mapping):
        raise LayoutError(f"config must be a dict (config.json), got {type(config).__name__}")
    layout = _build_from_spec(_read_spec(spec), names, config)
    if shapes is not None:
        layout.validate(shapes)
    return layout


def model_config(model) -> "dict | None":
    """A model's config as the dict :func:`load_layout` takes (transformers' ``config.to_dict()``, a plain mapping),
    or None."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg) if isinstance(cfg, Mapping) else None


def load_layout(spec_or_none, names, config, *, groups=DEFAULT_GROUPS) -> Layout:
    """What ``--layout`` resolves to: None -> :func:`detect_layout`; a spec path or dict -> :func:`layout_from_spec`;
    a built-in family name ("qwen3", "qwen2", "llama", "mistral") that is not a file -> that built-in layout, whatever
    the config's model_type says (for look-alike architectures).

    ``groups`` picks the groups of a built-in layout; a spec layout has the groups its spec defines (the caller uses
    the ones it wants)."""
    if spec_or_none is None:
        return detect_layout(names, config, groups)
    if isinstance(spec_or_none, str) and spec_or_none in BUILTIN_LAYOUTS and not os.path.exists(spec_or_none):
        if config is not None and not isinstance(config, Mapping):
            raise LayoutError(f"config must be a dict (config.json), got {type(config).__name__}")
        names, shapes = _names_and_shapes(names)
        layout = _builtin(spec_or_none, names, shapes, config, groups)
        if shapes is not None:
            layout.validate(shapes)
        return layout
    return layout_from_spec(spec_or_none, names, config)
