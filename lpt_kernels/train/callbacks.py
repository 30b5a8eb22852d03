"""A transformers ``TrainerCallback`` that measures after each optimizer step and logs through the trainer's logging
(so every reporting integration — TensorBoard, W&B, the console — and ``trainer.state.log_history`` get the numbers).
TRL's trainers (GRPOTrainer, PPO, SFT, ...) are ``Trainer`` subclasses: the same callback works there.

Where the events fall in ``Trainer``'s loop: ``optimizer.step()`` -> ``on_optimizer_step`` (the tracker measures
here, the parameters just updated) -> scheduler, ``zero_grad``, ``global_step += 1`` -> ``on_step_end`` (a measured
step asks the trainer to log at this step) -> the trainer builds its logs (loss, learning rate, ...) and calls
``on_log``: the callback adds its metrics to that dict before the reporting callbacks see it, and to the
``log_history`` entry of the step.
"""
from __future__ import annotations

from typing import Dict, Optional

from transformers import TrainerCallback

from lpt_kernels.train._model import TrainError


class LptCallback(TrainerCallback):
    """Runs ``tracker.step()`` and ``monitor.step()`` after each optimizer step and logs their metrics at that step.

    Add it with :func:`attach` (``trainer.add_callback`` would place it after the reporting callbacks, which would
    then not see the metrics; training refuses to start with a one-line error in that case). ``domain``: if given,
    ``tracker.start_domain(domain)`` is called when training begins (unless that domain is already the current one),
    so one ``Trainer`` per domain needs no other call. A measured step makes the trainer log at that step (its usual
    loss average covers fewer steps then): choose ``every`` as a multiple of ``logging_steps`` to avoid extra lines.
    """

    def __init__(self, tracker=None, monitor=None, domain: Optional[str] = None):
        if tracker is None and monitor is None:
            raise TrainError("LptCallback: give a tracker, a monitor or both")
        if domain is not None and tracker is None:
            raise TrainError("LptCallback: domain= needs a tracker")
        self.tracker, self.monitor, self.domain = tracker, monitor, domain
        self.latest: Dict[str, float] = {}     # the metrics of the last measured step
        self._pending: Dict[str, float] = {}
        self._attached = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._attached:
            raise TrainError("LptCallback: add it with lpt_kernels.train.attach(trainer, ...) so that it logs before "
                             "the reporting callbacks")
        if self.domain is not None and self.tracker.domain != self.domain:
            self.tracker.start_domain(self.domain)

    def on_optimizer_step(self, args, state, control, **kwargs):
        metrics: Dict[str, float] = {}
        if self.tracker is not None:
            metrics.update(self.tracker.step())
        if self.monitor is not None:
            metrics.update(self.monitor.step())
        if metrics:
            self.latest = metrics
            self._pending = dict(metrics)

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)  # the trainer appended this step's entry before on_log
        self._pending = {}


def attach(trainer, tracker=None, monitor=None, domain: Optional[str] = None) -> LptCallback:
    """Add an :class:`LptCallback` to ``trainer`` (a transformers ``Trainer`` or a TRL trainer) ahead of its other
    callbacks, so that the reporting integrations log its metrics; returns the callback (its ``latest`` holds the
    last measured metrics)."""
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not hasattr(handler, "callbacks"):
        raise TrainError(f"attach: {type(trainer).__name__} is not a transformers Trainer (no callback_handler)")
    cb = LptCallback(tracker, monitor, domain)
    cb._attached = True
    handler.callbacks.insert(0, cb)
    return cb


__all__ = ["LptCallback", "attach"]
