"""What a training loop imports (docs/train.md): live update measurements and their trainer integrations.

- :class:`DeltaTracker` — per-unit update statistics of the current domain, its overlap and alignment with the
  finished domains' updates, every few optimizer steps, as a flat ``{name: float}`` dict for any logger; and the
  whole run so far as the :class:`~lpt_kernels.analysis.Profile` that ``lpt diff`` gives on saved checkpoints;
- :class:`RefreshMonitor` — during a refresh of an earlier domain, the displacement from its checkpoint on a
  selection's units (the conflict subspace) and on the rest, and from the other domains' checkpoints;
- :class:`LptCallback` / :func:`attach` — a transformers ``TrainerCallback`` (TRL's trainers included) that logs them
  through the trainer's own logging (imported lazily: transformers is needed only for it);
- :func:`track_verl_actor` — the same after each optimizer step of a verl actor.
"""
from lpt_kernels.train._model import TrainError
from lpt_kernels.train.refresh import RefreshMonitor
from lpt_kernels.train.snapshots import Snapshot
from lpt_kernels.train.tracker import MAX_DOMAINS, DeltaTracker
from lpt_kernels.train.verl import track_verl_actor

__all__ = ["DeltaTracker", "RefreshMonitor", "LptCallback", "attach", "track_verl_actor", "Snapshot", "TrainError",
           "MAX_DOMAINS"]


def __getattr__(name):
    if name in ("LptCallback", "attach"):
        from lpt_kernels.train import callbacks
        return getattr(callbacks, name)
    raise AttributeError(f"module 'lpt_kernels.train' has no attribute {name!r}")
