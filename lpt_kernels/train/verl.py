"""verl: the tracker after each optimizer step of a verl actor, its metrics in the dict ``update_policy`` returns.

verl's FSDP actor (``verl.workers.actor.dp_actor.DataParallelPPOActor``) updates the policy in ``update_policy``: for
every PPO epoch and mini-batch it runs forward/backward over the micro-batches and then ``self._optimizer_step()``
(gradient clipping, then ``actor_optimizer.step()``, or a skipped step when the gradient norm is not finite); it
collects metrics as lists in a dict (``append_to_dict``) and returns it to the worker (``fsdp_workers.update_actor``),
whose driver reduces every list to its mean (``reduce_metrics``) and logs it with the run's tracking backends. The
measurement belongs right after ``_optimizer_step``; the numbers ride in that returned dict.
"""
from __future__ import annotations

from typing import Dict, List

from lpt_kernels.train._model import TrainError


class VerlHandle:
    """What :func:`track_verl_actor` installed; :meth:`remove` restores the actor's methods."""

    def __init__(self, actor, originals: Dict[str, object]):
        self.actor, self._originals = actor, originals
        self.latest: Dict[str, float] = {}   # the metrics of the last measured step

    def remove(self) -> None:
        for name, fn in self._originals.items():
            if fn is None:
                self.actor.__dict__.pop(name, None)
            else:
                setattr(self.actor, name, fn)
        self._originals = {}


def track_verl_actor(actor, tracker=None, monitor=None) -> VerlHandle:
    """Measure after every optimizer step of a verl actor and return the metrics with its own.

    ``actor`` is a ``DataParallelPPOActor`` (anything with ``_optimizer_step()`` and ``update_policy(data)``
    returning a dict of metric lists); ``tracker`` a :class:`~lpt_kernels.train.DeltaTracker` and/or ``monitor`` a
    :class:`~lpt_kernels.train.RefreshMonitor` built on ``actor.actor_module``. After each ``_optimizer_step`` the
    tracker's and the monitor's ``step()`` run; the metrics of the last measured step of an ``update_policy`` call are
    added to the dict it returns, each as a one-element list (verl reduces lists to their mean), so they reach the
    driver's logger beside ``actor/pg_loss``. The tracker's domain is the caller's business: call
    ``tracker.start_domain(name)`` when the data switches domain. Works where the actor's parameters are whole tensors
    (one process, or replicated); FSDP2-sharded (DTensor) parameters come with the distributed support
    (docs/train.md). Only the actor instance is changed (its two methods are wrapped); :meth:`VerlHandle.remove`
    undoes it.
    """
    if tracker is None and monitor is None:
        raise TrainError("track_verl_actor: give a tracker, a monitor or both")
    for attr in ("_optimizer_step", "update_policy"):
        if not callable(getattr(actor, attr, None)):
            raise TrainError(f"track_verl_actor: {type(actor).__name__} has no {attr}() (expected verl's "
                             "DataParallelPPOActor)")
    measurers = [m for m in (tracker, monitor) if m is not None]
    originals = {n: actor.__dict__.get(n) for n in ("_optimizer_step", "update_policy")}
    handle = VerlHandle(actor, originals)
    step_fn, update_fn = actor._optimizer_step, actor.update_policy
    pending: List[Dict[str, float]] = []

    def _optimizer_step(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        metrics: Dict[str, float] = {}
        for m in measurers:
            metrics.update(m.step())
        if metrics:
            handle.latest = metrics
            pending[:] = [metrics]
        return out

    def update_policy(*args, **kwargs):
        pending.clear()
        metrics = update_fn(*args, **kwargs)
        if pending and isinstance(metrics, dict):
            for k, v in pending[0].items():
                metrics[k] = [v]
        pending.clear()
        return metrics

    actor._optimizer_step = _optimizer_step
    actor.update_policy = update_policy
    return handle


__all__ = ["track_verl_actor", "VerlHandle"]
