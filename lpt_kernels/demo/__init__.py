"""`lpt demo`: the paper's interference, analyses and both recoveries, end to end on a tiny Qwen3 trained on the CPU.

Modules, by concept: :mod:`.domains` (vocabulary, tokenizer, the four synthetic domains and their checkers),
:mod:`.model` (the tiny Qwen3, batched decoding, evaluation), :mod:`.training` (warm-up and GRPO),
:mod:`.analyses` and :mod:`.interventions` (the package's public API, as a user would call it on their own
checkpoints), :mod:`.report` (tables, figures, report.html) and :mod:`.run` (the orchestration).
"""
from lpt_kernels.demo.run import FAST, FULL, DemoConfig, DemoError, run_demo

__all__ = ["run_demo", "DemoConfig", "DemoError", "FULL", "FAST"]
