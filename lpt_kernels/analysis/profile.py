"""Weight-update profiles of a sequence of checkpoints: one streaming pass, one fused kernel call per tensor.

`diff` reads every byte of every checkpoint once (tensors are memory-mapped views streamed in file order with
readahead) and calls :func:`lpt_kernels.unit_gram` on each tensor with all K versions at once. Per unit (MLP neuron,
attention head, KV head) of every layer it keeps the Gram matrix of the M deltas (squared norms on the diagonal,
pairwise dot products off it), sum|d|, max|d| and exact/near-zero counts; per tensor and for the whole model the
update sparsity; log-binned histograms of |dW| and |dW|/|W| from a deterministic row sample; and the count of
non-finite weights wherever one shows up (never folded silently into the numbers).
"""
from __future__ import annotations

import gc
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch

from lpt_kernels import __version__, distributed, unit_gram
from lpt_kernels.backends import cpu
from lpt_kernels.checkpoint import Checkpoint, align, stream
from lpt_kernels.checkpoint.writer import replace_file
from lpt_kernels.layout import DEFAULT_GROUPS, Layout, load_layout, spec_group_layers
from lpt_kernels.units import expected_jaccard, jaccard_masks, top_mask

STATS = ("sq_norm", "abs_sum", "abs_max", "zeros", "near_zeros")


class ProfileError(ValueError):
    """A profile that cannot be built or read (one-line message)."""


_GENERIC_STEM = re.compile(r"^(model|pytorch_model|consolidated)(-\d+-of-\d+)?$")


def label_of(path: str) -> str:
    """A checkpoint's default label: its directory's name (``ckpts/math``, ``ckpts/math/model.safetensors`` and
    ``ckpts/math/model.safetensors.index.json`` are all ``math``); a file with a name of its own gives its stem
    (``runs/math-step200.safetensors`` is ``math-step200``)."""
    p = os.path.normpath(str(path))
    name = os.path.basename(p)
    if name.endswith((".safetensors", ".json")) and not os.path.isdir(p):
        stem = re.sub(r"(\.safetensors)?(\.index)?\.json$|\.safetensors$", "", name)
        if _GENERIC_STEM.match(stem):
            return os.path.basename(os.path.dirname(os.path.abspath(p))) or stem
        return stem
    return name


def _labels(paths: Sequence[str], labels: Optional[Sequence[str]]) -> List[str]:
    if labels is not None:
        if len(labels) != len(paths):
            raise ProfileError(f"labels: {len(labels)} labels for {len(paths)} checkpoints")
        out = list(labels)
    else:
        out = [label_of(p) or str(i) for i, p in enumerate(paths)]
    for i, name in enumerate(out):  # keep them unique: they name arrays and plot series
        if out.index(name) != i:
            out[i] = f"{name}#{i}"
    return out


def delta_names(labels: Sequence[str], mode: str) -> List[str]:
    """Delta m is named by the later checkpoint's label ("math" = math - code consecutively, math - base in base
    mode)."""
    return list(labels[1:])


@dataclass
class Profile:
    """Result of :func:`diff`. Arrays are named ``<delta>/<group>/<stat>`` ([layers, units]) and
    ``<delta_a>|<delta_b>/<group>/dot`` (off-diagonal Gram entries)."""

    meta: dict
    arrays: Dict[str, torch.Tensor]
    tensors: Dict[str, dict] = field(default_factory=dict)
    hist: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        m = self.meta
        return (f"Profile({' -> '.join(m.get('labels', []))}, {m.get('mode')} deltas {self.deltas}, groups "
                f"{self.groups}, {m.get('num_layers')} layers, {len(self.tensors)} tensors)")

    # -- basic accessors ----------------------------------------------------------------------------------------
    @property
    def deltas(self) -> List[str]:
        return list(self.meta["deltas"])

    @property
    def groups(self) -> List[str]:
        return list(self.meta["groups"])

    @property
    def layout(self) -> Layout:
        """The :class:`~lpt_kernels.layout.Layout` the profile was built with (from ``meta["layout"]``, validated
        against the recorded tensor shapes): what :func:`~lpt_kernels.analysis.select.select` and the rollback
        functions take."""
        lay = getattr(self, "_layout", None)
        if lay is None:
            from lpt_kernels.layout import layout_from_spec

            shapes = {n: tuple(t["shape"]) for n, t in self.tensors.items() if "shape" in t}
            lay = layout_from_spec(self.meta["layout"], shapes if len(shapes) == len(self.tensors) else
                                   list(self.tensors), None)
            self._layout = lay
        return lay

    def _d(self, delta: Union[str, int]) -> str:
        if isinstance(delta, int):
            return self.deltas[delta]
        if delta not in self.deltas:
            raise ProfileError(f"delta: {delta!r} is not one of {', '.join(self.deltas)}")
        return delta

    def _g(self, group: str) -> str:
        if group not in self.groups:
            raise ProfileError(f"group: {group!r} is not in this profile (has {', '.join(self.groups)})")
        return group

    def stat(self, delta, group: str, stat: str) -> torch.Tensor:
        """[layers, units] statistic of one delta (``sq_norm``, ``abs_sum``, ``abs_max``, ``zeros``, ``near_zeros``)."""
        if stat not in STATS:
            raise ProfileError(f"stat: {stat!r} is not one of {', '.join(STATS)}")
        return self.arrays[f"{self._d(delta)}/{self._g(group)}/{stat}"]

    def norm(self, delta, group: str) -> torch.Tensor:
        """[layers, units] L2 norm of the delta over each unit's slices."""
        return self.stat(delta, group, "sq_norm").double().sqrt()

    def dot(self, a, b, group: str) -> torch.Tensor:
        a, b = self._d(a), self._d(b)
        if a == b:
            return self.stat(a, group, "sq_norm").double()
        i, j = sorted((self.deltas.index(a), self.deltas.index(b)))
        return self.arrays[f"{self.deltas[i]}|{self.deltas[j]}/{self._g(group)}/dot"].double()

    def cosine(self, a, b, group: str) -> torch.Tensor:
        """[layers, units] cosine between deltas a and b on each unit (0 where either is zero)."""
        den = (self.dot(a, a, group) * self.dot(b, b, group)).sqrt()
        return torch.where(den > 0, self.dot(a, b, group) / den.clamp_min(1e-300), 0.0)

    def group_layers(self, group: str) -> List[int]:
        """The layers where ``group`` has units (a MoE layout's dense MLP or experts may exist in some layers only;
        the arrays have a row of zeros for the others): from ``meta["group_layers"]``, or the layout spec of a
        profile written before it was recorded; every layer if neither says."""
        layers = self.meta.get("group_layers", {}).get(self._g(group))
        if layers is None:
            layers = spec_group_layers(self.meta.get("layout"), group)
        n = self.arrays[f"{self.deltas[0]}/{group}/sq_norm"].shape[0]
        return list(range(n)) if layers is None else [int(x) for x in layers]

    # -- analyses -----------------------------------------------------------------------------------------------
    def top_units(self, delta, group: str, frac: float = 0.10, per_layer: bool = False,
                  by: str = "norm") -> torch.Tensor:
        """Bool [layers, units]: the top ``frac`` of units by update magnitude (``norm`` or ``abs_sum``), over the
        group's units in the layers where it exists (:meth:`group_layers`) or within each layer. Units with a zero
        update are never selected."""
        if not 0.0 < frac <= 1.0:
            raise ProfileError(f"frac: must be in (0, 1], got {frac}")
        score = self.norm(delta, group) if by == "norm" else self.stat(delta, group, "abs_sum").double()
        return top_mask(score, frac, per_layer, self.group_layers(group))

    def _top_masks(self, group: str, frac: float, per_layer: bool) -> torch.Tensor:
        return torch.stack([self.top_units(d, group, frac, per_layer) for d in self.deltas])  # [M, L, U]

    def jaccard(self, group: str, frac: float = 0.10, per_layer: bool = False) -> torch.Tensor:
        """Jaccard overlap of the deltas' top-``frac`` units: [M, M] (global) or [layers, M, M] (per layer)."""
        masks = self._top_masks(group, frac, per_layer)
        out = jaccard_masks(masks[:, None], masks[None, :], per_layer)
        return out.permute(2, 0, 1) if per_layer else out

    def jaccard_chance(self, group: str, frac: float = 0.10, per_layer: bool = False) -> torch.Tensor:
        """The chance level of :meth:`jaccard`: the expected Jaccard overlap of two sets of units drawn at random
        with the sizes of two deltas' top sets, from the units they were ranked among (the group's units in the
        layers where it exists, or one layer's with ``per_layer``); exact (:func:`lpt_kernels.units.expected_jaccard`),
        about frac / (2 - frac) for large full sets, more for sets of a few units. Same shape as ``jaccard``; 1 on
        the diagonal (0 for an empty set), where a set is compared with itself; 0 in layers without the group."""
        masks = self._top_masks(group, frac, per_layer)  # [M, L, U]
        m = len(self.deltas)
        if per_layer:
            size = masks.sum(-1)  # [M, L]
            out = torch.zeros(masks.shape[1], m, m, dtype=torch.float64)
            for layer in self.group_layers(group):
                for i in range(m):
                    for j in range(m):
                        a, b = int(size[i, layer]), int(size[j, layer])
                        out[layer, i, j] = float(a > 0) if i == j else expected_jaccard(a, b, masks.shape[-1])
            return out
        size = masks.sum((-2, -1))
        n = len(self.group_layers(group)) * masks.shape[-1]
        return torch.tensor([[float(size[i] > 0) if i == j else expected_jaccard(int(size[i]), int(size[j]), n)
                              for j in range(m)] for i in range(m)], dtype=torch.float64)

    def shared_cosine(self, a, b, group: str, frac: float = 0.10, per_layer_top: bool = False) -> dict:
        """Layer-wise cosine of deltas a and b restricted to their shared top-``frac`` units: ``pooled`` [layers]
        (over all shared units of the layer together), ``mean`` [layers] (mean of per-unit cosines) and ``shared``
        [layers] (how many units). Layers without a shared unit give NaN."""
        shared = self.top_units(a, group, frac, per_layer_top) & self.top_units(b, group, frac, per_layer_top)
        # where, not a product with the mask: a NaN unit outside the shared set (non-finite weights) stays out
        dab, daa, dbb = (torch.where(shared, self.dot(x, y, group), 0.0) for x, y in ((a, b), (a, a), (b, b)))
        den = (daa.sum(1) * dbb.sum(1)).sqrt()
        n = shared.sum(1)
        pooled = torch.where(den > 0, dab.sum(1) / den.clamp_min(1e-300), float("nan"))
        mean = torch.where(n > 0, torch.where(shared, self.cosine(a, b, group), 0.0).sum(1) / n.clamp_min(1),
                           float("nan"))
        return {"pooled": pooled, "mean": mean, "shared": n}

    def sparsity(self, tolerance: bool = False) -> Dict[str, float]:
        """Whole-model update sparsity per delta: share of parameters with d == 0 (or |d| <= atol + rtol*|w| with
        ``tolerance=True``), by element count over every tensor analysed (tied duplicates counted once)."""
        key = "near_zeros" if tolerance else "zeros"
        total = sum(t["elements"] for t in self.tensors.values() if not t.get("tied_to"))
        out = {}
        for m, d in enumerate(self.deltas):
            z = sum(t[key][m] for t in self.tensors.values() if not t.get("tied_to"))
            out[d] = z / total if total else float("nan")
        return out

    def tensor_sparsity(self, tolerance: bool = False) -> Dict[str, List[float]]:
        """Per tensor: [M] share of (near-)zero changes."""
        key = "near_zeros" if tolerance else "zeros"
        return {n: [z / t["elements"] if t["elements"] else float("nan") for z in t[key]]
                for n, t in self.tensors.items()}

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, out_dir: str) -> str:
        """Write ``profile.safetensors`` (arrays, histograms) and ``profile.json`` (everything else) atomically."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.arrays.items()}
        tensors.update({f"hist/{k}": v.contiguous() for k, v in self.hist.items()})
        doc = {"meta": self.meta, "tensors": self.tensors}
        for name, write in (("profile.safetensors", lambda p: save_file(tensors, p)),
                            ("profile.json", lambda p: _write_json(p, doc))):
            replace_file(os.path.join(out_dir, name), write)
        return out_dir

    @classmethod
    def load(cls, out_dir: str) -> "Profile":
        from safetensors.torch import load_file

        jpath, apath = os.path.join(out_dir, "profile.json"), os.path.join(out_dir, "profile.safetensors")
        for p in (jpath, apath):
            if not os.path.isfile(p):
                raise ProfileError(f"{out_dir}: not a profile directory ({os.path.basename(p)} missing)")
        try:
            with open(jpath) as f:
                doc = json.load(f)
            arrays = load_file(apath)
        except (OSError, ValueError) as e:
            raise ProfileError(f"{out_dir}: cannot read the profile ({e})") from None
        hist = {k[5:]: v for k, v in arrays.items() if k.startswith("hist/")}
        arrays = {k: v for k, v in arrays.items() if not k.startswith("hist/")}
        if not doc.get("meta", {}).get("groups"):
            raise ProfileError(f"{out_dir}: the profile has no unit group (written by a version that allowed an "
                               f"empty profile); rerun lpt diff with --groups naming groups of its layout")
        return cls(meta=doc["meta"], arrays=arrays, tensors=doc["tensors"], hist=hist)


def _write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=True)


# ---- the streaming pass -----------------------------------------------------------------------------------------

def _as_2d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t
    return t.reshape(1, -1) if t.dim() != 0 else t.reshape(1, 1)


def diff(checkpoints: Sequence[Union[str, Checkpoint]], mode: str = "consecutive",
         groups: Optional[Sequence[str]] = None, atol: float = 0.0, rtol: float = 0.0,
         layout: Union[None, str, dict, Layout] = None, intersect: bool = False,
         labels: Optional[Sequence[str]] = None, hist_stride: int = 64, progress: bool = True,
         backend: Optional[str] = None, distributed: bool = False) -> Optional[Profile]:
    """Profile the updates between K >= 2 checkpoints in one streaming pass.

    Args:
        checkpoints: paths (HF directories or .safetensors files) or open :class:`Checkpoint` objects, in training
            order (e.g. base, code, math, qa, cw).
        mode: ``"consecutive"`` (each checkpoint minus the previous one) or ``"base"`` (each minus the first).
        groups: unit groups of the layout to profile per unit; None (default): every group of the layout (a
            built-in layout has ``mlp``, ``attn``, ``kv``; a spec has the groups it defines, e.g. one per MoE
            expert). A requested group the layout lacks is an error; the groups of the layout left out are listed
            in ``meta["groups_left_out"]``.
        atol, rtol: a change counts as near zero when |d| <= atol + rtol * |w_ref|.
        layout: None (detected from names and config.json), a layout spec (dict or JSON path) or a Layout.
        intersect: analyse the tensors common to all checkpoints instead of failing on a mismatch.
        hist_stride: histograms of |dW| and |dW|/|W| use every ``hist_stride``-th row of each tensor (sparser
            for large tensors: about 8k elements a tensor at most; 0: no histograms).
        progress: show a tqdm bar (bytes read).
        distributed: split the pass over the ranks of the initialised torch.distributed process group (``lpt diff``
            under torchrun): the tensors are partitioned across ranks balanced by bytes (tensors that add into the
            same per-unit totals — a layer's gate, up and down projections — stay together), each rank reads only
            its share, and the per-rank partial results are gathered on rank 0, which returns the profile —
            identical to the single-process one — while the other ranks return None. Every rank must call it with
            the same arguments (the checkpoints on storage they all see). ``meta["world_size"]`` and
            ``meta["ranks"]`` (each rank's tensor count and bytes read) record the split.
    """
    if mode not in ("consecutive", "base"):
        raise ProfileError(f"mode: expected 'consecutive' or 'base', got {mode!r}")
    if len(checkpoints) < 2:
        raise ProfileError("checkpoints: need at least two (a base and one later checkpoint)")
    if len(checkpoints) > 8:
        raise ProfileError(f"checkpoints: at most 8 in one pass, got {len(checkpoints)}")
    ckpts, opened = [], []
    try:
        for c in checkpoints:
            if not isinstance(c, Checkpoint):
                c = Checkpoint(c)
                opened.append(c)
            ckpts.append(c)
        if isinstance(groups, str):
            groups = (groups,)
        _warn_same_files(ckpts, mode)
        return _diff(ckpts, mode, None if groups is None else tuple(groups), float(atol), float(rtol), layout,
                     intersect,
                     _labels([c.path for c in ckpts], labels), hist_stride, progress, backend, bool(distributed))
    finally:
        for c in opened:
            c.close()


def _warn_same_files(ckpts, mode: str) -> None:
    """Warn when a delta compares a checkpoint with itself (the same files, under any path or link): its update is
    zero everywhere, which is a mistyped command line far more often than an experiment."""
    pairs = zip(range(len(ckpts) - 1), range(1, len(ckpts))) if mode == "consecutive" else \
        ((0, j) for j in range(1, len(ckpts)))
    for i, j in pairs:
        if ckpts[j].same_files(ckpts[i]):
            warnings.warn(f"lpt diff: checkpoint {j + 1} ({ckpts[j].path}) is the same files as checkpoint {i + 1} "
                          f"({ckpts[i].path}): the update between them is zero everywhere", RuntimeWarning,
                          stacklevel=3)


def _diff(ckpts, mode, groups, atol, rtol, layout, intersect, labels, hist_stride, progress, backend,
          dist_run=False) -> Optional[Profile]:
    # what each tensor is (float weight, FP8 weight read through its scales, scale, non-float buffer); a quantized
    # or non-float weight that cannot be read correctly is refused here, before any work, wherever it is
    kinds = [{n: c.kind(n) for n in c.names} for c in ckpts]
    al = align(ckpts, intersect=intersect)
    first = ckpts[0]
    shapes = {n: tuple(first.info(n).shape) for n in al.names}
    lay = layout if isinstance(layout, Layout) else load_layout(layout, al.names, first.config,
                                                               groups=groups or DEFAULT_GROUPS)
    lay.validate(shapes)
    if groups is None:
        groups = tuple(lay.groups)
    missing = [g for g in groups if g not in lay.groups]
    if missing or not groups:
        raise ProfileError(f"groups: layout {lay.name!r} has no group {', '.join(map(repr, missing))} (it has "
                           f"{', '.join(lay.groups) or 'none'}); nothing would be profiled per unit" if missing else
                           f"groups: layout {lay.name!r} has no unit group; nothing would be profiled per unit")
    deltas = delta_names(labels, mode)
    m_count = len(deltas)
    n_layers = lay.num_layers
    acc = {g: _GroupTotals(n_layers, lay.units[g], m_count) for g in groups}
    tensors: Dict[str, dict] = {}
    hist = _HistTotals(deltas)
    nonfinite: Dict[str, List[int]] = {}
    skipped = dict(al.skipped)
    skipped.update(al.tied_heads)

    names = []
    for n in al.names:
        buf = [c for c, k in zip(ckpts, kinds) if k[n] == "buffer"]
        if buf:
            skipped[n] = f"dtype {_dtype_str(buf[0].info(n).dtype)} is not a float weight"
        else:
            names.append(n)

    nbytes = {n: sum(c.info(n).end - c.info(n).start for c in ckpts) for n in names}
    rank, world = distributed.world() if dist_run else (0, 1)
    mine = _share(names, nbytes, lay, groups, rank, world)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(nbytes[n] for n in mine), unit="B", unit_scale=True,
                   desc="lpt diff" if world == 1 else f"lpt diff (rank 0 of {world})", leave=False)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the pass allocates many small objects and frees them at once: collections only cost time
    try:
        run = lambda: _pass(ckpts, mine, lay, groups, mode, atol, rtol, backend, acc, deltas,  # noqa: E731
                            tensors, hist, nonfinite, hist_stride, bar)
        tied_differ = distributed.call_collectively(run) if world > 1 else run()
    finally:
        if gc_was_enabled:
            gc.enable()
    if bar is not None:
        bar.close()
    ranks = [{"tensors": len(mine), "bytes": sum(nbytes[n] for n in mine)}]
    if world > 1:
        merged = _gather_partials(names, mine, lay, groups, acc, tensors, hist, nonfinite, tied_differ, ranks[0])
        if merged is None:
            return None  # rank 0 holds the profile
        tensors, nonfinite, tied_differ, ranks = merged
    for name, target, path in tied_differ:
        warnings.warn(f"lpt diff: {path}: {name} differs from {target} although config.json says "
                      f"tie_word_embeddings; the head is analysed as a tensor of its own", RuntimeWarning, stacklevel=3)
    if nonfinite:
        warnings.warn(f"lpt diff: non-finite weights in {len(nonfinite)} tensors (first: {next(iter(nonfinite))}); "
                      "their statistics are NaN/inf and listed in profile.json", RuntimeWarning, stacklevel=3)
    dtypes = [sorted({_dtype_str(c.info(n).dtype) for n in names}) for c in ckpts]
    meta = {
        "version": __version__, "checkpoints": [os.path.abspath(c.path) for c in ckpts], "labels": labels,
        "deltas": deltas, "mode": mode, "atol": atol, "rtol": rtol, "groups": list(groups),
        "groups_left_out": [g for g in lay.groups if g not in groups],
        "group_layers": {g: sorted(lay.groups[g]) for g in groups},
        "layout": lay.to_spec(), "num_layers": n_layers, "units": {g: lay.units[g] for g in groups},
        "dtypes": dtypes, "mixed_dtypes": sorted(al.mixed_dtypes), "skipped": skipped, "nonfinite": nonfinite,
        "hist_stride": hist_stride, "hist_edges_log10": [HIST_LO, HIST_HI, HIST_BINS],
        "world_size": world, "ranks": ranks,
    }
    arrays: Dict[str, torch.Tensor] = {}
    for g, t in acc.items():
        arrays.update(t.arrays(g, deltas))
    return Profile(meta=meta, arrays=arrays, tensors=tensors, hist=hist.as_dict() if hist.samples else {})


def _share(names: List[str], nbytes: Dict[str, int], lay: Layout, groups, rank: int, world: int) -> List[str]:
    """The tensors rank `rank` of `world` profiles, in stream order. Work items are the tensors that add into the
    same per-unit totals (a (group, layer) of the layout: a layer's gate, up and down projections) — one rank each,
    so every total is summed in one process in the single-process order and the gathered profile is identical —
    and every other tensor alone; items are balanced across ranks by bytes (:func:`distributed.partition`)."""
    if world == 1:
        return list(names)
    parent = list(range(len(names)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: Dict[tuple, int] = {}
    for i, n in enumerate(names):
        for g, layer, _ in lay.member_of(n):
            if g in groups:
                j = owner.setdefault((g, layer), i)
                parent[find(i)] = find(j)
    items: Dict[int, List[int]] = {}
    for i in range(len(names)):
        items.setdefault(find(i), []).append(i)
    members = list(items.values())
    parts = distributed.partition([sum(nbytes[names[i]] for i in m) for m in members], world)
    return [names[i] for i in sorted(i for k in parts[rank] for i in members[k])]


def _gather_partials(names, mine, lay, groups, acc, tensors, hist, nonfinite, tied_differ, me):
    """Rank 0: every rank's per-tensor entries, histogram counts and the per-unit totals of the (group, layer) rows
    it owns, merged in stream order; (tensors, nonfinite, tied_differ, ranks) there, None elsewhere."""
    rank = distributed.world()[0]
    rows = {(g, layer) for n in mine for g, layer, _ in lay.member_of(n) if g in groups} if rank else ()
    # numpy copies of the rows: a tensor view would pickle its whole storage (every layer of the group), and numpy
    # arrays pickle and unpickle several times faster than tensors
    part = {"tensors": tensors, "nonfinite": nonfinite, "tied": tied_differ, "me": me,
            "rows": {k: tuple(t.numpy().copy() for t in acc[k[0]].row(k[1])) for k in sorted(rows)},
            "hist": (hist.counts.numpy(), hist.zeros.numpy(), hist.samples) if rank else None}
    got = distributed.gather_objects(part)
    if got is None:
        return None
    for r, p in enumerate(got):
        if r == 0:
            continue  # rank 0's own totals are in place already
        for (g, layer), row in p["rows"].items():
            acc[g].set_row(layer, [torch.from_numpy(x) for x in row])
        counts, zeros, samples = p["hist"]
        hist.counts += torch.from_numpy(counts)
        hist.zeros += torch.from_numpy(zeros)
        hist.samples += samples
    order = {n: i for i, n in enumerate(names)}
    all_t = {k: v for p in got for k, v in p["tensors"].items()}
    all_nf = {k: v for p in got for k, v in p["nonfinite"].items()}
    tied = sorted((t for p in got for t in p["tied"]), key=lambda t: order[t[0]])
    return ({n: all_t[n] for n in names}, {n: all_nf[n] for n in sorted(all_nf, key=order.get)}, tied,
            [p["me"] for p in got])


def _dtype_str(dtype) -> str:
    return str(dtype).replace("torch.", "")


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _empty_gram(ws, axis: int, block: int):
    """unit_gram's result for inputs with no elements (a zero-size dimension): zero sums, no counts."""
    from lpt_kernels.ops import UnitGram

    n_units = ws[0].shape[axis] // block
    m = len(ws) - 1
    z = torch.zeros(n_units, m, dtype=torch.float32)
    zi = torch.zeros(n_units, m, dtype=torch.int64)
    return UnitGram(torch.zeros(n_units, m, m, dtype=torch.float32), z, z.clone(), zi, zi.clone())


def _gram(ws, axis, block, mode, atol, rtol, backend, name, ckpts):
    """One unit_gram call; a tensor with no elements is booked without one, and an op error names the tensor."""
    if ws[0].numel() == 0:
        return _empty_gram(ws, axis, block)
    try:
        return unit_gram(ws, axis=axis, block=block, mode=mode, atol=atol, rtol=rtol, backend=backend)
    except (ValueError, TypeError) as e:
        raise ProfileError(f"tensor {name!r} ({', '.join(_dtype_str(w.dtype) for w in ws)} in "
                           f"{', '.join(c.path for c in ckpts)}): {str(e).splitlines()[0]}") from None


def _check_tied(ckpts, lay, name, ws, tied_differ) -> None:
    """A head declared tied to the embedding (config tie_word_embeddings) but stored with other values is not tied:
    warn, and count it as a tensor of its own."""
    target = lay.tied.get(name)
    if target is None:
        return
    for c, w in zip(ckpts, ws):
        if target in c and tuple(c.info(target).shape) == tuple(w.shape):
            e = c.weight(target) if c.kind(target) != "float" else c.tensor(target)
            if not torch.equal(w, e.to(w.dtype) if e.dtype != w.dtype else e):
                tied_differ.append((name, target, c.path))
                return


def _pass(ckpts, names, lay, groups, mode, atol, rtol, backend, acc, deltas, tensors, hist, nonfinite,
          hist_stride, bar) -> List[tuple]:
    """The streaming loop: one unit_gram call per (tensor, member) with all K versions. Returns the tied heads that
    differ from their embedding (name, embedding, checkpoint)."""
    tied_differ: List[tuple] = []
    for name, ws in stream(ckpts, names):
        ws = [_as_2d(w) for w in ws]
        members = lay.member_of(name)
        entry = {"elements": ws[0].numel(), "shape": list(ckpts[0].info(name).shape),
                 "dtypes": sorted({_dtype_str(c.info(name).dtype) for c in ckpts})}
        if name in lay.tied:
            n_before = len(tied_differ)
            _check_tied(ckpts, lay, name, ws, tied_differ)
            if len(tied_differ) == n_before:
                entry["tied_to"] = lay.tied[name]
        if any(w.dtype not in _KERNEL_DTYPES for w in ws):
            ws = [w if w.dtype in _KERNEL_DTYPES else w.float() for w in ws]  # fp64: read in fp32
        totals = None
        if members:
            for g, layer, mem in members:
                if g not in groups:
                    continue
                r = _gram(ws, mem.axis, mem.block, mode, atol, rtol, backend, name, ckpts)
                totals = acc[g].add(layer, r)
        if totals is None:  # not profiled per unit: rows as units keep the pass parallel; summed below
            totals = _fold(_gram(ws, 0, 1, mode, atol, rtol, backend, name, ckpts))
        zeros, near_zeros, sq_norm, abs_max, finite = totals
        entry.update(zeros=zeros, near_zeros=near_zeros, sq_norm=sq_norm, abs_max=abs_max)
        if not finite:
            counts = [int((~torch.isfinite(w)).sum()) for w in ws]
            nonfinite[name] = counts
            entry["nonfinite"] = counts
        if hist_stride > 0 and not entry.get("tied_to") and ws[0].numel():
            hist.add(ws, mode, hist_stride)
        tensors[name] = entry
        if bar is not None:
            bar.update(sum(c.info(name).end - c.info(name).start for c in ckpts))
    return tied_differ


class _GroupTotals:
    """Running per-unit totals of one group, all deltas stacked (a few tensor ops per kernel call)."""

    def __init__(self, n_layers: int, n_units: int, m: int):
        self.gram = torch.zeros(n_layers, n_units, m, m, dtype=torch.float64)
        self.abs_sum = torch.zeros(n_layers, n_units, m, dtype=torch.float64)
        self.abs_max = torch.zeros(n_layers, n_units, m, dtype=torch.float32)
        self.zeros = torch.zeros(n_layers, n_units, m, dtype=torch.int64)
        self.near_zeros = torch.zeros(n_layers, n_units, m, dtype=torch.int64)

    def row(self, layer: int) -> tuple:
        return (self.gram[layer], self.abs_sum[layer], self.abs_max[layer], self.zeros[layer], self.near_zeros[layer])

    def set_row(self, layer: int, row) -> None:
        for dst, src in zip(self.row(layer), row):
            dst.copy_(src)

    def add(self, layer: int, r) -> tuple:
        """Add a unit_gram result into ``layer``'s totals; return its own totals (see :func:`_fold`)."""
        return _fold(r, (self.gram[layer], self.abs_sum[layer], self.abs_max[layer], self.zeros[layer],
                         self.near_zeros[layer]))

    def arrays(self, group: str, deltas: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The profile's named [layers, units] arrays: STATS per delta and the dot product of every pair."""
        out = {}
        for m, d in enumerate(deltas):
            out[f"{d}/{group}/sq_norm"] = self.gram[:, :, m, m].float()
            out[f"{d}/{group}/abs_sum"] = self.abs_sum[:, :, m].float()
            out[f"{d}/{group}/abs_max"] = self.abs_max[:, :, m].clone()
            out[f"{d}/{group}/zeros"] = self.zeros[:, :, m].clone()
            out[f"{d}/{group}/near_zeros"] = self.near_zeros[:, :, m].clone()
            for j in range(m + 1, len(deltas)):
                out[f"{d}|{deltas[j]}/{group}/dot"] = self.gram[:, :, m, j].float()
        return out


def _fold(r, into=None) -> tuple:
    """A unit_gram result's totals per delta: (zeros, near_zeros, sq_norm, abs_max) lists and whether its sums are
    all finite (a NaN or inf anywhere makes them not); with ``into`` (a group layer's gram, abs_sum, abs_max, zeros,
    near_zeros), r is also added into those. One C++ call on the CPU, torch ops elsewhere."""
    if cpu.AVAILABLE and r.gram.device.type == "cpu":
        return cpu.fold_unit_gram(r, into)
    if into is not None:
        gram, abs_sum, abs_max, zeros, near_zeros = into
        gram += r.gram
        abs_sum += r.abs_sum
        torch.maximum(abs_max, r.abs_max, out=abs_max)
        zeros += r.zeros
        near_zeros += r.near_zeros
    gdiag = torch.diagonal(r.gram, dim1=1, dim2=2).double().sum(0)
    return (r.zeros.sum(0).tolist(), r.near_zeros.sum(0).tolist(), gdiag.tolist(), r.abs_max.amax(0).tolist(),
            bool(torch.isfinite(r.abs_sum.sum() + r.gram.sum())))


HIST_BINS, HIST_LO, HIST_HI = 140, -12.0, 2.0  # log10 bins of width 0.1 over [1e-12, 100); larger values: top bin


class _HistTotals:
    """Log10-binned counts of |dW| and |dW|/|W| for every delta: rows 0..M-1 abs, M..2M-1 rel, all stacked."""

    def __init__(self, deltas: Sequence[str]):
        self.keys = [f"{d}/abs" for d in deltas] + [f"{d}/rel" for d in deltas]
        self.counts = torch.zeros(len(self.keys), HIST_BINS, dtype=torch.float64)
        self.zeros = torch.zeros(len(self.keys), dtype=torch.float64)
        self.samples = 0

    def add(self, ws, mode: str, stride: int, max_elems: int = 1 << 13) -> None:
        """Bin every ``step``-th row of the tensor (K versions ``ws``).

        ``step >= stride``, grown for large tensors (at most ~max_elems elements a tensor): whole rows keep the
        sample's reads contiguous. Bin b holds [10^(LO + b/10), 10^(LO + (b+1)/10)); values from 100 up go to the
        top bin; NaN and values below 1e-12 are not counted; exact zeros (and a relative change against a zero
        weight) are counted apart. On the CPU one C++ call bins the sample with exact edges (``cpu.log_hist``);
        elsewhere torch ops bin it by the float32 log10 (a value on an edge may land one bin off).
        """
        n_rows, n_cols = ws[0].shape
        rows = torch.arange(0, n_rows, max(stride, -(-n_rows * n_cols // max_elems)))
        self.samples += 1
        if cpu.AVAILABLE and ws[0].device.type == "cpu":
            cpu.log_hist(ws, rows, mode, self.counts, self.zeros, HIST_BINS, HIST_LO, HIST_HI)
            return
        w = torch.stack([x.index_select(0, rows).float() for x in ws]).view(len(ws), -1)  # [K, S]
        ref = w[:-1] if mode == "consecutive" else w[:1]
        dw = (w[1:] - ref).abs_()
        v = torch.cat([dw, (dw / ref.abs()).nan_to_num_(nan=0.0, posinf=0.0)])  # [2M, S]: abs rows, then rel rows
        self.zeros += (v == 0).sum(1)
        # bin b of row i goes to slot i * (BINS + 1) + b + 1; slot 0 of each row collects what is not counted
        # zeros (counted above) are moved under the range first: log10(0) takes a slow path, ~10x the cost
        b = torch.log10(v.clamp_min(1e-30)).sub_(HIST_LO).mul_(HIST_BINS / (HIST_HI - HIST_LO)).floor_()
        b = b.nan_to_num_(nan=-1.0, neginf=-1.0, posinf=HIST_BINS - 1).clamp_(-1, HIST_BINS - 1).add_(1).long()
        b += torch.arange(v.shape[0])[:, None] * (HIST_BINS + 1)
        counts = torch.bincount(b.view(-1), minlength=v.shape[0] * (HIST_BINS + 1)).view(v.shape[0], HIST_BINS + 1)
        self.counts += counts[:, 1:]

    def as_dict(self) -> Dict[str, torch.Tensor]:
        """The profile's ``hist`` entries: ``<delta>/abs``, ``<delta>/rel`` [BINS] and their ``_zero`` counts [1]."""
        out = {}
        for i, key in enumerate(self.keys):
            out[key] = self.counts[i].clone()
            out[key + "_zero"] = self.zeros[i:i + 1].clone()
        return out