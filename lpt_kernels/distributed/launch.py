"""Runs over several processes (``lpt diff`` and ``lpt rollback`` under torchrun): :func:`from_env` joins the process
group torchrun describes, :func:`partition` balances work items across ranks by bytes, and :func:`gather_objects`,
:func:`broadcast_object`, :func:`all_ok` and :func:`call_collectively` exchange the small per-rank results and
outcomes, so that a failure on one rank stops every rank instead of leaving the others blocked.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence, Tuple

__all__ = ["world", "launched_by_torchrun", "from_env", "partition", "gather_objects", "broadcast_object", "all_ok",
           "barrier", "call_collectively"]


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or another launcher with its environment) started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ
    except ValueError:
        return False


class from_env:
    """``with from_env() as (rank, world_size):`` join the process group that torchrun's environment describes
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) over gloo — the package's collectives move small CPU
    tensors and objects — and leave it on exit; when a group is already initialised (a caller's), use it and leave
    it alone; outside torchrun, ``(0, 1)`` and nothing happens."""

    def __init__(self, timeout_s: float = 1800.0):
        self.timeout = timedelta(seconds=timeout_s)
        self.owned = False

    def __enter__(self) -> Tuple[int, int]:
        import torch.distributed as dist
        if dist.is_available() and not dist.is_initialized() and launched_by_torchrun():
            dist.init_process_group("gloo", timeout=self.timeout)
            self.owned = True
        return world()

    def __exit__(self, *exc) -> None:
        if self.owned:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.owned = False


def partition(sizes: Sequence[int], parts: int) -> List[List[int]]:
    """Split work items of the given byte sizes into `parts` lists of item indices with balanced byte totals:
    largest first, each to the least loaded part (ties to the lower part), each list then in the items' order."""
    load = [0] * parts
    out: List[List[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        p = min(range(parts), key=lambda r: (load[r], r))
        out[p].append(i)
        load[p] += sizes[i]
    return [sorted(o) for o in out]


def gather_objects(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's `obj` on rank `dst` (a list indexed by rank), None elsewhere; ``[obj]`` outside a group."""
    import torch.distributed as dist
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    import torch.distributed as dist
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ok(error: Optional[BaseException]) -> Optional[str]:
    """Exchange each rank's outcome: None on every rank when none failed, else the first failure's one-line message
    (``rank R: ...``) on every rank — so that all ranks stop together instead of waiting for a peer that raised."""
    import torch.distributed as dist
    rank, size = world()
    msg = None if error is None else (str(error).strip().splitlines()[0] if str(error).strip()
                                      else type(error).__name__)
    if size == 1:
        return msg
    got: List[Optional[str]] = [None] * size
    dist.all_gather_object(got, msg)
    for r, m in enumerate(got):
        if m is not None:
            return f"rank {r}: {m}"
    return None


def barrier() -> None:
    import torch.distributed as dist
    if world()[1] > 1:
        dist.barrier()


def call_collectively(fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; if it raises on any rank, raise on every rank (the failing rank's error there, a
    RuntimeError naming it elsewhere) instead of leaving the others blocked in their next collective."""
    try:
        out = fn()
    except BaseException as e:  # noqa: B902 -- re-raised below, after the others are told
        all_ok(e)
        raise
    msg = all_ok(None)
    if msg is not None:
        raise RuntimeError(msg)
    return out
