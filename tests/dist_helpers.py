"""Real torch.distributed worlds for the tests: N processes on this host joined over gloo (CPU).

:func:`spawn` starts `world` processes with ``torch.multiprocessing`` (start method ``spawn``), each of which joins
the process group, runs ``fn(rank, world, *args)`` and leaves it; an exception in any rank fails the call with that
rank's traceback. Spawning costs seconds (each process imports torch), so each test groups its checks into one world.
:func:`count_collectives` counts the collectives a block makes (the package calls them through
``torch.distributed``'s module attributes).
"""
import contextlib
import faulthandler
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # `world` processes share the cores
    faulthandler.enable(all_threads=True)  # a fatal signal in a rank prints every thread's Python stack
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that succeeded leaves without the interpreter's teardown. Without this, a world of 2 ranks saving DCP
    # checkpoints died of SIGABRT ("terminate called without an active exception": a C++ thread object destroyed while
    # its thread ran) in one CI run and in 2 of 45 worlds in a loop here; with it, 0 of 100 (and 0 of 160 with only
    # faulthandler on, which is kept: a rank that still dies prints where).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in `world` gloo processes; re-raises the first failure."""
    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True, start_method="spawn")


@contextlib.contextmanager
def count_collectives():
    """``with count_collectives() as n:`` — n["all_reduce"], n["all_gather"], ... count the calls made inside."""
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast", "gather",
             "all_to_all", "gather_object", "all_gather_object", "broadcast_object_list")
    counts = {n: 0 for n in names}
    saved = {n: getattr(dist, n) for n in names}

    def wrap(name, f):
        def g(*a, **k):
            counts[name] += 1
            return f(*a, **k)
        return g

    for n in names:
        setattr(dist, n, wrap(n, saved[n]))
    try:
        yield counts
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


def mesh_cases(world: int):
    """(label, mesh shape, placements builder) for the placements the tests sweep: a 1-D mesh with Shard(0),
    Shard(1), Replicate, and a 2-D mesh (1, world) with (Replicate, Shard(0)) and (Shard(1), Shard(0))."""
    from torch.distributed.tensor import Replicate, Shard
    return [("S0", (world,), (Shard(0),)), ("S1", (world,), (Shard(1),)), ("R", (world,), (Replicate(),)),
            ("2d-R,S0", (1, world), (Replicate(), Shard(0))), ("2d-S1,S0", (1, world), (Shard(1), Shard(0)))]
