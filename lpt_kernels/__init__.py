"""lpt_kernels: fused, memory-bound kernels for studying cross-domain interference in multi-domain RL post-training.

The tensor-level API (docs/kernels.md; the architecture in docs/architecture.md):

- :func:`unit_gram` — per-unit Gram matrix, abs sum/max and (near-)zero counts of K-1 (or K) deltas, one pass;
- :func:`masked_cosine` — cosine of two updates restricted to listed units, pooled and per unit;
- :func:`act_stats_` — in-place accumulation of per-channel activation statistics (no host sync);
- :func:`rollback_` — in-place sparse rollback of listed units toward a source.

Each runs on CPU (C++/OpenMP) or CUDA (Triton, or the optional CUDA extension), picked per call by ``backend=``,
the ``LPT_BACKEND`` environment variable, or the device of the inputs.
"""
from lpt_kernels.ops import (ACT_STAT_ROWS, UnitGram, act_stats_, available_backends, masked_cosine, new_act_stats,
                             resolve_backend, rollback_, unit_gram)

__version__ = "0.1.0"
__all__ = ["unit_gram", "masked_cosine", "act_stats_", "rollback_", "new_act_stats", "UnitGram", "ACT_STAT_ROWS",
           "available_backends", "resolve_backend", "__version__"]
