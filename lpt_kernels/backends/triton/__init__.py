"""Triton backend: the three kernel entry points of ``lpt_kernels.backends`` (see its docstring for the contract).

Default on CUDA tensors; on CPU tensors it runs only under ``TRITON_INTERPRET=1`` (set before triton is imported), which
is how the tests exercise it. One module per kernel family, each holding its jit kernels and the host function that
picks block sizes and the grid. Importing this package raises ImportError when triton is missing.
"""
from .act_stats import act_stats_
from .rollback import rollback_
from .unit_gram import unit_gram

__all__ = ["unit_gram", "act_stats_", "rollback_"]
