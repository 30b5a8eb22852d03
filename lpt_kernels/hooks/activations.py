"""Activation statistics of a transformers model in forward hooks: :class:`ActivationStats`, :class:`ActivationResult`
and :func:`jaccard` (docs/hooks.md)."""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from lpt_kernels import __version__, distributed
from lpt_kernels.hooks.common import HookError, _model_layout, _read, _write_atomic
from lpt_kernels.layout import Layout, spec_group_layers
from lpt_kernels.ops import FLOAT_DTYPES, act_stats_, new_act_stats
from lpt_kernels.units import jaccard_masks, top_mask

ACT_RAW = ("tokens", "abs_sum", "sq_sum", "abs_max", "active")  # the rows of act_stats_, folded to units
ACT_DERIVED = ("mean_abs", "rms", "freq")
ACT_STATS = ACT_RAW + ACT_DERIVED
_ACT_FILES = ("activations.safetensors", "activations.json")


# ---- activation statistics ------------------------------------------------------------------------------------

@dataclass
class _Site:
    group: str
    layer: int
    module_name: str
    module: torch.nn.Module
    channels: int
    block: int
    units: int


def _activation_sites(model: torch.nn.Module, layout: Layout, groups: Sequence[str]) -> List[_Site]:
    """Per group and layer, the module whose *input* channels are the group's units: the member sliced along axis 1
    of a ``<module>.weight`` (``down_proj`` for ``mlp``, ``o_proj`` for ``attn``)."""
    sites = []
    for g in groups:
        layers = layout.members(g)
        for layer in sorted(layers):
            ms = [m for m in layers[layer] if m.axis == 1 and m.tensor.endswith(".weight")]
            if not ms:
                raise HookError(f"group {g!r} of layout {layout.name!r}: no member is sliced along its input axis "
                                f"(axis 1) in layer {layer}, so the group has no input activation to hook (groups "
                                "with one: mlp -> down_proj, attn -> o_proj)")
            m = ms[-1]
            mod_name = m.tensor[: -len(".weight")]
            try:
                mod = model.get_submodule(mod_name)
            except AttributeError:
                raise HookError(f"layout {layout.name!r} group {g!r} layer {layer}: the model has no module "
                                f"{mod_name} (from tensor {m.tensor})") from None
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise HookError(f"module {mod_name}: expected a 2-D weight (a Linear layer)")
            channels = int(w.shape[1])
            units = layout.units.get(g, channels // m.block)
            if units * m.block != channels:
                raise HookError(f"module {mod_name}: {channels} input channels are not {units} units x block "
                                f"{m.block} of group {g!r}")
            sites.append(_Site(g, layer, mod_name, mod, channels, m.block, units))
    return sites


def _forward_arg_position(model: torch.nn.Module, arg: str) -> Optional[int]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return pos.index(arg) if arg in pos else None


class ActivationStats:
    """Per-unit activation statistics of a transformers model, accumulated by forward pre-hooks.

    ``with ActivationStats(model) as acts: model(input_ids, attention_mask=mask)`` hooks the input of each layer's
    ``down_proj`` (MLP neurons: ``act(gate) * up``, one channel per neuron) and ``o_proj`` (attention: one unit per
    query head, ``head_dim`` channels each) and accumulates, per channel, tokens counted, sum|a|, sum a^2, max|a| and
    count(|a| > threshold) with :func:`lpt_kernels.act_stats_` into float64 buffers on the module's device. Hooks do
    not synchronise with the host and keep no activation; they are removed on exit (also on an exception). The
    buffers persist: entering again accumulates more; :meth:`reset` zeroes them; :meth:`result` reads them.

    Padding: the ``attention_mask`` of each call of ``model`` (keyword or positional) is captured by a forward
    pre-hook on ``model``; when it is a 2-D ``[batch, seq]`` mask of 1/0 its zero positions are not counted (with a
    KV cache, its last ``seq`` columns are used). A 4-D or otherwise unusable mask counts every token (a warning
    says so on exit). :meth:`set_token_mask` sets an explicit bool mask ``[batch, seq]`` that takes precedence until
    cleared with ``set_token_mask(None)``. Call the model that was passed in (the mask is read from its calls).

    Args:
        model: a transformers model of a supported layout (Qwen3, Qwen2, Llama, Mistral) or any model a layout spec
            describes; each group needs a member sliced along axis 1 (its input channels).
        layout: None (detected from the parameter names and ``model.config``), a built-in family name, a layout spec
            (dict or JSON path) or a :class:`~lpt_kernels.layout.Layout`.
        groups: unit groups to collect (``mlp``, ``attn``).
        threshold: a channel counts as active on a token when |a| > threshold (compared in fp32).
        name: label of the result (e.g. the domain); :meth:`result` can override it.
        use_attention_mask: read the model's ``attention_mask`` (default) or count every token.
        backend: kernel backend for :func:`act_stats_` (default: the best available on the device).
    """

    def __init__(self, model: torch.nn.Module, layout=None, groups: Sequence[str] = ("mlp", "attn"),
                 threshold: float = 0.0, *, name: str = "acts", use_attention_mask: bool = True,
                 backend: Optional[str] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(groups, str):
            groups = (groups,)
        groups = tuple(groups)
        if not groups:
            raise HookError("groups: at least one group is needed")
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise TypeError(f"threshold: expected a number, got {type(threshold).__name__}") from None
        if math.isnan(threshold):
            raise HookError("threshold: must not be NaN")
        self.model = model
        self.layout = _model_layout(model, layout, groups)
        missing = [g for g in groups if g not in self.layout.groups]
        if missing:
            raise HookError(f"groups: layout {self.layout.name!r} has no group {missing[0]!r} (it has "
                            f"{', '.join(self.layout.groups)})")
        self.groups = groups
        self.threshold = threshold
        self.name = str(name)
        self.use_attention_mask = bool(use_attention_mask)
        self.backend = backend
        self.sites = _activation_sites(model, self.layout, groups)
        self._stats: Dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._mask_pos = _forward_arg_position(model, "attention_mask")
        self._attn_mask: Optional[torch.Tensor] = None
        self._token_mask: Optional[torch.Tensor] = None
        self.calls = 0            # top-level calls of the model seen while active
        self.unmasked_calls = 0   # calls whose attention_mask was given but could not be applied (all tokens counted)
        self._unmasked_at_attach = 0

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "ActivationStats":
        self.attach()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return False

    def attach(self) -> "ActivationStats":
        """Register the hooks (what ``with`` does on entry); allocates the buffers on first use."""
        if self._handles:
            raise HookError("ActivationStats: already attached (it is not re-entrant)")
        self._allocate()
        self._unmasked_at_attach = self.unmasked_calls
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._model_post_hook, always_call=True))
            for i, site in enumerate(self.sites):
                self._handles.append(site.module.register_forward_pre_hook(self._site_hook(i), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook (what ``with`` does on exit) and drop the captured masks; the buffers stay."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._attn_mask = None
        self._token_mask = None
        new = self.unmasked_calls - self._unmasked_at_attach
        self._unmasked_at_attach = self.unmasked_calls
        if new > 0:
            warnings.warn(f"ActivationStats: {new} model call(s) had an attention_mask that is not a 2-D [batch, seq] "
                          "padding mask matching the activations; every token of those calls was counted (pass "
                          "ActivationStats.set_token_mask(mask) to skip padding)", RuntimeWarning, stacklevel=3)

    def reset(self) -> None:
        """Zero the accumulated statistics."""
        for s in self._stats.values():
            s.zero_()
        self.calls = 0
        self.unmasked_calls = 0
        self._unmasked_at_attach = 0

    def set_token_mask(self, mask: Optional[torch.Tensor]) -> None:
        """Count only the tokens where ``mask`` (bool-able, shape ``[batch, seq]`` of the activations) is True, in
        every following call until ``set_token_mask(None)`` or the hooks are removed; takes precedence over the
        attention mask."""
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
            mask = mask.detach()
            if mask.dtype != torch.bool:
                mask = mask != 0
        self._token_mask = mask

    @contextlib.contextmanager
    def token_mask(self, mask: Optional[torch.Tensor]) -> Iterator["ActivationStats"]:
        """``with acts.token_mask(mask): model(...)`` — :meth:`set_token_mask` for the block only."""
        old = self._token_mask
        self.set_token_mask(mask)
        try:
            yield self
        finally:
            self._token_mask = old

    def _allocate(self) -> None:
        # outside inference mode, so that buffers allocated inside it can be updated after it ends
        with torch.inference_mode(False), torch.no_grad():
            for i, site in enumerate(self.sites):
                if i in self._stats:
                    continue
                dev = site.module.weight.device
                if dev.type == "meta":
                    dev = torch.device("cpu")
                self._stats[i] = new_act_stats(site.channels, device=dev)

    # -- hooks ----------------------------------------------------------------------------------------------------
    # the model-level hooks run around the model's forward, not inside it: left out of torch.compile (a graph of
    # its own for one comparison would cost a compilation and gain nothing)
    @torch.compiler.disable
    def _model_pre_hook(self, module, args, kwargs):
        self.calls += 1
        m = kwargs.get("attention_mask")
        if m is None and self._mask_pos is not None and len(args) > self._mask_pos:
            m = args[self._mask_pos]
        self._attn_mask = None
        if not self.use_attention_mask or m is None:
            return None
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            self._attn_mask = m.detach() if m.dtype == torch.bool else m.detach() != 0
        elif self._token_mask is None:
            self.unmasked_calls += 1
        return None

    @torch.compiler.disable
    def _model_post_hook(self, module, args, output):
        self._attn_mask = None
        return None

    def _mask_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        lead = tuple(x.shape[:-1])
        explicit = self._token_mask
        m = explicit if explicit is not None else self._attn_mask
        if m is None:
            return None
        if tuple(m.shape) != lead:
            if m.dim() == 2 and len(lead) == 2 and m.shape[0] == lead[0] and m.shape[1] > lead[1]:
                m = m[:, m.shape[1] - lead[1]:]  # KV cache: the mask covers past and new tokens
            elif len(lead) == 1 and m.numel() == lead[0]:
                m = m.reshape(-1)  # tokens flattened to [batch * seq] before the module
            elif explicit is not None:
                raise HookError(f"token mask: shape {tuple(m.shape)} does not match the activations' leading "
                                f"dimensions {lead}")
            else:
                self.unmasked_calls += 1
                self._attn_mask = None  # count this call's tokens everywhere, not in some layers only
                return None
        if m.device != x.device:
            m = m.to(x.device, non_blocking=True)
        return m

    def _site_hook(self, i: int):
        def hook(module, args, kwargs):
            if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
                return None  # a forward re-run inside backward (activation checkpointing): counted already
            x = args[0] if args else kwargs.get("input", None)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return None
            if x.numel() == 0:  # no token (or no channel): nothing to count
                return None
            x = x.detach()
            if x.dtype not in FLOAT_DTYPES:
                x = x.float()
            stats = self._stats[i]
            if stats.device != x.device:  # the module runs elsewhere than its weight was at attach (offloading)
                stats = self._stats[i] = stats.to(x.device)
            act_stats_(x, stats, token_mask=self._mask_for(x), threshold=self.threshold, backend=self.backend)
            return None
        return hook

    # -- results --------------------------------------------------------------------------------------------------
    def _gathered(self) -> Tuple[Dict[int, torch.Tensor], int, int]:
        """The buffers and call counts; for a model sharded with FSDP2 (DTensor parameters: each rank saw its own
        batches), reduced over the data-parallel ranks (sums, and maxima for max|a|: two collectives, every rank
        must call :meth:`result`). The live buffers are left as they are."""
        mesh = distributed.sharded_mesh(self.model)
        stats = {i: st.detach() for i, st in self._stats.items()}
        if distributed.mesh_size(mesh) == 1:
            return stats, self.calls, self.unmasked_calls
        with torch.no_grad():
            dev = next(iter(stats.values())).device if stats else torch.device("cpu")
            full = [stats[i].to(dev) if i in stats else new_act_stats(s.channels, device=dev)
                    for i, s in enumerate(self.sites)]
            sums = torch.cat([f[[0, 1, 2, 4]].reshape(-1) for f in full] +
                             [torch.tensor([self.calls, self.unmasked_calls], dtype=torch.float64, device=dev)])
            maxima = torch.cat([f[3] for f in full])
            distributed.reduce_over_mesh(sums, maxima, mesh)
            out, k, m = {}, 0, 0
            for i, f in enumerate(full):
                c = f.shape[1]
                r = torch.empty_like(f)
                r[[0, 1, 2, 4]] = sums[k:k + 4 * c].view(4, c)
                r[3] = maxima[m:m + c]
                out[i] = r
                k, m = k + 4 * c, m + c
        return out, int(sums[-2]), int(sums[-1])

    def raw(self) -> Dict[Tuple[str, int], torch.Tensor]:
        """The per-channel buffers ``(group, layer) -> [5, channels]`` float64 (on the device, live)."""
        return {(s.group, s.layer): self._stats[i] for i, s in enumerate(self.sites) if i in self._stats}

    def result(self, name: Optional[str] = None) -> ActivationResult:
        """Fold the channels into units and copy to the CPU (this synchronises): an :class:`ActivationResult`.

        For a model sharded with FSDP2 (``fully_shard``: DTensor parameters), each rank's statistics of its own
        batches are reduced over the model's device mesh first, so every rank gets the result of all ranks' batches
        — what one process seeing all of them would count. Every rank must call it (it is a collective)."""
        name = self.name if name is None else str(name)
        if "/" in name or "|" in name:
            raise HookError(f"name: {name!r} must not contain '/' or '|'")
        stats, calls, unmasked = self._gathered()
        n_layers = self.layout.num_layers
        arrays: Dict[str, torch.Tensor] = {}
        units, blocks, modules = {}, {}, {}
        for g in self.groups:
            gs = [(i, s) for i, s in enumerate(self.sites) if s.group == g]
            u = gs[0][1].units if gs else self.layout.units.get(g, 0)
            units[g], blocks[g] = u, gs[0][1].block if gs else 1
            modules[g] = {str(s.layer): s.module_name for _, s in gs}
            raw = {k: torch.zeros(n_layers, u, dtype=torch.float64) for k in ACT_RAW}
            for i, s in gs:
                st = stats.get(i)
                if st is None:
                    continue
                f = st.detach().reshape(5, s.units, s.block)
                folded = torch.stack([f[0, :, 0], f[1].sum(-1), f[2].sum(-1), f[3].amax(-1), f[4].sum(-1)]).cpu()
                for r, k in enumerate(ACT_RAW):
                    raw[k][s.layer] = folded[r]
            for k in ACT_RAW:
                arrays[f"{name}/{g}/{k}"] = raw[k]
        meta = {"kind": "activations", "version": __version__, "names": [name], "groups": list(self.groups),
                "num_layers": n_layers, "units": units, "block": blocks, "modules": modules,
                "threshold": self.threshold, "layout": self.layout.to_spec(), "calls": {name: calls},
                "unmasked_calls": {name: unmasked}}
        res = ActivationResult(meta=meta, arrays=arrays)
        res._derive()
        return res


@dataclass
class ActivationResult:
    """Per-unit activation statistics of one or more named runs (e.g. domains).

    Arrays are named ``<name>/<group>/<stat>``, each ``[layers, units]`` float64, like an update profile's:

    - ``tokens``: tokens counted (padding excluded);
    - ``abs_sum``, ``sq_sum``: sum over tokens and the unit's channels of |a| and a^2;
    - ``abs_max``: max |a| over tokens and channels;
    - ``active``: count of (token, channel) with |a| > threshold;
    - ``mean_abs`` = abs_sum / (tokens * block), ``rms`` = sqrt(sq_sum / (tokens * block)),
      ``freq`` = active / (tokens * block) (activation frequency), 0 where no token was counted.

    ``block`` is the unit's channel count (1 for an MLP neuron, head_dim for an attention head).
    """

    meta: dict
    arrays: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        runs = ", ".join(f"{n}: {self.tokens(n)} tokens" for n in self.names)
        units = ", ".join(f"{g} {self.meta['units'][g]}" for g in self.groups)
        return f"ActivationResult({runs}; {self.meta['num_layers']} layers; units per layer: {units})"

    @property
    def names(self) -> List[str]:
        return list(self.meta["names"])

    @property
    def groups(self) -> List[str]:
        return list(self.meta["groups"])

    def _n(self, name: Optional[str]) -> str:
        if name is None:
            if len(self.names) != 1:
                raise HookError(f"name: this result holds {', '.join(self.names)}; say which")
            return self.names[0]
        if name not in self.names:
            raise HookError(f"name: {name!r} is not one of {', '.join(self.names)}")
        return name

    def _g(self, group: str) -> str:
        if group not in self.groups:
            raise HookError(f"group: {group!r} is not in this result (has {', '.join(self.groups)})")
        return group

    def _derive(self) -> None:
        for name in self.names:
            for g in self.groups:
                b = float(self.meta["block"][g])
                a = {k: self.arrays[f"{name}/{g}/{k}"] for k in ACT_RAW}
                n = a["tokens"] * b
                ok = n > 0
                den = n.clamp_min(1.0)
                self.arrays[f"{name}/{g}/mean_abs"] = torch.where(ok, a["abs_sum"] / den, 0.0)
                self.arrays[f"{name}/{g}/rms"] = torch.where(ok, (a["sq_sum"] / den).sqrt(), 0.0)
                self.arrays[f"{name}/{g}/freq"] = torch.where(ok, a["active"] / den, 0.0)

    def stat(self, group: str, stat: str = "mean_abs", name: Optional[str] = None) -> torch.Tensor:
        """``[layers, units]`` statistic (one of ``ACT_STATS``) of a run."""
        if stat not in ACT_STATS:
            raise HookError(f"stat: {stat!r} is not one of {', '.join(ACT_STATS)}")
        return self.arrays[f"{self._n(name)}/{self._g(group)}/{stat}"]

    def tokens(self, name: Optional[str] = None) -> int:
        """Tokens counted (the same at every site of a run)."""
        n = self._n(name)
        return int(max(self.arrays[f"{n}/{g}/tokens"].max().item() for g in self.groups))

    def top_units(self, group: str, frac: float = 0.05, per_layer: bool = False, by: str = "mean_abs",
                  name: Optional[str] = None) -> torch.Tensor:
        """Bool ``[layers, units]``: the top ``frac`` of units by ``by`` (``mean_abs``, ``rms``, ``abs_max``,
        ``freq``), over the group's units in the layers where it exists (from the layout) or within each layer;
        units with a zero score are never selected (the rule of ``Profile.top_units``)."""
        if not 0.0 < frac <= 1.0:
            raise HookError(f"frac: must be in (0, 1], got {frac}")
        if by == "tokens":  # one count for every unit of a site: a ranking by it would be the tie order
            raise HookError(f"by: 'tokens' is the same for every unit; rank by one of "
                            f"{', '.join(s for s in ACT_STATS if s != 'tokens')}")
        return top_mask(self.stat(group, by, name), frac, per_layer,
                        spec_group_layers(self.meta.get("layout"), self._g(group)))

    def jaccard(self, other: "ActivationResult", group: str, frac: float = 0.05, per_layer: bool = False,
                by: str = "mean_abs", name: Optional[str] = None, other_name: Optional[str] = None) -> torch.Tensor:
        """Jaccard overlap of this run's and ``other``'s top units (0-d tensor, or ``[layers]`` per layer)."""
        return jaccard(self, other, group, frac, per_layer, by, name, other_name)

    def select(self, name: str) -> "ActivationResult":
        """The result of one run."""
        name = self._n(name)
        meta = dict(self.meta, names=[name], calls={name: self.meta.get("calls", {}).get(name)},
                    unmasked_calls={name: self.meta.get("unmasked_calls", {}).get(name)})
        return ActivationResult(meta=meta, arrays={k: v for k, v in self.arrays.items()
                                                   if k.split("/", 1)[0] == name})

    @classmethod
    def merge(cls, *results: "ActivationResult") -> "ActivationResult":
        """One result holding the runs of several (names must differ; same model, groups and threshold)."""
        if len(results) == 1 and isinstance(results[0], (list, tuple)):
            results = tuple(results[0])
        if not results:
            raise HookError("merge: no results given")
        first = results[0]
        names: List[str] = []
        arrays: Dict[str, torch.Tensor] = {}
        calls, unmasked = {}, {}
        for r in results:
            for k in ("groups", "num_layers", "units", "block", "threshold"):
                if r.meta[k] != first.meta[k]:
                    raise HookError(f"merge: results differ in {k} ({r.meta[k]!r} vs {first.meta[k]!r})")
            for n in r.names:
                if n in names:
                    raise HookError(f"merge: two runs are named {n!r}; give them distinct names "
                                    "(ActivationStats.result(name=...))")
                names.append(n)
            arrays.update(r.arrays)
            calls.update(r.meta.get("calls", {}))
            unmasked.update(r.meta.get("unmasked_calls", {}))
        meta = dict(first.meta, names=names, calls=calls, unmasked_calls=unmasked)
        return cls(meta=meta, arrays=arrays)

    def save(self, out_dir: str) -> str:
        """Write ``activations.safetensors`` (arrays) and ``activations.json`` (meta) into ``out_dir``, atomically."""
        return _write_atomic(out_dir, self.arrays, {"meta": self.meta}, _ACT_FILES)

    @classmethod
    def load(cls, out_dir: str) -> "ActivationResult":
        doc, arrays = _read(out_dir, _ACT_FILES, "activations")
        res = cls(meta=doc["meta"], arrays=arrays)
        for n in res.names:
            for g in res.groups:
                for k in ACT_STATS:
                    if f"{n}/{g}/{k}" not in arrays:
                        raise HookError(f"{out_dir}: array {n}/{g}/{k} is missing")
        return res


def jaccard(a: ActivationResult, b: ActivationResult, group: str = "mlp", frac: float = 0.05,
            per_layer: bool = False, by: str = "mean_abs", name_a: Optional[str] = None,
            name_b: Optional[str] = None) -> torch.Tensor:
    """Jaccard overlap |A & B| / |A | B| of the top-``frac`` units of two runs: a 0-d tensor (units ranked over the
    whole model) or ``[layers]`` (ranked within each layer). 0 where both sets are empty."""
    ma = a.top_units(group, frac, per_layer, by, name_a)
    mb = b.top_units(group, frac, per_layer, by, name_b)
    if ma.shape != mb.shape:
        raise HookError(f"jaccard: the results have {tuple(ma.shape)} and {tuple(mb.shape)} {group} units")
    return jaccard_masks(ma, mb, per_layer)
