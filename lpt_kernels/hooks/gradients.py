"""Per-domain gradient sums and their Gram matrices: :class:`GradientGram`, :class:`GramResult` (docs/hooks.md)."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from lpt_kernels import __version__, distributed
from lpt_kernels.hooks.common import HookError, _model_layout, _read, _write_atomic
from lpt_kernels.ops import MAX_INPUTS, unit_gram

_GRAM_FILES = ("gradgram.safetensors", "gradgram.json")
_PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- gradient Gram ----------------------------------------------------------------------------------------------

def _as_2d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # explicit: -1 is ambiguous when a dimension is 0


def _unit_grams(ws: List[torch.Tensor], axis: int, block: int, backend: Optional[str]) -> torch.Tensor:
    """``[U, n, n]`` float64 per-unit Gram of the n given tensors (any n): one unit_gram pass when n <= 8, else over
    pairs of chunks of 4."""
    n = len(ws)
    if ws[0].numel() == 0:  # a zero-size dimension: every unit's Gram is 0 (no element)
        return torch.zeros(ws[0].shape[axis] // block, n, n, dtype=torch.float64)
    if n <= MAX_INPUTS:
        return unit_gram(ws, axis=axis, block=block, mode="given", backend=backend).gram.double()
    step = MAX_INPUTS // 2
    chunks = [list(range(i, min(i + step, n))) for i in range(0, n, step)]
    out = None
    for ci in range(len(chunks)):
        for cj in range(ci, len(chunks)):
            idx = chunks[ci] if ci == cj else chunks[ci] + chunks[cj]
            g = unit_gram([ws[k] for k in idx], axis=axis, block=block, mode="given", backend=backend).gram.double()
            if out is None:
                out = torch.zeros(g.shape[0], n, n, dtype=torch.float64)
            t = torch.tensor(idx)
            out[:, t[:, None], t[None, :]] = g
    return out


class GradientGram:
    """Per-module Gram matrices of the gradients of D domains, accumulated over batches.

    For each domain ``d`` it keeps ``g_d``, the sum of the gradients of every trainable parameter over the batches
    given for ``d`` — in CPU RAM, or in a memory-mapped file per domain under ``storage`` (float32: **D x
    parameters x 4 bytes**, nothing of it on the device). From those, :meth:`result` computes for every parameter the
    D x D Gram ``G[a, b] = <g_a, g_b>`` in one :func:`~lpt_kernels.unit_gram` pass (each gradient byte read once),
    and through the layout the Gram of every unit (MLP neuron, attention head, KV head); Grams of modules (any name
    prefix) and of the whole model are sums of their parameters' Grams. Cosine = ``G[a,b] / sqrt(G[a,a] G[b,b])``.

    Feeding it::

        gg = GradientGram(model, ["code", "math"])
        for batch in code_batches:
            with gg.domain("code"):      # captures this backward's gradients as autograd produces them
                model(**batch).loss.backward()
            model.zero_grad()
        ...
        res = gg.result(); res.cosine()  # [2, 2] whole model; res.cosine("model.layers.3.mlp")

    Inside ``domain(d)`` a hook on each parameter adds the gradient of each backward to ``g_d`` (whatever ``.grad``
    held before, and without changing it). :meth:`accumulate` instead adds the parameters' current ``.grad``.
    The hooks copy each gradient to the CPU as it is produced (a device-to-host copy per parameter per backward);
    ``device_buffer=True`` sums a block's (or an :meth:`accumulate` call's) gradients in float32 on the gradients'
    device instead (up to 1 x parameters x 4 bytes there, freed at the end of the block) and copies once at its end.
    An exception inside a block keeps the gradients of the backward calls already made and counts the block in
    ``batches`` if it captured any (without ``device_buffer``), or drops the block's gradients and does not count it
    (with it).

    Args:
        model: the model (any ``nn.Module``; per-unit Grams need a layout).
        domains: the D domain names.
        layout: None (detect from names and ``model.config``), a family name, a spec, a Layout, or False (no
            per-unit Grams, e.g. for an architecture no layout describes).
        groups: unit groups for per-unit Grams.
        storage: None (CPU RAM) or a directory for memory-mapped float32 files ``<domain>.f32``.
        device_buffer: see above.
        backend: kernel backend for unit_gram (default: the best on the CPU).
        grad_scale: factor applied to the gradients of sharded (DTensor) parameters as they are added; default: the
            number of ranks of the model's device mesh, which undoes the mean FSDP2 takes when it reduce-scatters
            gradients, so that the sums are those of every rank's batches (what one process backpropagating all of
            them would get).

    Models sharded with FSDP2 (``fully_shard``; parameters and gradients are DTensors): each rank keeps the sums of
    its local gradient shards only (1/world of the storage), and :meth:`result` computes the Grams from the shards
    with one small all-reduce per result (every rank must call it; it is a collective). FSDP2 writes the reduced
    gradient into ``.grad`` without running tensor hooks on the sharded parameters, so inside ``domain(d)`` the
    block's gradients of those parameters are read from ``.grad`` when the block ends (what it holds then, less
    what it held when the block began).
    """

    def __init__(self, model: torch.nn.Module, domains: Sequence[str], layout=None,
                 groups: Sequence[str] = ("mlp", "attn", "kv"), *, storage: Optional[str] = None,
                 device_buffer: bool = False, backend: Optional[str] = None, grad_scale: Optional[float] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(domains, str):
            raise TypeError("domains: expected a list of domain names, got a string")
        domains = [str(d) for d in domains]
        if not domains:
            raise HookError("domains: at least one domain is needed")
        for d in domains:
            if domains.count(d) > 1:
                raise HookError(f"domains: {d!r} is given twice")
            if not d or "/" in d or "|" in d:
                raise HookError(f"domains: {d!r} must be non-empty without '/' or '|'")
        self.model = model
        self.domains = domains
        distributed.settle(model)  # FSDP2: the sharded parameters, also after a forward under no_grad
        self.params: List[Tuple[str, torch.nn.Parameter]] = [(n, p) for n, p in model.named_parameters()
                                                             if p.requires_grad]
        if not self.params:
            raise HookError("model: no parameter requires grad")
        if layout is False:
            self.layout = None
            self.groups: Tuple[str, ...] = ()
        else:
            groups = (groups,) if isinstance(groups, str) else tuple(groups)
            self.layout = _model_layout(model, layout, groups)
            self.groups = tuple(g for g in groups if g in self.layout.groups)
        self.storage = storage
        self.device_buffer = bool(device_buffer)
        self.backend = backend
        self.mesh = distributed.sharded_mesh(model)
        self.sharded = {n for n, p in self.params if distributed.is_dtensor(p)}
        self.grad_scale = float(distributed.mesh_size(self.mesh) if grad_scale is None else grad_scale)
        self.offsets: Dict[str, Tuple[int, int]] = {}
        off = 0
        for n, p in self.params:  # a sharded parameter's local shard only
            k = distributed.local_tensor(p).numel()
            self.offsets[n] = (off, k)
            off += k
        self.numel = off
        self._flat: Dict[str, torch.Tensor] = {}
        self._views: Dict[str, Dict[str, torch.Tensor]] = {}
        self._dev: Dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._current: Optional[str] = None
        self._captured = False
        self.batches = {d: 0 for d in domains}

    @staticmethod
    def memory_bytes(model: torch.nn.Module, n_domains: int) -> int:
        """Bytes of off-device storage for ``n_domains`` domains: D x trainable parameters x 4."""
        return 4 * n_domains * sum(p.numel() for p in model.parameters() if p.requires_grad)

    @property
    def stored_bytes(self) -> int:
        """Bytes of gradient sums allocated so far (CPU RAM or mapped files)."""
        return sum(t.numel() * 4 for t in self._flat.values())

    def _check_domain(self, d: str) -> str:
        if d not in self.domains:
            raise HookError(f"domain: {d!r} is not one of {', '.join(self.domains)}")
        return d

    def _store(self, d: str) -> Dict[str, torch.Tensor]:
        views = self._views.get(d)
        if views is None:
            with torch.inference_mode(False), torch.no_grad():
                if self.storage is None:
                    flat = torch.zeros(self.numel, dtype=torch.float32)
                else:
                    os.makedirs(self.storage, exist_ok=True)
                    path = os.path.join(self.storage, f"{d}.f32")
                    with open(path, "wb") as f:  # a sparse file of zeros
                        f.truncate(self.numel * 4)
                    flat = torch.from_file(path, shared=True, size=self.numel, dtype=torch.float32)
            views = {n: flat[o:o + k].view(distributed.local_tensor(p).shape) for (n, p), (o, k) in
                     zip(self.params, (self.offsets[n] for n, _ in self.params))}
            self._flat[d], self._views[d] = flat, views
        return views

    def _add(self, d: str, name: str, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            grad = grad.to_dense()
        grad = distributed.local_tensor(grad.detach())
        scale = self.grad_scale if name in self.sharded else 1.0
        with torch.inference_mode(False), torch.no_grad():
            if self.device_buffer:
                buf = self._dev.get(name)
                if buf is None:
                    self._dev[name] = grad.to(torch.float32, copy=True).mul_(scale)
                else:
                    buf.add_(grad, alpha=scale)
            else:
                self._store(d)[name].add_(grad.to("cpu", torch.float32), alpha=scale)

    def _flush(self, d: str) -> None:
        dev, self._dev = self._dev, {}
        if dev:
            views = self._store(d)
            with torch.no_grad():
                for name, buf in dev.items():
                    views[name].add_(buf.to("cpu"))

    @contextlib.contextmanager
    def domain(self, d: str) -> Iterator["GradientGram"]:
        """Inside the block, every gradient autograd computes for a parameter is added to domain ``d``'s sum."""
        d = self._check_domain(d)
        if self._current is not None:
            raise HookError(f"domain: already collecting {self._current!r} (blocks do not nest)")
        self._store(d)
        self._current = d
        self._captured = False
        before = self._sharded_grads()
        try:
            for n, p in self.params:
                if n not in self.sharded:
                    self._handles.append(p.register_hook(self._param_hook(d, n)))
            try:
                yield self
            except BaseException:
                # the gradients of the backward calls already made stay in the sum (without device_buffer): so
                # does their batch, so that batches always counts the blocks whose gradients the sum holds
                if not self.device_buffer:
                    self._add_sharded_since(d, before)
                if self._captured and not self.device_buffer:
                    self.batches[d] += 1
                raise
            self._add_sharded_since(d, before)
            self._flush(d)
            self.batches[d] += 1
        finally:
            handles, self._handles = self._handles, []
            for h in handles:
                h.remove()
            self._dev = {}
            self._current = None

    def _sharded_grads(self) -> Dict[str, Optional[torch.Tensor]]:
        """A copy of the local shards of the sharded parameters' ``.grad`` (None where there is none)."""
        return {n: None if p.grad is None else distributed.local_tensor(p.grad).detach().clone()
                for n, p in self.params if n in self.sharded}

    def _add_sharded_since(self, d: str, before: Dict[str, Optional[torch.Tensor]]) -> None:
        """Add what the sharded parameters' ``.grad`` gained since `before` (FSDP2 runs no tensor hook on them)."""
        for n, p in self.params:
            if n not in self.sharded or p.grad is None:
                continue
            g = distributed.local_tensor(p.grad).detach()
            b = before.get(n)
            self._add(d, n, g if b is None else g - b)
            self._captured = True

    def _param_hook(self, d: str, name: str):
        def hook(grad):
            self._add(d, name, grad)
            self._captured = True
            return None
        return hook

    def accumulate(self, d: str) -> None:
        """Add every trainable parameter's current ``.grad`` (None counts as zero) to domain ``d``'s sum."""
        d = self._check_domain(d)
        self._store(d)
        for n, p in self.params:
            if p.grad is not None:
                self._add(d, n, p.grad)
        self._flush(d)
        self.batches[d] += 1

    def reset(self) -> None:
        """Drop every domain's sums (files under ``storage`` are left, zeroed on next use)."""
        self._flat.clear()
        self._views.clear()
        self._dev = {}
        self.batches = {d: 0 for d in self.domains}

    def result(self, progress: bool = False) -> "GramResult":
        """Gram matrices of the accumulated gradients (a domain never fed has a zero gradient). For a sharded model,
        of every rank's batches (``meta["batches"]`` counts them all), on every rank; all ranks must call it."""
        dd = len(self.domains)
        ranks = distributed.mesh_size(self.mesh)
        present = [i for i, d in enumerate(self.domains) if d in self._views]
        pt = torch.tensor(present, dtype=torch.long)
        n_layers = self.layout.num_layers if self.layout is not None else 0
        units = {g: self.layout.units[g] for g in self.groups} if self.layout is not None else {}
        per_unit = {g: torch.zeros(n_layers, units[g], dd, dd, dtype=torch.float64) for g in self.groups}
        param_gram: Dict[str, torch.Tensor] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(self.params), desc="gradient gram", leave=False)
        for name, p in self.params:
            full = torch.zeros(dd, dd, dtype=torch.float64)
            if present:
                ws = [_as_2d(self._views[self.domains[i]][name]) for i in present]
                members = [] if self.layout is None else [e for e in self.layout.member_of(name)
                                                          if e[0] in self.groups]
                sharded = name in self.sharded
                total = None
                for g, layer, mem in members:
                    # a sharded weight: its local shards as DTensors; unit_gram reduces the per-unit partials
                    ug = _unit_grams([distributed.like(w, p) for w in ws] if sharded else ws, mem.axis, mem.block,
                                     self.backend)  # [U, P, P]
                    per_unit[g][layer][:, pt[:, None], pt[None, :]] += ug
                    if total is None:
                        total = ug.sum(0)
                if total is None:
                    total = _unit_grams(ws, 0, 1, self.backend).sum(0)
                    if sharded:
                        distributed.reduce_partial(total, p)
                full[pt[:, None], pt[None, :]] = total
            param_gram[name] = full
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        arrays: Dict[str, torch.Tensor] = {}
        for g, t in per_unit.items():
            for a, da in enumerate(self.domains):
                arrays[f"{da}/{g}/sq_norm"] = t[..., a, a].clone()
                for b in range(a + 1, dd):
                    arrays[f"{da}|{self.domains[b]}/{g}/dot"] = t[..., a, b].clone()
        meta = {"kind": "gradient_gram", "version": __version__, "domains": list(self.domains),
                "groups": list(self.groups), "num_layers": n_layers, "units": units,
                "layout": self.layout.to_spec() if self.layout is not None else None,
                "batches": {d: b * ranks for d, b in self.batches.items()}, "world_size": ranks,
                "params": {n: list(p.shape) for n, p in self.params}}
        return GramResult(meta=meta, param_gram=param_gram, arrays=arrays)


@dataclass
class GramResult:
    """Gram matrices of D domains' summed gradients (see :class:`GradientGram`).

    ``param_gram[name]`` is ``[D, D]`` float64 per parameter; per-unit arrays follow the profile naming:
    ``<domain>/<group>/sq_norm`` and ``<a>|<b>/<group>/dot`` (a before b in ``domains``), ``[layers, units]``.
    """

    meta: dict
    param_gram: Dict[str, torch.Tensor]
    arrays: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"GramResult(domains {self.domains}, {len(self.param_gram)} parameters, groups {self.groups})")

    @property
    def domains(self) -> List[str]:
        return list(self.meta["domains"])

    @property
    def groups(self) -> List[str]:
        return list(self.meta["groups"])

    def _d(self, d: Union[str, int]) -> str:
        if isinstance(d, int):
            return self.domains[d]
        if d not in self.domains:
            raise HookError(f"domain: {d!r} is not one of {', '.join(self.domains)}")
        return d

    def gram(self, module: str = "") -> torch.Tensor:
        """``[D, D]`` Gram of a parameter, a module (every parameter under the name prefix, e.g.
        ``model.layers.3.mlp`` or ``model.layers.3.self_attn.q_proj``) or, for ``""``, the whole model."""
        if module == "":
            keys = list(self.param_gram)
        else:
            keys = [k for k in self.param_gram if k == module or k.startswith(module + ".")]
        if not keys:
            raise HookError(f"module: no parameter is named {module!r} or under it")
        return torch.stack([self.param_gram[k] for k in keys]).sum(0)

    def cosine(self, module: str = "") -> torch.Tensor:
        """``[D, D]`` cosine matrix (0 where a domain's gradient is zero) of a module, or of the whole model."""
        return _cos_matrix(self.gram(module))

    def modules(self) -> List[str]:
        """The leaf modules (parameter names without ``.weight``/``.bias``), in model order."""
        out: List[str] = []
        for k in self.param_gram:
            m = k.rsplit(".", 1)[0] if "." in k else k
            if m not in out:
                out.append(m)
        return out

    def projections(self) -> List[str]:
        """Modules of the layout's units, layer by layer (q, k, v, o, gate, up, down for the built-in layouts)."""
        spec = self.meta.get("layout")
        if not spec:
            return [m for m in self.modules() if m.endswith("_proj")]
        known = set(self.modules())
        rows: List[Tuple[int, int, int, str]] = []
        for i, m in enumerate(self.modules()):
            last = m.rsplit(".", 1)[-1]
            layer = _layer_of(m)
            if layer is None or m not in known or not last.endswith("_proj"):
                continue
            order = _PROJ_ORDER.index(last) if last in _PROJ_ORDER else len(_PROJ_ORDER)
            rows.append((layer, order, i, m))
        return [r[-1] for r in sorted(rows)]

    def pairs(self) -> List[Tuple[str, str]]:
        d = self.domains
        return [(d[a], d[b]) for a in range(len(d)) for b in range(a + 1, len(d))]

    def table(self, modules: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str], torch.Tensor]:
        """(rows, pair labels ``a|b``, ``[rows, pairs]`` cosines): the whole model first, then ``modules``
        (default :meth:`projections`)."""
        modules = list(self.projections() if modules is None else modules)
        rows = [""] + modules
        pairs = self.pairs()
        vals = torch.zeros(len(rows), len(pairs), dtype=torch.float64)
        idx = {d: i for i, d in enumerate(self.domains)}
        for r, m in enumerate(rows):
            c = self.cosine(m)
            for j, (a, b) in enumerate(pairs):
                vals[r, j] = c[idx[a], idx[b]]
        return ["model" if m == "" else m for m in rows], [f"{a}|{b}" for a, b in pairs], vals

    def unit_dot(self, a, b, group: str) -> torch.Tensor:
        """``[layers, units]`` per-unit Gram entry ``<g_a, g_b>`` restricted to each unit's slices."""
        if group not in self.groups:
            raise HookError(f"group: {group!r} is not in this result (has {', '.join(self.groups) or 'none'})")
        a, b = self._d(a), self._d(b)
        if a == b:
            return self.arrays[f"{a}/{group}/sq_norm"]
        i, j = sorted((self.domains.index(a), self.domains.index(b)))
        return self.arrays[f"{self.domains[i]}|{self.domains[j]}/{group}/dot"]

    def unit_cosine(self, a, b, group: str = "mlp") -> torch.Tensor:
        """``[layers, units]`` gradient cosine of domains a and b on each unit (0 where either is zero)."""
        den = (self.unit_dot(a, a, group) * self.unit_dot(b, b, group)).sqrt()
        return torch.where(den > 0, self.unit_dot(a, b, group) / den.clamp_min(1e-300), 0.0)

    def plot(self, path: Optional[str] = None, modules: Optional[Sequence[str]] = None, title: Optional[str] = None,
             vmax: Optional[float] = None):
        """Heatmap of cosines: rows the whole model then each module (default: layer x q, k, v, o, gate, up, down),
        columns the domain pairs; a diverging colour scale symmetric around 0 (``vmax`` default: the largest |cos|).
        Saves a PNG when ``path`` is given; returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        rows, cols, vals = self.table(modules)
        labels = [r if r == "model" else _short_module(r) for r in rows]
        v = vals.numpy()
        lim = float(vmax) if vmax is not None else max(1e-12, float(vals.abs().max()))
        h = max(3.0, 0.22 * len(rows) + 1.5)
        w = max(3.5, 0.9 * len(cols) + 2.5)
        fig, ax = plt.subplots(figsize=(w, h))
        im = ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=7 if len(rows) > 30 else 9)
        ax.axhline(0.5, color="k", linewidth=0.8)
        if v.size <= 240:
            for r in range(v.shape[0]):
                for c in range(v.shape[1]):
                    ax.text(c, r, f"{v[r, c]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(v[r, c]) > 0.6 * lim else "black")
        fig.colorbar(im, ax=ax, label="gradient cosine")
        ax.set_title(title or "gradient cosine per module")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=150)
        return fig

    def save(self, out_dir: str) -> str:
        """``gradgram.safetensors`` (``param/<name>`` [D, D] and the per-unit arrays) and ``gradgram.json``."""
        tensors = {f"param/{k}": v for k, v in self.param_gram.items()}
        tensors.update({f"unit/{k}": v for k, v in self.arrays.items()})
        return _write_atomic(out_dir, tensors, {"meta": self.meta, "order": list(self.param_gram)}, _GRAM_FILES)

    @classmethod
    def load(cls, out_dir: str) -> "GramResult":
        doc, arrays = _read(out_dir, _GRAM_FILES, "gradient_gram")
        order = doc.get("order") or [k[6:] for k in arrays if k.startswith("param/")]
        try:
            pg = {k: arrays[f"param/{k}"] for k in order}
        except KeyError as e:
            raise HookError(f"{out_dir}: array {e.args[0]} is missing") from None
        units = {k[5:]: v for k, v in arrays.items() if k.startswith("unit/")}
        return cls(meta=doc["meta"], param_gram=pg, arrays=units)


def _cos_matrix(g: torch.Tensor) -> torch.Tensor:
    d = torch.diagonal(g).clamp_min(0).sqrt()
    den = d[:, None] * d[None, :]
    return torch.where(den > 0, g / den.clamp_min(1e-300), 0.0)


def _layer_of(module: str) -> Optional[int]:
    parts = module.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _short_module(m: str) -> str:
    layer = _layer_of(m)
    last = m.rsplit(".", 1)[-1].replace("_proj", "")
    return f"L{layer} {last}" if layer is not None else m
