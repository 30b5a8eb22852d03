"""What a training or evaluation loop imports: activation statistics and gradient Gram matrices (docs/hooks.md).

- :class:`ActivationStats` — a context manager that hooks the input of each layer's ``down_proj`` (the MLP neuron
  activations ``act(gate) * up``) and ``o_proj`` (the attention heads' outputs) of a transformers model and
  accumulates per-channel statistics with :func:`lpt_kernels.act_stats_` into device-resident float64 buffers: no
  host synchronisation in the hooks, no activation kept. Padding tokens are skipped through the attention mask of the
  top-level call, or an explicit token mask. :meth:`ActivationStats.result` folds the channels into units (neurons,
  heads) and returns an :class:`ActivationResult`: per layer and unit mean|a|, RMS, max|a|, activation frequency and
  tokens counted, top units, Jaccard overlaps, save/load with the array naming of profiles
  (``<name>/<group>/<stat>``, ``[layers, units]``).
- :class:`GradientGram` — per-domain sums of the gradients of D domains, kept off the device (CPU RAM or a
  memory-mapped file), and from them the D x D Gram and cosine matrices of every parameter, every module (any prefix
  of the parameter names: a projection, an attention block, a layer) and the whole model, plus per-unit (neuron,
  head) Gram matrices through the layout, each gradient byte read once by :func:`lpt_kernels.unit_gram`
  (:class:`GramResult`, with a heatmap of module x domain-pair cosines).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from lpt_kernels import __version__, distributed
from lpt_kernels.checkpoint.writer import replace_file
from lpt_kernels.layout import Layout, load_layout, model_config
from lpt_kernels.ops import FLOAT_DTYPES, MAX_INPUTS, act_stats_, new_act_stats, unit_gram

__all__ = ["ActivationStats", "ActivationResult", "GradientGram", "GramResult", "jaccard", "ACT_STATS",
           "HookError"]

ACT_RAW = ("tokens", "abs_sum", "sq_sum", "abs_max", "active")  # the rows of act_stats_, folded to units
ACT_DERIVED = ("mean_abs", "rms", "freq")
ACT_STATS = ACT_RAW + ACT_DERIVED
_ACT_FILES = ("activations.safetensors", "activations.json")
_GRAM_FILES = ("gradgram.safetensors", "gradgram.json")
_PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HookError(ValueError):
    """A model, layout or result that the hooks cannot work with (one-line message naming the culprit)."""


# ---- shared helpers -------------------------------------------------------------------------------------------

def _model_layout(model: torch.nn.Module, layout, groups: Sequence[str]) -> Layout:
    """The layout of ``model`` (a Layout, a spec dict/path, a built-in family name, or None to detect), validated
    against the model's parameter shapes."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    if isinstance(layout, Layout):
        lay = layout
        lay.validate(shapes)
    else:
        lay = load_layout(layout, shapes, model_config(model), groups=tuple(groups))
    return lay


def _write_atomic(out_dir: str, tensors: Dict[str, torch.Tensor], doc: dict, files: Tuple[str, str]) -> str:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write_json(p):
        with open(p, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=True)

    for name, write in ((files[0], lambda p: save_file(tensors, p)), (files[1], write_json)):
        replace_file(os.path.join(out_dir, name), write)
    return out_dir


def _read(out_dir: str, files: Tuple[str, str], kind: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    apath, jpath = (os.path.join(out_dir, f) for f in files)
    for p in (apath, jpath):
        if not os.path.isfile(p):
            raise HookError(f"{out_dir}: not a saved {kind} result ({os.path.basename(p)} missing)")
    try:
        with open(jpath) as f:
            doc = json.load(f)
        arrays = load_file(apath)
    except (OSError, ValueError) as e:
        raise HookError(f"{out_dir}: cannot read the {kind} result ({e})") from None
    if doc.get("meta", {}).get("kind") != kind:
        raise HookError(f"{out_dir}: {files[1]} does not describe {'an' if kind[:1] in 'aeiou' else 'a'} {kind} result")
    return doc, arrays


def _top_mask(score: torch.Tensor, frac: float, per_layer: bool) -> torch.Tensor:
    """Bool mask of the top ``frac`` entries of ``score [layers, units]`` (globally or per row); never a unit whose
    score is 0 or NaN. Same rule as the update profiles' top units."""
    if not 0.0 < frac <= 1.0:
        raise HookError(f"frac: must be in (0, 1], got {frac}")
    score = torch.nan_to_num(score.double(), nan=-1.0)
    flat = score if per_layer else score.reshape(1, -1)
    k = max(1, int(math.ceil(frac * flat.shape[1])))
    # a stable sort, not topk: ties at the cut go to the earlier position (lower layer, then lower unit)
    idx = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True) & (flat > 0)
    return mask.reshape(score.shape)


def _jaccard_masks(a: torch.Tensor, b: torch.Tensor, per_layer: bool) -> torch.Tensor:
    dims = (-1,) if per_layer else (-2, -1)
    inter = (a & b).sum(dims).double()
    union = (a | b).sum(dims).double()
    return torch.where(union > 0, inter / union.clamp_min(1), 0.0)


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
        ``freq``), over the whole model or within each layer; units with a zero score are never selected."""
        return _top_mask(self.stat(group, by, name), frac, per_layer)

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
    return _jaccard_masks(ma, mb, per_layer)


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
