"""DTensor inputs to the four ops, and the placements and reductions they rest on (see the package docstring).

- **Placements.** A DTensor's local shard is the rectangle ``[offsets, offsets + sizes)`` of the global tensor that
  its ``placements`` give the rank's mesh coordinate: ``Shard(d)`` splits dim d as ``torch.chunk`` does (chunks of
  ceil(n / parts), the last ones smaller or empty — uneven shards), ``Replicate`` keeps it whole
  (:func:`shard_region`, :func:`local_region`).
- **The ops** (:func:`unit_gram`, :func:`masked_cosine`, :func:`act_stats_`, :func:`rollback_`; ``lpt_kernels.ops``
  hands DTensor arguments here). Each rank runs the op on its local shard with the unit ids mapped to local ones — a
  unit split across a shard boundary (block > 1, uneven shards) is computed in its pieces on the ranks that hold
  them — and the small per-unit partial results, never weights, are reduced across the mesh dimensions that shard
  the tensor: SUM for Grams, sums and counts, MAX for maxima, in float64. A call makes at most one collective per
  result tensor (unit_gram: three for its five results; masked_cosine: one; act_stats_: one all-gather) per sharded
  mesh dimension, none for a replicated tensor. Results are plain tensors holding the full per-unit results on
  every rank, equal to the single-process call. ``rollback_`` needs no collective: each rank updates its own local
  shard from the same slice of the source.
- **FSDP2 modules** (:func:`settle`, :func:`sharded_mesh`, :func:`reduce_over_mesh`, :func:`as_2d`): what hooks,
  rollback_model_ and the tracker need to work on local shards.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["is_dtensor", "any_dtensor", "local_region", "shard_region", "chunk_extent", "local_tensor",
           "unit_gram", "masked_cosine", "act_stats_", "rollback_", "localize_rollback", "reduce_partial",
           "settle", "sharded_mesh", "reduce_over_mesh", "mesh_size", "as_2d", "count_nonfinite", "like"]


# ---------------------------------------------------------------------------------------------------------------
# DTensors and placements


def _dtensor_module():
    """The loaded DTensor module, or None when none is loaded (then no tensor can be a DTensor)."""
    return sys.modules.get("torch.distributed.tensor") or sys.modules.get("torch.distributed._tensor")


def is_dtensor(x) -> bool:
    """Whether `x` is a DTensor (costs a dict lookup when torch.distributed.tensor was never imported)."""
    m = _dtensor_module()
    return m is not None and isinstance(x, getattr(m, "DTensor", ()))


def any_dtensor(obj) -> bool:
    """Whether `obj` (a tensor, or nested lists/tuples of them) holds a DTensor."""
    if _dtensor_module() is None:
        return False
    if isinstance(obj, (list, tuple)):
        return any(any_dtensor(o) for o in obj)
    return is_dtensor(obj)


def chunk_extent(n: int, parts: int, k: int) -> Tuple[int, int]:
    """(offset, size) of chunk `k` of `parts` along a dim of `n` indices, as ``Shard`` places it (torch.chunk:
    chunks of ceil(n / parts), the last ones smaller or empty)."""
    full = -(-n // parts)
    start = min(full * k, n)
    return start, max(0, min(n, start + full) - start)


def _is_shard(p) -> bool:
    return callable(getattr(p, "is_shard", None)) and p.is_shard()


def _is_replicate(p) -> bool:
    return callable(getattr(p, "is_replicate", None)) and p.is_replicate()


def shard_region(shape, mesh_shape, coord, placements, where: str = "tensor",
                 error: type = ValueError) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(offsets, sizes) of the local shard at mesh coordinate `coord` of a DTensor of global `shape` with
    `placements` on a mesh of `mesh_shape`. Raises `error` for placements that are not Shard or Replicate (partial
    sums, strided shards)."""
    offsets, sizes = [0] * len(shape), list(shape)
    for i, p in enumerate(placements):
        if hasattr(p, "split_factor"):  # _StridedShard (FSDP2 over tensor parallelism): interleaved pieces
            raise error(f"{where}: placement {p} (strided sharding, FSDP over tensor parallelism) is not supported")
        if _is_shard(p):
            d = p.dim % len(shape) if shape else 0
            off, size = chunk_extent(sizes[d], mesh_shape[i], coord[i])
            offsets[d] += off
            sizes[d] = size
        elif not _is_replicate(p):
            raise error(f"{where}: placement {p} is not supported (Shard or Replicate only: not partial sums)")
    return tuple(offsets), tuple(sizes)


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a plain tensor sharing its storage); `x` itself when it is not one."""
    if not is_dtensor(x):
        return x
    return x._local_tensor if hasattr(x, "_local_tensor") else x.to_local()


def local_region(x, where: str = "tensor") -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(offsets, sizes) of this rank's local shard of DTensor `x` in the global tensor."""
    mesh = x.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"{where}: this rank is not in the DTensor's device mesh")
    off, size = shard_region(tuple(x.shape), tuple(mesh.shape), coord, tuple(x.placements), where)
    if tuple(local_tensor(x).shape) != size:
        raise ValueError(f"{where}: local shard of shape {tuple(local_tensor(x).shape)} where placements "
                         f"{tuple(x.placements)} put {size}")
    return off, size


def _same_layout(x, ref, name: str, ref_name: str) -> None:
    if x.device_mesh != ref.device_mesh:
        raise ValueError(f"{name}: on another device mesh than {ref_name}")
    if tuple(x.placements) != tuple(ref.placements):
        raise ValueError(f"{name}: placements {tuple(x.placements)} differ from {ref_name}'s "
                         f"{tuple(ref.placements)} (redistribute one, or pass a full tensor)")


def _localize(x, ref, region, name: str, ref_name: str) -> torch.Tensor:
    """`x` restricted to the local shard of `ref`: a DTensor laid out like `ref` gives its local tensor; a plain
    tensor of the global shape gives the view of that rectangle (nothing is read)."""
    if is_dtensor(x):
        _same_layout(x, ref, name, ref_name)
        return local_tensor(x)
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name}: shape {tuple(x.shape)} differs from {ref_name}'s {tuple(ref.shape)}")
    for d, (o, n) in enumerate(zip(*region)):
        x = x.narrow(d, o, n)
    return x


def _reduce_groups(x) -> list:
    """The process groups over which per-unit partial results of DTensor `x` are reduced: one per mesh dimension
    that shards it (none when every placement is Replicate: every rank already holds everything)."""
    import torch.distributed as dist
    mesh = x.device_mesh
    shape = tuple(mesh.shape)
    dims = [i for i, p in enumerate(x.placements) if _is_shard(p) and shape[i] > 1]
    if not dims:
        return []
    if len(dims) == 1:
        return [mesh.get_group(dims[0])]
    busy = [i for i, s in enumerate(shape) if s > 1]
    if dims == busy and mesh.size() == dist.get_world_size():  # sharded along every dim of the whole world
        return [dist.group.WORLD]
    return [mesh.get_group(i) for i in dims]


def _all_reduce(t: torch.Tensor, op: str, groups) -> torch.Tensor:
    import torch.distributed as dist
    rop = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for g in groups:
        dist.all_reduce(t, op=rop, group=g)
    return t


def reduce_partial(t: torch.Tensor, like, op: str = "sum") -> torch.Tensor:
    """All-reduce (in place, SUM or MAX) a per-rank partial result `t` computed from the local shard of DTensor
    `like`, over the mesh dimensions that shard `like`; returns `t`. A no-op for a plain or replicated `like`."""
    if not is_dtensor(like):
        return t
    return _all_reduce(t, op, _reduce_groups(like))


def _pieces(o: int, n: int, block: int) -> List[Tuple[int, int, int, int, int]]:
    """How the local index range [o, o+n) along the unit axis splits into units of `block`: (local start, length,
    first global unit, units, block of the call) for the partial unit at the start, the whole units, and the partial
    unit at the end (a partial unit is one unit whose block is the part this rank holds)."""
    out = []
    end = o + n
    pos = o
    if pos % block and pos < end:
        h = min(block - pos % block, end - pos)
        out.append((0, h, pos // block, 1, h))
        pos += h
    whole = (end - pos) // block
    if whole:
        out.append((pos - o, whole * block, pos // block, whole, block))
        pos += whole * block
    if pos < end:
        out.append((pos - o, end - pos, pos // block, 1, end - pos))
    return out


def _resolve(ops, backend, device):
    return ops.resolve_backend(backend, device)


# ---------------------------------------------------------------------------------------------------------------
# the four ops on DTensors


def _local_grams(ops, locals_, o: int, n: int, axis: int, block: int, mode: str, uniq: Optional[torch.Tensor],
                 n_units: int, m: int, atol: float, rtol: float, backend: Optional[str], device):
    """Per-rank partial unit_gram results for the global units `uniq` (all units when None), from the local tensors
    covering [o, o+n) along `axis`: gram and abs_sum in float64, abs_max float32, counts int64; zero for units this
    rank does not hold."""
    rows_total = n_units if uniq is None else uniq.numel()
    gram = torch.zeros(rows_total, m, m, dtype=torch.float64, device=device)
    abs_sum = torch.zeros(rows_total, m, dtype=torch.float64, device=device)
    abs_max = torch.zeros(rows_total, m, dtype=torch.float32, device=device)
    counts = torch.zeros(2, rows_total, m, dtype=torch.int64, device=device)
    for ls, ln, u0, cnt, blk in _pieces(o, n, block):
        if uniq is None:
            rows, ids = torch.arange(u0, u0 + cnt, device=device), None
        else:
            hit = (uniq >= u0) & (uniq < u0 + cnt)
            rows = hit.nonzero().reshape(-1)
            if rows.numel() == 0:
                continue
            ids = uniq[rows] - u0
        sub = [w.narrow(axis, ls, ln) for w in locals_]
        r = ops.unit_gram(sub, axis=axis, block=blk, mode=mode, index=ids, atol=atol, rtol=rtol, backend=backend)
        gram[rows] = r.gram.double()
        abs_sum[rows] = r.abs_sum.double()
        abs_max[rows] = r.abs_max
        counts[0, rows] = r.zeros
        counts[1, rows] = r.near_zeros
    return gram, abs_sum, abs_max, counts


def _check_index(ops, index, n_units: int, device) -> torch.Tensor:
    """Unit ids as an int64 tensor on `device`, range-checked on the host with the single-process op's rules."""
    return ops._check_index_values(ops._host_index(index, "index"), n_units).to(device)


def unit_gram(ws, *, axis: int = 0, block: int = 1, mode: str = "consecutive", index=None, atol: float = 0.0,
              rtol: float = 0.0, backend: Optional[str] = None):
    """:func:`lpt_kernels.unit_gram` of DTensors (``ws`` all laid out like the first DTensor among them; plain tensors
    of the global shape are read at that layout's local rectangle). Returns the full :class:`~lpt_kernels.UnitGram`
    on every rank: three all-reduces (float64 sums, int64 counts, float32 maxima) over the sharding mesh
    dimensions."""
    from lpt_kernels import ops
    if not 1 <= len(ws) <= ops.MAX_INPUTS:
        raise ValueError(f"ws: expected 1 to {ops.MAX_INPUTS} tensors, got {len(ws)}")
    for i, w in enumerate(ws):
        ops._check_tensor(w, f"ws[{i}]")
    k_ref = next(i for i, w in enumerate(ws) if is_dtensor(w))
    ref = ws[k_ref]
    shape = tuple(ref.shape)
    if mode not in ops.MODES:
        raise ValueError(f"mode: expected one of {', '.join(ops.MODES)}, got {mode!r}")
    if ops._num_deltas(mode, len(ws)) < 1:
        raise ValueError(f"ws: mode {mode!r} needs at least 2 tensors")
    n_units = ops._check_axis_block(shape, axis, block, "inputs")
    atol = ops._check_float(atol, "atol", 0.0)
    rtol = ops._check_float(rtol, "rtol", 0.0)
    region = local_region(ref, f"ws[{k_ref}]")
    locals_ = [_localize(w, ref, region, f"ws[{i}]", f"ws[{k_ref}]") for i, w in enumerate(ws)]
    device = locals_[0].device
    for i, w in enumerate(locals_[1:], 1):
        if w.device != device:
            raise ValueError(f"ws[{i}]: on {w.device}, but ws[0] is on {device}")
    _resolve(ops, backend, device)
    idx = None if index is None else _check_index(ops, index, n_units, device)
    uniq, inverse = (None, None) if idx is None else torch.unique(idx, return_inverse=True)
    m = ops._num_deltas(mode, len(ws))
    gram, abs_sum, abs_max, counts = _local_grams(ops, locals_, region[0][axis], region[1][axis], axis, block, mode,
                                                  uniq, n_units, m, atol, rtol, backend, device)
    groups = _reduce_groups(ref)
    if groups:
        sums = _all_reduce(torch.cat([gram.reshape(-1), abs_sum.reshape(-1)]), "sum", groups)
        gram = sums[:gram.numel()].view(gram.shape)
        abs_sum = sums[gram.numel():].view(abs_sum.shape)
        _all_reduce(counts, "sum", groups)
        _all_reduce(abs_max, "max", groups)
    out = (gram.float(), abs_sum.float(), abs_max, counts[0], counts[1])
    if inverse is not None:
        out = tuple(t[inverse] for t in out)
    return ops.UnitGram(*(t.contiguous() for t in out))


def masked_cosine(u, v, index, *, axis: int = 0, block: int = 1, backend: Optional[str] = None):
    """:func:`lpt_kernels.masked_cosine` of DTensor updates (or ``(before, after)`` pairs of them): one float64
    all-reduce of the per-unit ``<u, v>``, ``|u|^2``, ``|v|^2`` partials. Returns ``(pooled, per_unit)`` on every
    rank."""
    from lpt_kernels import ops

    def parts(x, name):
        if isinstance(x, torch.Tensor):
            ops._check_tensor(x, name)
            return [x]
        if isinstance(x, (tuple, list)) and len(x) == 2:
            ops._check_tensor(x[0], f"{name}[0]")
            ops._check_tensor(x[1], f"{name}[1]")
            return [x[0], x[1]]
        raise TypeError(f"{name}: expected a tensor or a (before, after) pair of tensors")

    pu, pv = parts(u, "u"), parts(v, "v")
    named = [(t, f"u[{i}]" if len(pu) == 2 else "u") for i, t in enumerate(pu)] + \
            [(t, f"v[{i}]" if len(pv) == 2 else "v") for i, t in enumerate(pv)]
    ref, ref_name = next((t, nm) for t, nm in named if is_dtensor(t))
    shape = tuple(ref.shape)
    for t, nm in named:
        if tuple(t.shape) != shape:
            raise ValueError(f"{nm}: shape {tuple(t.shape)} differs from {ref_name}'s {shape}")
    n_units = ops._check_axis_block(shape, axis, block, "updates")
    if index is None:
        raise ValueError("index: masked_cosine needs the unit ids to restrict to")
    region = local_region(ref, ref_name)
    loc = {id(t): _localize(t, ref, region, nm, ref_name) for t, nm in named}
    lu, lv = [loc[id(t)] for t in pu], [loc[id(t)] for t in pv]
    device = lu[0].device
    # the same composition as the single-process op, on the local pieces
    if len(lu) != len(lv):
        if len(lu) == 2:
            lu = [lu[1].float() - lu[0].float()]
        else:
            lv = [lv[1].float() - lv[0].float()]
    if len(lu) == 1:
        ws, mode, a, b = [lu[0], lv[0]], "given", 0, 1
    elif pu[1] is pv[0]:
        ws, mode, a, b = [lu[0], lu[1], lv[1]], "consecutive", 0, 1
    else:
        ws, mode, a, b = [lu[0], lu[1], lv[0], lv[1]], "consecutive", 0, 2
    _resolve(ops, backend, device)
    idx = _check_index(ops, index, n_units, device)
    uniq, inverse = torch.unique(idx, return_inverse=True)
    m = ops._num_deltas(mode, len(ws))
    gram = _local_grams(ops, ws, region[0][axis], region[1][axis], axis, block, mode, uniq, n_units, m, 0.0, 0.0,
                        backend, device)[0]
    x = gram[:, [a, a, b], [b, a, b]].contiguous()  # [U, 3]: <u, v>, |u|^2, |v|^2
    _all_reduce(x, "sum", _reduce_groups(ref))
    # the finish of the single-process op: the listed units (duplicates as listed), then their total
    x = x.float().double()[inverse]  # per-unit values as the single-process op has them (float32 Gram entries)
    x = torch.cat([x, x.sum(0, keepdim=True)])
    den = (x[:, 1] * x[:, 2]).sqrt_()
    cos = torch.where(den > 0, x[:, 0] / den, 0.0).to(torch.float32)
    return cos[-1].clone(), cos[:-1].contiguous()


def act_stats_(x, stats: torch.Tensor, *, token_mask=None, threshold: float = 0.0,
               backend: Optional[str] = None) -> torch.Tensor:
    """:func:`lpt_kernels.act_stats_` of a DTensor ``x [..., C]`` (sharded over tokens and/or channels, or
    replicated) into a plain full ``stats [5, C]``: each rank accumulates its local shard into a partial buffer, one
    all-gather of the ``[5, C]`` partials per sharding mesh dimension, then sums (rows tokens, sum|x|, sum x^2,
    active) and maxima (row max|x|) are folded into ``stats``. ``token_mask`` is a DTensor laid out like ``x``'s
    leading dims, or a plain bool tensor of the global leading shape."""
    import torch.distributed as dist

    from lpt_kernels import ops
    if x.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported (expected bfloat16, float16 or float32)")
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension (the channels)")
    if not isinstance(stats, torch.Tensor) or is_dtensor(stats):
        raise TypeError(f"stats: expected a plain torch.Tensor [5, C], got {type(stats).__name__}")
    c = x.shape[-1]
    if stats.dtype != torch.float64:
        raise TypeError(f"stats: expected float64, got {stats.dtype}")
    if tuple(stats.shape) != (len(ops.ACT_STAT_ROWS), c):
        raise ValueError(f"stats: expected shape (5, {c}), got {tuple(stats.shape)}")
    offs, sizes = local_region(x, "x")
    xl = local_tensor(x)
    if stats.device != xl.device:
        raise ValueError(f"stats: on {stats.device}, but x is on {xl.device}")
    mask = None
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            raise TypeError(f"token_mask: expected a torch.Tensor, got {type(token_mask).__name__}")
        if tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"token_mask: expected shape {tuple(x.shape[:-1])}, got {tuple(token_mask.shape)}")
        if is_dtensor(token_mask):
            mask = local_tensor(token_mask)
            if tuple(mask.shape) != tuple(sizes[:-1]):
                raise ValueError("token_mask: its local shard does not match x's (lay it out like x's leading dims)")
        else:
            mask = token_mask
            for d, (o, n) in enumerate(zip(offs[:-1], sizes[:-1])):
                mask = mask.narrow(d, o, n)
    groups = _reduce_groups(x)
    if not groups:  # replicated: every rank holds all of x
        return ops.act_stats_(xl, stats, token_mask=mask, threshold=threshold, backend=backend)
    c0, cn = offs[-1], sizes[-1]
    local = ops.new_act_stats(cn, device=xl.device)
    if xl.numel():
        ops.act_stats_(xl, local, token_mask=mask, threshold=threshold, backend=backend)
    else:
        ops._check_float(threshold, "threshold", float("-inf"))
        ops.resolve_backend(backend, xl.device)
    part = torch.zeros_like(stats)
    part[:, c0:c0 + cn] = local
    for g in groups:
        n = dist.get_world_size(g)
        bufs = [torch.empty_like(part) for _ in range(n)]
        dist.all_gather(bufs, part, group=g)
        allp = torch.stack(bufs)
        part = allp.sum(0)
        part[3] = allp[:, 3].amax(0)
    stats[[0, 1, 2, 4]] += part[[0, 1, 2, 4]]
    torch.maximum(stats[3], part[3], out=stats[3])
    return stats


def _local_ids(ids: torch.Tensor, o: int, n: int) -> torch.Tensor:
    """The element ids in [o, o+n), shifted to the local shard."""
    keep = (ids >= o) & (ids < o + n)
    return ids[keep] - o


def localize_rollback(target, source, axes: Dict[int, torch.Tensor]):
    """For a rollback of the element ids `axes` ({axis: sorted global indices}) of DTensor `target` toward `source`
    (a DTensor laid out like it, a plain tensor of the global shape — e.g. a memory-mapped checkpoint tensor: only
    its local rectangle is ever read — or None): (local target, local source or None, local axes, region)."""
    region = local_region(target, "target")
    tl = local_tensor(target)
    sl = None if source is None else _localize(source, target, region, "source", "target")
    local_axes = {ax: _local_ids(ids.to(torch.int64), region[0][ax], region[1][ax]) for ax, ids in axes.items()}
    return tl, sl, local_axes, region


def rollback_(target, source, index, *, axis: int = 0, block: int = 1, alpha: float = 1.0,
              backend: Optional[str] = None):
    """:func:`lpt_kernels.rollback_` into DTensor ``target``, in place on its local shards: the listed units' indices
    that fall in this rank's shard are moved toward the same coordinates of ``source`` (a DTensor laid out like
    ``target``, or a plain tensor of the global shape — e.g. a memory-mapped checkpoint tensor, of which each rank
    reads only its shard's slice of the listed units). No collective. Returns ``target``."""
    from lpt_kernels import ops
    if not is_dtensor(target):
        raise TypeError("source: a DTensor source needs a DTensor target (laid out alike); for a plain target pass "
                        "source.full_tensor()")
    ops._check_tensor(target, "target")
    ops._check_tensor(source, "source")
    if tuple(source.shape) != tuple(target.shape):
        raise ValueError(f"source: shape {tuple(source.shape)} differs from target's {tuple(target.shape)}")
    n_units = ops._check_axis_block(tuple(target.shape), axis, block, "target")
    alpha = ops._check_float(alpha, "alpha", 0.0, 1.0)
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError("target: requires grad; call rollback_ under torch.no_grad()")
    tl = local_tensor(target)
    ops.resolve_backend(backend, tl.device)
    idx = torch.unique(_check_index(ops, index, n_units, torch.device("cpu")))
    ids = (idx[:, None] * block + torch.arange(block)).reshape(-1) if block > 1 else idx
    tl, sl, axes, region = localize_rollback(target, source, {axis: ids})
    o, n = region[0][axis], region[1][axis]
    if o % block == 0 and n % block == 0:  # whole units only on this rank: keep the unit ids and block
        local = _local_ids(idx, o // block, n // block)
        ops.rollback_(tl, sl, local, axis=axis, block=block, alpha=alpha, backend=backend)
    else:  # a unit split across the boundary: this rank's part of it, index by index
        ops.rollback_(tl, sl, axes[axis], axis=axis, block=1, alpha=alpha, backend=backend)
    return target


# ---------------------------------------------------------------------------------------------------------------
# sharded models (FSDP2's fully_shard): parameters are DTensors, each rank sees its own batches


def settle(module: torch.nn.Module) -> torch.nn.Module:
    """Register the sharded parameters of every FSDP2 module of `module` (``FSDPModule.reshard``): after a forward
    without backward (under ``torch.no_grad``, e.g. collecting activations) FSDP2 leaves the root's parameters
    unsharded — plain full tensors that a later reshard discards — and ``named_parameters()`` would list those.
    Reading or writing parameters outside forward/backward starts here. A no-op for other models."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return module
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return module


def sharded_mesh(module: torch.nn.Module):
    """The device mesh of a model's DTensor parameters (FSDP2's ``fully_shard``), or None for a model with none."""
    settle(module)
    for p in module.parameters():
        if is_dtensor(p):
            return p.device_mesh
    return None


def _mesh_groups(mesh) -> list:
    """Groups spanning every rank of `mesh` (the data-parallel ranks of an FSDP model): the default group when the
    mesh is the whole world, else one per mesh dimension (reduced one after the other)."""
    import torch.distributed as dist
    if mesh is None:
        return []
    if mesh.size() == dist.get_world_size():
        return [dist.group.WORLD] if mesh.size() > 1 else []
    return [mesh.get_group(i) for i, s in enumerate(mesh.shape) if s > 1]


def reduce_over_mesh(sums: Optional[torch.Tensor], maxima: Optional[torch.Tensor], mesh) -> None:
    """All-reduce in place, over every rank of `mesh`, per-rank partial results of data each rank saw on its own
    (its batches): `sums` with SUM, `maxima` with MAX (either may be None); one collective each."""
    groups = _mesh_groups(mesh)
    if sums is not None:
        _all_reduce(sums, "sum", groups)
    if maxima is not None:
        _all_reduce(maxima, "max", groups)


def mesh_size(mesh) -> int:
    """Ranks in `mesh` (1 for None)."""
    return 1 if mesh is None else int(mesh.size())


def as_2d(x):
    """A DTensor as the 2-D DTensor the kernels take, with its local shard as a view (no communication): a 1-D tensor
    becomes one row (``Shard(0)`` -> ``Shard(1)``), a tensor of more dims ``[d0, rest]`` when it is not sharded past
    dim 0. Plain tensors are returned as they are."""
    if not is_dtensor(x) or x.dim() == 2:
        return x
    local = local_tensor(x)
    shape = tuple(x.shape)
    if x.dim() == 0:
        new_shape, lview, dmap = (1, 1), local.reshape(1, 1), {}
    elif x.dim() == 1:
        new_shape, lview, dmap = (1, shape[0]), local.reshape(1, -1), {0: 1}
    else:
        rest = 1
        for s in shape[1:]:
            rest *= s
        new_shape, lview, dmap = (shape[0], rest), local.reshape(local.shape[0], -1), {0: 0}
    placements = []
    for p in x.placements:
        if _is_shard(p):
            d = p.dim % x.dim()
            if d not in dmap:
                raise ValueError(f"a DTensor of shape {shape} sharded on dim {d} has no 2-D view with a local shard")
            placements.append(type(p)(dmap[d]))
        else:
            placements.append(p)
    DTensor = _dtensor_module().DTensor
    return DTensor.from_local(lview, x.device_mesh, placements, run_check=False, shape=new_shape,
                              stride=(new_shape[1], 1))


def count_nonfinite(x) -> int:
    """Non-finite elements of `x` (a DTensor: over every rank's shard, one all-reduce; call it on every rank)."""
    if not is_dtensor(x):
        return int((~torch.isfinite(x)).sum())
    c = (~torch.isfinite(local_tensor(x))).sum().to(torch.int64).reshape(1)
    return int(reduce_partial(c, x)[0])


def like(local: torch.Tensor, ref) -> torch.Tensor:
    """A DTensor of `ref`'s mesh, placements and global shape whose local shard is `local` (no communication)."""
    DTensor = _dtensor_module().DTensor
    return DTensor.from_local(local, ref.device_mesh, tuple(ref.placements), run_check=False, shape=ref.shape,
                              stride=ref.stride())
