"""DeltaTracker: the paper's update measurements as curves during training (docs/train.md).

A run trains one domain after another (Code -> Math -> QA -> CW). The tracker keeps a *chain* of snapshots of the
parameters, one per domain boundary: s_0 (``base``, taken by the first :meth:`~DeltaTracker.start_domain`), s_1 (the
end of the first domain = the start of the second), ... The update of domain j is d_j = s_{j+1} - s_j, and the
current domain's update so far is d_k = live - s_k.

On a tracked step, each parameter tensor is read once by one fused :func:`lpt_kernels.unit_gram` call over
``[s_j0, ..., s_k, live]`` (consecutive deltas): it gives, per unit (MLP neuron, attention head), the squared norm of
d_k, its zero count and its dot product with every compared earlier update d_j0..d_{k-1} (the Gram's last column).
The metrics are computed from those on the device and come back to the host together, once.

What a finished domain keeps: its start snapshot (one copy of the parameters, in the snapshot store; the update of
domain j needs s_j and s_{j+1}, so the chain is what later cosines and the exact :meth:`~DeltaTracker.profile` read),
and its per-unit summary, computed once when it ends: the five statistics of :class:`~lpt_kernels.analysis.Profile`
per group ``[layers, units]`` (float32/int64), its dot product with every earlier update per unit, per-tensor totals
and the |dW| histograms: about ``(5 + earlier domains) x 4-8 bytes`` per unit, a few MB for Qwen3-4B.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from lpt_kernels import __version__, distributed, unit_gram
from lpt_kernels.analysis.profile import (HIST_BINS, HIST_HI, HIST_LO, Profile, _fold, _GroupTotals,
                                          _HistTotals)
from lpt_kernels.ops import FLOAT_DTYPES, MAX_INPUTS, UnitGram, _check_float
from lpt_kernels.train import snapshots
from lpt_kernels.train._model import (TrainError, check_every, check_model, check_name, model_layout, model_params,
                                      plan, to_device)
from lpt_kernels.units import top_mask

MAX_DOMAINS = MAX_INPUTS - 1
_SMALL = 1 << 16  # elements: tensors up to this size without units are measured together  # the chain s_0..s_k plus the live model is one unit_gram call of at most 8 inputs


class _Summary:
    """A finished (or, in :meth:`DeltaTracker.profile`, the current) domain's update, as diff would profile it."""

    def __init__(self, name: str):
        self.name = name
        self.arrays: Dict[str, torch.Tensor] = {}    # "<name>/<g>/<stat>" and "<earlier>|<name>/<g>/dot"
        self.tensors: Dict[str, dict] = {}           # per tensor: zeros, near_zeros, sq_norm, abs_max of this delta
        self.nonfinite: Dict[str, List[int]] = {}    # per tensor: non-finite counts over s_0..s_k and the end point
        self.hist: Dict[str, torch.Tensor] = {}
        self.top: Dict[str, torch.Tensor] = {}       # per group: bool [layers, units] top units, on the device
        self.sq: Dict[str, torch.Tensor] = {}        # per group: float64 [layers, units] squared norms, on the device

    def nbytes(self) -> int:
        ts = list(self.arrays.values()) + list(self.hist.values()) + list(self.top.values()) + list(self.sq.values())
        return sum(t.numel() * t.element_size() for t in ts) + 64 * len(self.tensors)


class DeltaTracker:
    """Live per-unit update statistics of a model trained domain after domain.

    Args:
        model: the model being trained (a transformers model of a built-in layout, or any model a layout describes).
        layout: None (detected from the parameter names and ``model.config``), a built-in family name, a layout spec
            (dict or JSON path) or a :class:`~lpt_kernels.layout.Layout`.
        groups: unit groups measured per unit (``mlp``: neurons, ``attn``: query heads, ``kv``: KV heads).
        snapshot: where the boundary snapshots live: ``"cpu"`` (host RAM, pinned for a GPU model), ``"device"`` (the
            model's device) or ``"disk:PATH"`` (safetensors files under the directory PATH, memory-mapped). Each
            snapshot is one copy of the parameters in their dtype; see :meth:`memory` and docs/train.md.
        every: :meth:`step` measures on every ``every``-th optimizer step of a domain and returns ``{}`` otherwise.
        atol, rtol: a change counts as near zero when ``|d| <= atol + rtol * |w|`` (reported as ``sparsity_tol``).
        top: the top fraction of units by update norm used for Jaccard overlaps and shared cosines (the paper's 10%).
        compare: how many of the most recent finished domains the shared cosines are computed against (None: all);
            a tracked step reads ``2 + compare`` copies of the parameters (the live ones, the current domain's start,
            and one earlier snapshot per compared domain). Jaccard overlaps cover every finished domain at no cost.
        conflict: also report the per-layer conflict ``max(0, -cos)`` on shared top units (``.../layer<i>`` keys).
        base: the label of the first snapshot (the profile's first checkpoint).
        hist_stride: rows sampled for the |dW| histograms of :meth:`profile` (as ``lpt diff --hist-stride``).
        backend: kernel backend for unit_gram (default: the best for the parameters' device).

    A model sharded with FSDP2 (DTensor parameters) is tracked shard by shard: each rank snapshots its local shards
    (1/world of every snapshot) and every ``unit_gram`` call reduces the small per-unit results over the mesh, so
    the metrics and :meth:`profile` are those of the whole model on every rank. Every rank calls :meth:`step`,
    :meth:`start_domain` and :meth:`profile` (they are collectives). See docs/distributed.md.

    Raises :class:`TrainError` (a ValueError with a one-line message) for a model without floating-point parameters,
    a layout that cannot be found or does not fit, or bad arguments.
    """

    def __init__(self, model: torch.nn.Module, layout=None, groups: Sequence[str] = ("mlp", "attn"),
                 snapshot: str = "cpu", every: int = 1, atol: float = 0.0, rtol: float = 0.0, *, top: float = 0.10,
                 compare: Optional[int] = None, conflict: bool = False, base: str = "base", hist_stride: int = 64,
                 backend: Optional[str] = None):
        check_model(model)
        groups = (groups,) if isinstance(groups, str) else tuple(groups)
        self.every = check_every(every)
        try:
            self.atol, self.rtol = _check_float(atol, "atol", 0.0), _check_float(rtol, "rtol", 0.0)
            self.top = _check_float(top, "top", 1e-9, 1.0)
        except (TypeError, ValueError) as e:
            raise TrainError(str(e)) from None
        if compare is not None and (isinstance(compare, bool) or not isinstance(compare, int) or compare < 0):
            raise TrainError(f"compare: expected None or a non-negative int, got {compare!r}")
        if isinstance(hist_stride, bool) or not isinstance(hist_stride, int) or hist_stride < 0:
            raise TrainError(f"hist_stride: expected a non-negative int, got {hist_stride!r}")
        self.compare, self.conflict, self.hist_stride, self.backend = compare, bool(conflict), hist_stride, backend
        self.base = check_name(base, "base")
        self._kind, self._path = snapshots.parse_snapshot(snapshot)
        self.snapshot_spec = snapshot
        self.model = model
        params = model_params(model)
        self.layout = model_layout(model, params, layout, groups)
        self.groups = groups
        self.units = {g: self.layout.units[g] for g in groups}
        self.num_layers = self.layout.num_layers
        self._tensors = plan(params, self.layout, groups)
        self._elements = sum(t.elements for t in self._tensors)
        dev = self._tensors[0].param.device
        # per group, the layer of each member call in the order a step makes them; _per_layer[g] = members per
        # layer when the calls go layer by layer with the same count in every layer (the built-in layouts), else 0
        self._member_layers = {g: [layer for t in self._tensors for g2, layer, _ in t.members if g2 == g]
                               for g in groups}
        self._per_layer = {}
        for g, ls in self._member_layers.items():
            n = len(ls) // self.num_layers if self.num_layers else 0
            regular = n > 0 and ls == [layer for layer in range(self.num_layers) for _ in range(n)]
            self._per_layer[g] = n if regular else 0
        # Tensors without units and of few elements (norm weights) are measured together on a step: one kernel call
        # on their concatenation instead of one each (a call costs tens of microseconds whatever its size).
        self._sharded = any(distributed.is_dtensor(t.param) for t in self._tensors)
        self._small = [t for t in self._tensors if not t.members and t.elements <= _SMALL
                       and t.param.device == dev and not self._sharded]
        self._small_names = {t.name for t in self._small} if len(self._small) > 1 else set()
        self._small_start: Optional[torch.Tensor] = None
        self._tag = f"top{self.top * 100:g}"
        self._chain: List[snapshots.Snapshot] = []   # s_0 .. s_k
        self._domains: List[str] = []                # domain j spans chain[j] -> chain[j + 1] (or the live model)
        self._summaries: Dict[str, _Summary] = {}
        self._steps = 0
        self.steps_per_domain: Dict[str, int] = {}
        self._closed = False

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def domain(self) -> Optional[str]:
        """The domain being trained (None before the first :meth:`start_domain`)."""
        return self._domains[-1] if self._domains else None

    @property
    def domains(self) -> List[str]:
        """Every domain started so far, in order (the profile's deltas)."""
        return list(self._domains)

    @property
    def steps(self) -> int:
        """Optimizer steps (calls of :meth:`step`) in the current domain."""
        return self._steps

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise TrainError(f"{what}: the tracker is closed")

    def snapshot(self, label: str) -> snapshots.Snapshot:
        """The parameters at a boundary, as a read-only mapping ``name -> tensor``: ``base`` or a finished domain's
        name (the parameters when it ended). E.g. the earlier domain's checkpoint of a :class:`RefreshMonitor`."""
        self._check_open("snapshot")
        labels = [s.label for s in self._chain]
        if label not in labels:
            have = ", ".join(repr(x) for x in labels) or "none yet"
            raise TrainError(f"snapshot: no snapshot {label!r} (have {have}; a domain's is taken when it ends)")
        return self._chain[labels.index(label)]

    def memory(self) -> Dict[str, object]:
        """What the tracker holds: ``snapshots`` (count), ``snapshot_bytes`` and where (``location``: host RAM,
        device memory, or files under a directory), ``summary_bytes`` (per-unit summaries of finished domains)."""
        return {"snapshots": len(self._chain), "snapshot_bytes": sum(s.nbytes for s in self._chain),
                "location": self._kind if self._kind != "disk" else f"disk:{self._path}",
                "summary_bytes": sum(s.nbytes() for s in self._summaries.values())}

    @staticmethod
    def snapshot_bytes(model: torch.nn.Module) -> int:
        """Bytes of one snapshot of ``model``: its floating-point parameters in their dtypes (tied ones once)."""
        return sum(distributed.local_tensor(p).numel() * p.element_size() for _, p in model_params(model))

    # -- domains -------------------------------------------------------------------------------------------------
    def start_domain(self, name: str) -> None:
        """Begin domain ``name`` at the current parameters.

        The first call snapshots the parameters as ``base``; each later one first closes the running domain (its
        per-unit summary and its dot products with every earlier update, one pass over the chain) and snapshots the
        parameters as that domain's end, which is also the new domain's start. Step counting restarts at 0.
        """
        self._check_open("start_domain")
        check_name(name, "start_domain")
        if name in self._domains or name == self.base:
            raise TrainError(f"start_domain: domain {name!r} was already used (names must be unique and differ from "
                             f"the base label {self.base!r})")
        if len(self._domains) >= MAX_DOMAINS:
            raise TrainError(f"start_domain: at most {MAX_DOMAINS} domains (the chain and the live model are one "
                             f"unit_gram pass of at most {MAX_INPUTS} inputs)")
        with torch.no_grad():
            if self._domains:
                cur = self._domains[-1]
                self._summaries[cur] = self._summarize(len(self._domains) - 1)
                self.steps_per_domain[cur] = self._steps
            label = self._domains[-1] if self._domains else self.base
            self._chain.append(snapshots.take(self._kind, self._path, len(self._chain), label, self._tensors))
            if self._small_names:
                start = self._chain[-1]
                self._small_start = torch.cat([to_device(start.tensor2d(t.name).reshape(-1), t.param.device)
                                               for t in self._small])
        self._domains.append(name)
        self._steps = 0

    # -- the tracked step ----------------------------------------------------------------------------------------
    def step(self) -> Dict[str, float]:
        """Call after each optimizer step. On every ``every``-th step of the domain, returns the metrics (a flat
        ``{name: float}`` dict any logger takes); ``{}`` on the other steps. See docs/train.md for the names:
        ``lpt/<domain>/sparsity``, ``lpt/<domain>/update_norm``, ``lpt/<domain>/<group>/update_norm``,
        ``lpt/<domain>/<group>/top10_jaccard/<earlier>``, ``lpt/<domain>/<group>/shared_cosine/<earlier>`` (and with
        ``atol``/``rtol`` ``lpt/<domain>/sparsity_tol``, with ``conflict=True`` ``.../conflict/<earlier>/layer<i>``).
        The only host synchronisation is the transfer of the returned numbers."""
        self._check_open("step")
        if not self._domains:
            raise TrainError("step: no domain started; call start_domain(name) before the first step")
        self._steps += 1
        if self._steps % self.every:
            return {}
        with torch.no_grad():
            return self._measure()

    def _inputs(self, t, j0: int, k: int) -> List[torch.Tensor]:
        live = t.live()
        ws = [to_device(self._chain[j].tensor2d(t.name), live.device) for j in range(j0, k + 1)] + [live]
        if distributed.is_dtensor(live):  # local snapshot shards, laid out like the live parameter
            ws = [distributed.like(w, live) for w in ws[:-1]] + [live]
        if any(w.dtype not in FLOAT_DTYPES for w in ws):  # float64 parameters: read in fp32, as lpt diff does
            ws = [w if w.dtype in FLOAT_DTYPES else w.float() for w in ws]
        return ws

    def _measure(self) -> Dict[str, float]:
        k = len(self._domains) - 1
        n_cmp = k if self.compare is None else min(self.compare, k)
        j0 = k - n_cmp
        m = n_cmp + 1                  # deltas in the call: d_j0 .. d_k; column m-1 is d_k
        dev = self._tensors[0].param.device
        kw = dict(mode="consecutive", atol=self.atol, rtol=self.rtol, backend=self.backend)
        units: Dict[str, list] = {g: [] for g in self.groups}  # per member call: [units, m] Gram columns
        zeros, near, sq = [], [], []                             # per tensor: one call's per-unit vectors
        for t in self._tensors:
            if not t.members:
                if t.name in self._small_names:
                    continue
                ws, col, calls = self._inputs(t, k, k), 0, [(None, 0, 1)]
            else:
                ws, col, calls = self._inputs(t, j0, k), m - 1, [(g, mem.axis, mem.block) for g, _, mem in t.members]
            for i, (g, axis, block) in enumerate(calls):
                r = unit_gram(ws, axis=axis, block=block, **kw)
                if g is not None:
                    units[g].append(r.gram[:, :, col])
                if i == 0:  # the tensor's totals (every member call sees the whole tensor)
                    zeros.append(r.zeros[:, col])
                    sq.append(r.gram[:, col, col])
                    if self.atol or self.rtol:
                        near.append(r.near_zeros[:, col])
        if self._small_names:  # the small tensors without units (norm weights), concatenated: one call
            live = torch.cat([t.param.detach().reshape(-1) for t in self._small])
            start = self._small_start
            if live.dtype not in FLOAT_DTYPES:
                live, start = live.float(), start.float()
            r = unit_gram([start.view(1, -1), live.view(1, -1)], axis=0, block=1, **kw)
            zeros.append(r.zeros[:, 0])
            sq.append(r.gram[:, 0, 0])
            near.append(r.near_zeros[:, 0])
        # per group [layers, units, m] float64: dot(d_j, d_k) for j = j0..k (the last column: |d_k|^2)
        acc = {}
        for g, u in self.units.items():
            cols = torch.stack([x.to(dev) for x in units[g]]).double()  # [member calls, units, m]
            per_layer = self._per_layer[g]
            if per_layer:  # every layer has the same members, in layer order: a reshape and one sum
                acc[g] = cols.view(self.num_layers, per_layer, u, m).sum(1)
            else:
                acc[g] = torch.zeros(self.num_layers, u, m, dtype=torch.float64, device=dev)
                for i, layer in enumerate(self._member_layers[g]):
                    acc[g][layer] += cols[i]

        def total(xs):
            return torch.cat([x.to(dev) for x in xs]).sum()
        d = self._domains[k]
        keys, vals = [f"lpt/{d}/sparsity", f"lpt/{d}/update_norm"], [
            total(zeros).double() / self._elements, total(sq).double().sqrt()]
        if self.atol or self.rtol:
            keys.append(f"lpt/{d}/sparsity_tol")
            vals.append(total(near).double() / self._elements)
        for g in self.groups:
            sq_g = acc[g][:, :, m - 1]
            keys.append(f"lpt/{d}/{g}/update_norm")
            vals.append(sq_g.sum().sqrt())
            # the rule of Profile.top_units
            mine = top_mask(sq_g.float().double().sqrt(), self.top, False, sorted(self.layout.groups[g]))
            for j, e in enumerate(self._domains[:k]):
                s = self._summaries[e]
                theirs = s.top[g]
                inter, union = (mine & theirs).sum().double(), (mine | theirs).sum().double()
                keys.append(f"lpt/{d}/{g}/{self._tag}_jaccard/{e}")
                vals.append(torch.where(union > 0, inter / union.clamp_min(1), 0.0))
                if j < j0:
                    continue
                shared = (mine & theirs).double()
                dot = (acc[g][:, :, j - j0] * shared).sum(1)
                den = ((s.sq[g] * shared).sum(1) * (sq_g * shared).sum(1)).sqrt()
                pooled = torch.where(den > 0, dot / den.clamp_min(1e-300), float("nan"))  # [layers]
                ok = ~pooled.isnan()
                keys.append(f"lpt/{d}/{g}/shared_cosine/{e}")
                vals.append(torch.where(ok.any(), pooled.nan_to_num().sum() / ok.sum().clamp_min(1), float("nan")))
                if self.conflict:
                    keys += [f"lpt/{d}/{g}/conflict/{e}/layer{i}" for i in range(self.num_layers)]
                    vals += list((-pooled).nan_to_num(0.0).clamp_min(0.0).unbind())
        out = torch.stack([v.to(torch.float64).reshape(()) for v in vals]).tolist()  # the one host sync
        return dict(zip(keys, out))

    # -- summaries and the profile -------------------------------------------------------------------------------
    def _summarize(self, k: int) -> _Summary:
        """Domain k's update (chain[k] -> chain[k + 1], or the live model for the current domain) exactly as
        :func:`~lpt_kernels.analysis.diff` profiles it: one unit_gram pass per tensor over the whole chain."""
        name = self._domains[k]
        names = self._domains[:k + 1]
        s = _Summary(name)
        totals = {g: _GroupTotals(self.num_layers, u, k + 1) for g, u in self.units.items()}
        hist = _HistTotals([name])
        kw = dict(mode="consecutive", atol=self.atol, rtol=self.rtol, backend=self.backend)
        tied = self._tied()
        for t in self._tensors:
            ws = self._inputs(t, 0, k)
            tot = None
            for g, layer, mem in t.members:
                tot = totals[g].add(layer, _host(unit_gram(ws, axis=mem.axis, block=mem.block, **kw)))
            if tot is None:
                tot = _fold(_host(unit_gram(ws, axis=0, block=1, **kw)))
            z, nz, sqn, amax, finite = tot
            s.tensors[t.name] = {"zeros": z[k], "near_zeros": nz[k], "sq_norm": sqn[k], "abs_max": amax[k]}
            if not finite:
                s.nonfinite[t.name] = [distributed.count_nonfinite(w) for w in ws]
            if self.hist_stride > 0 and t.name not in tied and t.elements:
                _hist_add(hist, ws[k], ws[k + 1], self.hist_stride)
        if self._sharded:  # each rank binned the sampled rows it holds: the counts add up
            distributed.reduce_over_mesh(hist.counts, None, self._mesh())
            distributed.reduce_over_mesh(hist.zeros, None, self._mesh())
        for g, tg in totals.items():
            arrays = tg.arrays(g, names)
            s.arrays.update({key: v for key, v in arrays.items()
                             if key.startswith(f"{name}/") or key.endswith(f"|{name}/{g}/dot")})
            sq = arrays[f"{name}/{g}/sq_norm"]
            dev = self._tensors[0].param.device
            s.sq[g] = sq.double().to(dev)
            s.top[g] = top_mask(sq.double().sqrt(), self.top, False, sorted(self.layout.groups[g])).to(dev)
        if hist.samples:
            s.hist = hist.as_dict()
        return s

    def profile(self) -> Profile:
        """The updates of every domain so far (the current one up to now) as the :class:`Profile` that
        :func:`lpt_kernels.analysis.diff` returns over checkpoints saved at the same points (``base``, the end of
        each domain, the live model), with deltas named by domain in consecutive mode: the same arrays, tensors,
        histograms and meta fields, so every Profile method, ``lpt overlap``, ``lpt report`` (after
        :meth:`Profile.save`) and the selector work on it. Costs one pass over the chain and the live model."""
        self._check_open("profile")
        if not self._domains:
            raise TrainError("profile: no domain started; call start_domain(name) first")
        with torch.no_grad():
            current = self._summarize(len(self._domains) - 1)
        summaries = [self._summaries[d] for d in self._domains[:-1]] + [current]
        arrays: Dict[str, torch.Tensor] = {}
        hist: Dict[str, torch.Tensor] = {}
        for s in summaries:
            arrays.update(s.arrays)
            hist.update(s.hist)
        tensors = {}
        tied = self._tied()
        for t in self._tensors:
            entry = {"elements": t.elements, "shape": list(t.param.shape),
                     "dtypes": sorted({str(t.param.dtype).replace("torch.", "")})}
            if t.name in tied:
                entry["tied_to"] = self.layout.tied[t.name]
            for key in ("zeros", "near_zeros", "sq_norm", "abs_max"):
                entry[key] = [s.tensors[t.name][key] for s in summaries]
            if t.name in current.nonfinite:
                entry["nonfinite"] = current.nonfinite[t.name]
            tensors[t.name] = entry
        labels = [self.base] + self._domains
        points = [s.location if self._kind == "disk" else f"<{self._kind} snapshot {s.label}>" for s in self._chain]
        live = sorted({str(t.param.dtype).replace("torch.", "") for t in self._tensors})
        meta = {
            "version": __version__, "checkpoints": points + ["<live model>"], "labels": labels,
            "deltas": list(self._domains), "mode": "consecutive", "atol": self.atol, "rtol": self.rtol,
            "groups": list(self.groups), "groups_left_out": [g for g in self.layout.groups if g not in self.groups],
            "group_layers": {g: sorted(self.layout.groups[g]) for g in self.groups},
            "layout": self.layout.to_spec(), "num_layers": self.num_layers,
            "units": dict(self.units), "dtypes": [s.dtypes for s in self._chain] + [live], "mixed_dtypes": [],
            "skipped": {}, "nonfinite": dict(current.nonfinite), "hist_stride": self.hist_stride,
            "hist_edges_log10": [HIST_LO, HIST_HI, HIST_BINS],
            "source": "DeltaTracker", "snapshot": self.snapshot_spec,
            "steps": {**self.steps_per_domain, self._domains[-1]: self._steps},
        }
        return Profile(meta=meta, arrays=arrays, tensors=tensors, hist=hist)

    def _tied(self) -> set:
        """Parameters the layout calls tied to another (a head to the embedding) that hold the same values at every
        boundary and now, as ``lpt diff`` decides it: counted once, left out of the histograms. (Parameters that are
        one tensor are listed once by the model already.)"""
        out = set()
        by_name = {t.name: t for t in self._tensors}
        for name, target in self.layout.tied.items():
            if name in by_name and target in by_name:
                a, b = by_name[name], by_name[target]
                pairs = [(s.tensor2d(name), s.tensor2d(target)) for s in self._chain] + [
                    (distributed.local_tensor(a.live()), distributed.local_tensor(b.live()))]
                same = all(x.shape == y.shape and torch.equal(x, y.to(x.device)) for x, y in pairs)
                if distributed.is_dtensor(a.param):  # equal on every rank's shard
                    same = not int(distributed.reduce_partial(torch.tensor([int(not same)]), a.param, "max")[0])
                if same:
                    out.add(name)
        return out

    def _mesh(self):
        return next(t.param.device_mesh for t in self._tensors if distributed.is_dtensor(t.param))

    def close(self) -> None:
        """Release the snapshots (memory, or the mappings of the files, which stay on disk) and the summaries."""
        for s in self._chain:
            s.close()
        self._chain, self._summaries, self._closed = [], {}, True

    def __repr__(self) -> str:
        return (f"DeltaTracker(domain={self.domain!r}, domains={self._domains}, groups={list(self.groups)}, "
                f"snapshot={self.snapshot_spec!r}, every={self.every})")


def _host(r: UnitGram) -> UnitGram:
    """A unit_gram result on the CPU (small per-unit arrays), where profile's bookkeeping folds it."""
    return r if r.gram.device.type == "cpu" else UnitGram(*(x.cpu() for x in r))


def _hist_add(hist: _HistTotals, w0: torch.Tensor, w1: torch.Tensor, stride: int,
              gather: Optional[bool] = None) -> None:
    """Histogram of w1 - w0 as ``lpt diff`` bins it. On the CPU the tensors go to the binning as they are; on another
    device (``gather``) the rows diff would sample (every step-th, at most ~8k elements a tensor: the rule of
    _HistTotals.add) are gathered there and binned on the host."""
    if distributed.is_dtensor(w0):  # the rows diff samples that fall in this rank's shard (counts are summed later)
        n_rows, n_cols = w0.shape
        rows = torch.arange(0, n_rows, max(stride, -(-n_rows * n_cols // (1 << 13))))
        (r0, _), (nr, _) = distributed.local_region(w0)
        mine = rows[(rows >= r0) & (rows < r0 + nr)] - r0
        sample = [distributed.local_tensor(w).index_select(0, mine.to(distributed.local_tensor(w).device)).cpu()
                  for w in (w0, w1)]
        if sample[0].numel():
            hist.add(sample, "consecutive", 1, max_elems=1 << 62)
        else:
            hist.samples += 1
        return
    if not (w0.device.type != "cpu" if gather is None else gather):
        hist.add([w0, w1], "consecutive", stride)
        return
    n_rows, n_cols = w0.shape
    rows = torch.arange(0, n_rows, max(stride, -(-n_rows * n_cols // (1 << 13))), device=w0.device)
    sample = [w.index_select(0, rows).cpu() for w in (w0, w1)]
    hist.add(sample, "consecutive", 1, max_elems=1 << 62)


__all__ = ["DeltaTracker", "MAX_DOMAINS"]
