"""torch.distributed support: placements, local shards, and the reductions of per-unit partial results.

The one package of lpt_kernels that talks to process groups (ops, hooks, train, checkpoint and the analyses call it):
:mod:`~lpt_kernels.distributed.dtensor` for DTensors and FSDP2 modules, :mod:`~lpt_kernels.distributed.launch` for
runs over several processes. Both are re-exported here (``from lpt_kernels import distributed``).

- **Placements.** A DTensor's local shard is the rectangle ``[offsets, offsets + sizes)`` of the global tensor that
  its ``placements`` give the rank's mesh coordinate: ``Shard(d)`` splits dim d as ``torch.chunk`` does (chunks of
  ceil(n / parts), the last ones smaller or empty — uneven shards), ``Replicate`` keeps it whole
  (:func:`shard_region`, :func:`local_region`).
- **DTensor inputs to the four ops** (:func:`unit_gram`, :func:`masked_cosine`, :func:`act_stats_`,
  :func:`rollback_`; ``lpt_kernels.ops`` hands DTensor arguments here). Each rank runs the op on its local shard with
  the unit ids mapped to local ones — a unit split across a shard boundary (block > 1, uneven shards) is computed in
  its pieces on the ranks that hold them — and the small per-unit partial results, never weights, are reduced across
  the mesh dimensions that shard the tensor: SUM for Grams, sums and counts, MAX for maxima, in float64. A call
  makes at most one collective per result tensor (unit_gram: three for its five results; masked_cosine: one;
  act_stats_: one all-gather) per sharded mesh dimension, none for a replicated tensor. Results are plain tensors
  holding the full per-unit results on every rank, equal to the single-process call. ``rollback_`` needs no
  collective: each rank updates its own local shard from the same slice of the source.
- **Runs over several processes** (``lpt diff`` and ``lpt rollback`` under torchrun): :func:`from_env` joins the
  process group torchrun describes, :func:`partition` balances work items across ranks by bytes, and
  :func:`gather_objects`, :func:`broadcast_object`, :func:`all_ok` exchange the small per-rank results.

Every rank of the mesh must make the same calls in the same order (as with any collective).
"""
from lpt_kernels.distributed.dtensor import *  # noqa: F401,F403
from lpt_kernels.distributed.dtensor import __all__ as _dtensor_all
from lpt_kernels.distributed.dtensor import _pieces  # noqa: F401 -- tested directly
from lpt_kernels.distributed.launch import *  # noqa: F401,F403
from lpt_kernels.distributed.launch import __all__ as _launch_all

__all__ = list(_dtensor_all) + list(_launch_all)
