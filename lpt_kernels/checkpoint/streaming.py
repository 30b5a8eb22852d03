"""Reading several checkpoints together: :func:`align` checks that they hold the same tensors with the same shapes;
:func:`stream` walks a list of tensor names over K checkpoints in lockstep while a background thread asks the kernel to
read ahead (``POSIX_FADV_WILLNEED``, the kernel path of ``madvise(MADV_WILLNEED)`` on a file mapping, without holding
the GIL) so that disk reads overlap the compute of the caller.
"""
from __future__ import annotations

import collections
import itertools
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from lpt_kernels.checkpoint.base import Checkpoint, CheckpointError, _dtype_name, _fmt_shape
from lpt_kernels.checkpoint.quantized import FP8_BLOCK

_PAGE = mmap.PAGESIZE
_HAS_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED")


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def looks_cached(fd: int, start: int, end: int, samples: int = 8) -> bool:
    """Whether `samples` bytes spread over [start, end) of a file are all in the page cache: a one-byte preadv with
    RWF_NOWAIT fails rather than wait for the disk. Lets read-ahead threads skip a warm cache, where their advice
    only costs CPU the kernels need; a wrong guess costs only the advice (faults still read ahead)."""
    if _RWF_NOWAIT is None or end <= start:
        return False
    buf = bytearray(1)
    for i in range(samples):
        off = start + (end - 1 - start) * i // max(samples - 1, 1)
        try:
            if os.preadv(fd, [buf], off, _RWF_NOWAIT) != 1:
                return False
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: cannot tell
            return False
    return True


def _advise(fh, mm: mmap.mmap, start: int, end: int, advice: int, chunk: int, stop=None) -> None:
    """Advice over bytes [start, end) of one file, page-aligned, in chunks of `chunk` bytes; stops early when
    `stop()` turns true. MADV_WILLNEED goes through posix_fadvise(POSIX_FADV_WILLNEED) on the file where the platform
    has it: the kernel does the same thing for both (madvise on a file mapping calls the fadvise code), but Python's
    mmap.madvise keeps the GIL while the kernel queues the reads (milliseconds per call on a cold disk) and
    os.posix_fadvise releases it, so the consumer's thread never waits for the read-ahead thread. Other advice
    (MADV_COLD) is about the mapping's pages and goes through mmap.madvise. (Module-level so tests can observe it.)"""
    s = start - start % _PAGE
    fadvise = advice == getattr(mmap, "MADV_WILLNEED", None) and _HAS_FADVISE and fh is not None
    while s < end:
        if stop is not None and stop():
            return
        n = min(chunk, end - s)
        if fadvise:
            os.posix_fadvise(fh.fileno(), s, n, os.POSIX_FADV_WILLNEED)
        else:
            mm.madvise(advice, s, n)
        s += n


# ---------------------------------------------------------------------------------------------------------------
# alignment of several checkpoints

@dataclass
class Alignment:
    names: List[str]                                       # common tensors, in file order of the first checkpoint
    skipped: Dict[str, str] = field(default_factory=dict)  # name -> reason (only with intersect=True)
    mixed_dtypes: List[str] = field(default_factory=list)  # names whose (float) dtype differs between checkpoints
    tied_heads: Dict[str, str] = field(default_factory=dict)  # a tied lm_head stored by some checkpoints only


def _is_head(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


def tied_head_absence(ckpts: Sequence[Checkpoint], name: str) -> Optional[str]:
    """The one rule for a tied output embedding stored by only some checkpoints (``save_pretrained`` drops a tied
    ``lm_head.weight``, other writers keep it): when every checkpoint lacking `name` (an ``lm_head.weight``)
    declares ``tie_word_embeddings`` in its config.json and stores an ``embed_tokens.weight``, its head *is* that
    embedding, and the missing tensor is not a difference. Returns the reason (for the record), or None when the
    rule does not apply."""
    if not _is_head(name):
        return None
    lacking = [c for c in ckpts if name not in c]
    if not lacking or len(lacking) == len(ckpts):
        return None
    for c in lacking:
        if not bool((c.config or {}).get("tie_word_embeddings")) or not any(
                n.endswith("embed_tokens.weight") for n in c.names):
            return None
    return (f"a tied output embedding stored only by {', '.join(c.path for c in ckpts if name in c)} (the others "
            f"tie it to their embed_tokens.weight): left out; the embedding is compared")


def align(ckpts: Sequence[Checkpoint], intersect: bool = False) -> Alignment:
    """The tensors that every checkpoint holds with the same shape.

    Without `intersect` any difference (a tensor missing from some checkpoint, a shape difference, a dtype difference
    other than between floating-point formats) raises :class:`CheckpointError` listing the first few. With it, those
    tensors are left out and reported in `skipped`. Floating-point dtypes may differ (bf16 vs fp32 master weights):
    such tensors are kept and listed in `mixed_dtypes`.
    """
    ckpts = list(ckpts)
    if not ckpts:
        raise CheckpointError("align: no checkpoints given")
    order: List[str] = list(ckpts[0].weight_names)
    seen = set(order)
    for c in ckpts[1:]:
        for n in c.weight_names:
            if n not in seen:
                seen.add(n)
                order.append(n)
    common, mixed, problems, tied = [], [], {}, {}
    for n in order:
        missing = [c.path for c in ckpts if n not in c]
        if missing:
            reason = tied_head_absence(ckpts, n)
            if reason is not None:
                tied[n] = reason
            else:
                problems[n] = f"missing from {', '.join(missing)}"
            continue
        infos = [c.info(n) for c in ckpts]
        ref = infos[0]
        reason = None
        for c, i in zip(ckpts[1:], infos[1:]):
            if i.shape != ref.shape:
                reason = (f"shape {_fmt_shape(ref.shape)} in {ckpts[0].path} but {_fmt_shape(i.shape)} "
                          f"in {c.path}")
                break
        if reason is None:
            dts = [i.dtype for i in infos]
            if any(d != dts[0] for d in dts):
                if all(d is not None and d.is_floating_point for d in dts):
                    mixed.append(n)
                else:
                    c, i = next((c, i) for c, i in zip(ckpts[1:], infos[1:]) if i.dtype != ref.dtype)
                    reason = (f"dtype {_dtype_name(ref.dtype)} in {ckpts[0].path} but {_dtype_name(i.dtype)} "
                              f"in {c.path}")
        if reason is not None:
            problems[n] = reason
            continue
        common.append(n)
    if problems and not intersect:
        shown = [f"{n!r} {r}" for n, r in list(problems.items())[:3]]
        more = len(problems) - len(shown)
        msg = "checkpoints differ: " + "; ".join(shown)
        if more:
            msg += f"; ... ({more} more)"
        if common:
            msg += f"; use --intersect to analyse the {len(common)} common tensors"
        else:
            msg += " — they have no tensor in common (not checkpoints of one model?)"
        raise CheckpointError(msg)
    if intersect and not common:
        raise CheckpointError(f"checkpoints have no tensor in common ({len(problems)} differ, e.g. "
                              f"{next(iter(problems))!r} {next(iter(problems.values()))}): nothing to analyse")
    return Alignment(names=common, skipped=problems if intersect else {}, mixed_dtypes=mixed, tied_heads=tied)


# ---------------------------------------------------------------------------------------------------------------
# streaming

class _Prefetcher(threading.Thread):
    """Issues MADV_WILLNEED on the byte ranges of the tensors after the one being consumed — always the next one, then
    the following ones while the bytes advised ahead stay within `budget` — and MADV_COLD on the consumed ranges it
    advised (a non-destructive hint: those pages are reclaimed first, before the ones read ahead).

    A range whose probe finds it cached gets no advice and takes nothing from the budget, so on a warm page cache the
    thread probes every tensor once, early, and ends. The consumer's :meth:`advance` wakes the thread only while it
    waits: a wake-up per tensor would cost the consumer GIL hand-offs (about 0.2 ms a tensor, 5% of a warm
    `lpt diff`)."""

    def __init__(self, jobs, budget):
        super().__init__(name="lpt-checkpoint-prefetch", daemon=True)
        self.jobs = jobs          # per tensor: [(file object, mmap, start, end, chunk)] over checkpoints
        self.budget = budget
        self.cur = -1             # index of the tensor the consumer holds
        self.stopped = False
        self.waiting = False
        self.cond = threading.Condition()
        self.cold_ok = hasattr(mmap, "MADV_COLD")
        self.nxt = 0              # next tensor to probe
        self.pending = None       # (tensor, its uncached ranges, their bytes): probed, waiting for room in the budget
        self.advised = collections.deque()  # (tensor, ranges advised, bytes), in tensor order, not yet cooled
        self.ahead = 0            # bytes in self.advised

    def advance(self, k: int) -> None:
        with self.cond:
            self.cur = k
            if self.waiting:
                self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)

    def _fits(self, k: int, nbytes: int, cur: int) -> bool:
        held = sum(b for t, _, b in itertools.takewhile(lambda a: a[0] <= cur, self.advised))  # consumed already
        return k <= cur + 1 or self.ahead - held + nbytes <= self.budget

    def _work(self, cur: int) -> bool:
        """Whether there is something to do now: a consumed tensor to cool, a tensor to probe, or a probed one that
        fits the budget now."""
        if self.advised and self.advised[0][0] < cur:
            return True
        if self.pending is not None:
            k, _, nbytes = self.pending
            return k <= cur or self._fits(k, nbytes, cur)
        return max(self.nxt, cur) < len(self.jobs)

    def run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.stopped and not self._work(self.cur):
                        if self.nxt >= len(self.jobs) and self.pending is None and not self.advised:
                            return  # every tensor probed, nothing left to cool: advance() is a flag check now
                        self.waiting = True
                        self.cond.wait()
                        self.waiting = False
                    if self.stopped:
                        return
                    cur = self.cur
                while self.advised and self.advised[0][0] < cur:  # consumed tensors: their pages go first
                    _, ranges, nbytes = self.advised.popleft()
                    self.ahead -= nbytes
                    if self.cold_ok:
                        for fh, mm, s, e, chunk in ranges:
                            try:
                                _advise(fh, mm, s, e, mmap.MADV_COLD, max(chunk, e - s))
                            except OSError:
                                self.cold_ok = False
                                break
                if self.pending is None:
                    k = self.nxt = max(self.nxt, cur)
                    if k >= len(self.jobs):
                        continue
                    self.nxt = k + 1
                    ranges = [j for j in self.jobs[k] if j[0] is None or not looks_cached(j[0].fileno(), j[2], j[3])]
                    if not ranges:
                        continue  # cached: no advice, no budget
                    self.pending = (k, ranges, sum(e - s for _, _, s, e, _ in ranges))
                k, ranges, nbytes = self.pending
                if k < cur:  # the consumer passed it while it waited
                    self.pending = None
                    continue
                if not self._fits(k, nbytes, cur):
                    continue  # wait for the consumer to free the budget
                self.pending = None
                stale = lambda k=k: self.stopped or self.cur > k  # noqa: E731
                for fh, mm, s, e, chunk in ranges:
                    _advise(fh, mm, s, e, mmap.MADV_WILLNEED, chunk, stale)
                self.advised.append((k, ranges, nbytes))
                self.ahead += nbytes
        except (ValueError, OSError):
            return  # a mapping was closed under us, or the kernel refused: read-ahead is only advice


def stream(ckpts: Sequence[Checkpoint], names: Sequence[str], prefetch_bytes: int = 256 << 20,
           progress: Optional[Callable[[int], object]] = None) -> Iterator[Tuple[str, List[torch.Tensor]]]:
    """Yield ``(name, [tensor from each checkpoint])`` for every name, in the order of `names`.

    The tensors are zero-copy views of the mappings (see :meth:`Checkpoint.tensor`): resident anonymous memory does
    not grow with the checkpoints; a block-scaled FP8 weight comes dequantized instead (:meth:`Checkpoint.weight`, a
    float32 copy of that one tensor). A background thread asks the kernel to read ahead the byte ranges of the
    upcoming tensors that are not in the page cache, about `prefetch_bytes` ahead (summed over checkpoints; at least
    the next tensor; 0 disables it), so that disk reads overlap the caller's compute. `progress`, if given, is called
    after each tensor with the number of bytes just processed (summed over checkpoints) — e.g. ``tqdm(...).update``.
    """
    ckpts = list(ckpts)
    names = list(names)
    if not ckpts:
        raise CheckpointError("stream: no checkpoints given")
    for n in names:
        for c in ckpts:
            if n not in c:
                raise CheckpointError(f"stream: tensor {n!r} missing from {c.path}")
    return _stream(ckpts, names, prefetch_bytes, progress)


def _stream(ckpts, names, prefetch_bytes, progress):
    sizes = [sum(c.info(n).end - c.info(n).start for c in ckpts) for n in names]
    pre = None
    if prefetch_bytes and prefetch_bytes > 0 and hasattr(mmap, "MADV_WILLNEED") and names:
        jobs = []
        for n in names:
            row = []
            for c in ckpts:
                i = c.info(n)
                mm = c._mapping(i.file)
                if mm is not None and i.end > i.start:
                    row.append((c._handle(i.file), mm, i.start, i.end, c._chunk(i.file)))
            jobs.append(row)
        pre = _Prefetcher(jobs, int(prefetch_bytes))
        pre.start()
    try:
        for k, n in enumerate(names):
            if pre is not None:
                pre.advance(k)
            yield n, [c.weight(n) if c.kind(n) == FP8_BLOCK else c.tensor(n) for c in ckpts]
            if progress is not None:
                progress(sizes[k])
    finally:
        if pre is not None:
            pre.stop()
