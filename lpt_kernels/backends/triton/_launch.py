"""What the Triton kernel families share: the device a launch runs on, and grids sized by measured occupancy.

Triton launches on the *current* CUDA device and its current stream, not on the tensors' device: a hook on a
cuda:1 layer while cuda:0 is current would fail ("Pointer argument cannot be accessed from Triton") or, with peer
access on, run unordered with cuda:1's work. Every launch therefore runs under ``on_device(tensor.device)``.

Grids are whole waves of the programs that fit on the device at once (``fit_split``): a partial last wave leaves SMs
idle while it runs. The fit comes from the compiled kernel itself (its registers, warps and shared memory), read once
per specialisation.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch


def on_device(device: torch.device):
    """Context for a launch on `device` (and its current stream); nothing off CUDA (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fit_split(tiles: int, max_split: int, slots: int) -> int:
    """Parts to split each of `tiles` independent tiles into (at most `max_split`) so that the grid fills `slots`
    resident programs in whole waves: one wave when the tiles are few (slots // tiles parts, >= 90% of the slots);
    otherwise the smallest split up to 32 whose waves are >= 90% used, else the best of those. The same rule as the
    CUDA backend's (csrc/cuda/common.cuh)."""
    max_split = max(1, int(max_split))
    if tiles < 1 or slots < 1:
        return 1
    if tiles * max_split <= slots:
        return max_split  # not even one wave: all the parallelism there is
    if 10 * tiles <= slots:
        return min(max_split, slots // tiles)
    best, best_use = 1, 0.0
    for s in range(1, min(max_split, 32) + 1):
        n = tiles * s
        use = n / (-(-n // slots) * slots)
        if use >= 0.9:
            return s
        if use > best_use:
            best, best_use = s, use
    return best


@functools.lru_cache(maxsize=None)
def _device_limits(index: int):
    p = torch.cuda.get_device_properties(index)
    return (p.multi_processor_count, getattr(p, "regs_per_multiprocessor", 65536),
            getattr(p, "max_threads_per_multi_processor", 2048),
            getattr(p, "shared_memory_per_multiprocessor", 228 * 1024))


def programs_per_sm(n_regs: int, num_warps: int, shared: int, regs_per_sm: int = 65536, threads_per_sm: int = 2048,
                    shared_per_sm: int = 228 * 1024) -> int:
    """Programs (CTAs) of a kernel resident on one SM: the least of the thread, register and shared-memory limits
    (registers are allocated per warp in units of 256, i.e. per thread in units of 8; 1 KiB of shared memory per CTA
    is reserved by the driver)."""
    by_threads = threads_per_sm // (32 * num_warps)
    regs_per_warp = -(-max(int(n_regs), 1) // 8) * 8 * 32
    by_regs = (regs_per_sm // regs_per_warp) // num_warps
    by_shared = shared_per_sm // (shared + 1024) if shared else 32
    return max(1, min(by_threads, by_regs, by_shared, 32))


_resident = {}


def resident_programs(fn, device: torch.device, key, args, kwargs) -> Optional[int]:
    """Programs of the kernel `fn` specialised for (args, kwargs) that fit on `device` at once (SMs x per-SM
    occupancy of the compiled kernel), or None off CUDA. `key` names the specialisation (dtypes, constexprs): the
    kernel is compiled (warmed up) on the first call for it, as the launch would compile it anyway."""
    if device.type != "cuda":
        return None
    k = (fn, device.index, key)
    got = _resident.get(k)
    if got is None:
        kernel = fn.warmup(*args, grid=(1,), **kwargs)
        kernel._init_handles()  # loads the binary: n_regs is known from here on
        sms, regs, threads, shared = _device_limits(device.index)
        got = sms * programs_per_sm(kernel.n_regs, kernel.metadata.num_warps, kernel.metadata.shared, regs, threads,
                                    shared)
        _resident[k] = got
    return got
