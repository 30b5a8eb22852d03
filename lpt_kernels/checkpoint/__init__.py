"""Checkpoint I/O: streaming, zero-copy reads of checkpoints on disk, in three formats behind one face.

- :mod:`~lpt_kernels.checkpoint.base` — :class:`Checkpoint` (the face: ``Checkpoint(path)`` opens any of the formats
  below, see :func:`detect_format`), :class:`CheckpointError`, :class:`TensorInfo`, dtype names (every format);
- :mod:`~lpt_kernels.checkpoint.header` — the safetensors header: read, and refused where the format forbids it;
- :mod:`~lpt_kernels.checkpoint.quantized` — block-scaled FP8 weights (read dequantized) and the quantized or
  non-float weights that are refused;
- :mod:`~lpt_kernels.checkpoint.safetensors` — a safetensors file or a Hugging Face directory of shards with an
  index, memory-mapped copy-on-write;
- :mod:`~lpt_kernels.checkpoint.verl` — verl's FSDP checkpoints (``model_world_size_{W}_rank_{r}.pt`` of DTensor
  shards), read in place: tensors are assembled from the ranks' memory-mapped local shards on demand;
- :mod:`~lpt_kernels.checkpoint.dcp` — torch.distributed.checkpoint directories (``.metadata`` and ``*.distcp``), read
  through DCP's own reader, only the pieces asked for;
- :mod:`~lpt_kernels.checkpoint.streaming` — :func:`align` (do K checkpoints hold the same tensors?) and :func:`stream`
  (walk tensors over K checkpoints in lockstep, with read-ahead);
- :mod:`~lpt_kernels.checkpoint.tensor_writer` — :func:`write_safetensors` / :func:`write_state`: one safetensors
  file written tensor by tensor, atomically.

One module per on-disk format; this package depends on torch and the standard library only.
"""
from lpt_kernels.checkpoint.base import DTYPES, Checkpoint, CheckpointError, TensorInfo, detect_format, open_checkpoint
from lpt_kernels.checkpoint.safetensors import SafetensorsCheckpoint
from lpt_kernels.checkpoint.streaming import Alignment, align, looks_cached, stream, tied_head_absence
from lpt_kernels.checkpoint.tensor_writer import write_safetensors, write_state

__all__ = ["CheckpointError", "TensorInfo", "DTYPES", "Checkpoint", "SafetensorsCheckpoint", "open_checkpoint",
           "detect_format", "Alignment", "align", "stream", "looks_cached", "tied_head_absence", "write_safetensors",
           "write_state"]
