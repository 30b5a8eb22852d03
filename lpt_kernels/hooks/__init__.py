"""What a training or evaluation loop imports: activation statistics and gradient Gram matrices (docs/hooks.md).

- :class:`ActivationStats` — a context manager that hooks the input of each layer's ``down_proj`` (the MLP neuron
  activations ``act(gate) * up``) and ``o_proj`` (the attention heads' outputs) of a transformers model and
  accumulates per-channel statistics with :func:`lpt_kernels.act_stats_` into device-resident float64 buffers: no
  host synchronisation in the hooks, no activation kept. Padding tokens are skipped through the attention mask of the
  top-level call, or an explicit token mask. :meth:`ActivationStats.result` folds the channels into units (neurons,
  heads) and returns an :class:`ActivationResult`: per layer and unit mean|a|, RMS, max|a|, activation frequency and
  tokens counted, top units, Jaccard overlaps, save/load with the array naming of profiles
  (``<name>/<group>/<stat>``, ``[layers, units]``).
- :class:`GradientGram` — per-domain sums of the gradients of D domains, kept off the device (CPU RAM or a
  memory-mapped file), and from them the D x D Gram and cosine matrices of every parameter, every module (any prefix
  of the parameter names: a projection, an attention block, a layer) and the whole model, plus per-unit (neuron,
  head) Gram matrices through the layout, each gradient byte read once by :func:`lpt_kernels.unit_gram`
  (:class:`GramResult`, with a heatmap of module x domain-pair cosines).
"""
from lpt_kernels.hooks.activations import ACT_STATS, ActivationResult, ActivationStats, jaccard
from lpt_kernels.hooks.common import HookError
from lpt_kernels.hooks.gradients import GradientGram, GramResult

__all__ = ["ActivationStats", "ActivationResult", "GradientGram", "GramResult", "jaccard", "ACT_STATS",
           "HookError"]
