"""Quantized checkpoints: block-scaled FP8 is read, every other quantized or non-float weight is refused.

Block-scaled FP8 is the format of the official FP8 releases of Qwen3 (and of DeepSeek-V3): ``config.json`` has
``"quantization_config": {"quant_method": "fp8", "weight_block_size": [bm, bn], ...}``; each quantized 2-D weight
``X.weight`` is stored as ``float8_e4m3fn`` codes beside a float ``X.weight_scale_inv`` of shape
``[ceil(rows / bm), ceil(cols / bn)]``, and the weight is ``code * weight_scale_inv[i // bm, j // bn]`` (the
convention of transformers' ``finegrained_fp8`` integration; a partial block at the edge uses its block's scale).
:func:`dequantize` computes that in float32 (the product of an E4M3 code and a float32 scale, rounded once). The
scales are not weights: they belong to their weight and are never analysed as tensors of their own.

Everything else that is not a plain float weight is refused with a one-line :class:`CheckpointError` naming the
tensor, its dtype and the checkpoint (:func:`classify`): integer or bool packs named like weights (GPTQ/AWQ
``qweight``, bitsandbytes int8/uint8 ``weight``), any tensor of a checkpoint whose ``quantization_config`` names
another method (gptq, awq, bitsandbytes, compressed-tensors, fbgemm_fp8, ...) once a non-float tensor shows up, FP8
tensors without a known scale scheme, and sub-byte formats (F4, F6). Integer or bool tensors that are not weights
(``position_ids``, attention-mask buffers) are not refused: the analyses leave them out and say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from lpt_kernels.checkpoint.base import CheckpointError, _fmt_shape

SCALE_SUFFIX = "_scale_inv"
FLOAT_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                               "float8_e8m0fnu") if hasattr(torch, n))
_E4M3 = getattr(torch, "float8_e4m3fn", None)
_WEIGHT_SUFFIXES = (".weight", "qweight", "weight_packed", ".weight_q")
_ACT_SCALES = (".input_scale", ".activation_scale")
SUPPORTED = "lpt reads float weights (bf16, fp16, fp32, fp64) and block-scaled FP8 (quant_method 'fp8' with " \
            "weight_block_size)"

# what classify() says a tensor is
FLOAT, FP8_BLOCK, SCALE, BUFFER = "float", "fp8_block", "scale", "buffer"


@dataclass(frozen=True)
class BlockFP8:
    """The block-scaled FP8 scheme of a checkpoint: scale blocks of ``block = (rows, cols)`` elements."""
    block: Tuple[int, int]


def scheme_from_config(config: Optional[dict], where: str) -> Tuple[Optional[BlockFP8], Optional[str]]:
    """(BlockFP8 or None, the name of a quantization method that is refused or None) from config.json."""
    q = (config or {}).get("quantization_config")
    if q is None:
        return None, None
    if not isinstance(q, dict):
        return None, f"an unreadable quantization_config ({type(q).__name__})"
    method = q.get("quant_method")
    if method == "fp8" and q.get("weight_block_size") is not None:
        bs = q.get("weight_block_size")
        if (not isinstance(bs, list) or len(bs) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs)):
            raise CheckpointError(f"{where}: config.json quantization_config weight_block_size {bs!r} is not two "
                                  f"positive ints")
        return BlockFP8((bs[0], bs[1])), None
    if method == "fp8":
        return None, "quant_method 'fp8' without weight_block_size (per-tensor or per-channel scales)"
    return None, f"quant_method {method!r}"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def is_companion(ck, name: str) -> bool:
    """Whether `name` is the scale of an FP8 weight of `ck` (``X.weight_scale_inv`` beside an FP8 ``X.weight``), or
    an activation scale of a block-FP8 checkpoint: part of a weight, not a tensor to analyse."""
    if name.endswith(SCALE_SUFFIX):
        base = name[:-len(SCALE_SUFFIX)]
        return base in ck and ck.info(base).dtype in FP8_DTYPES
    return ck.quant is not None and name.endswith(_ACT_SCALES)


def _looks_like_weight(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def classify(ck, name: str) -> str:
    """What tensor `name` of checkpoint `ck` is: ``"float"`` (a float tensor, read as is), ``"fp8_block"`` (an FP8
    weight read through its block scales), ``"scale"`` (a companion of such a weight: not a tensor of its own) or
    ``"buffer"`` (an integer or bool tensor that is not a weight: left out). Raises :class:`CheckpointError` for a
    quantized or non-float weight that cannot be read correctly."""
    info = ck.info(name)
    dt = info.dtype
    head = f"{ck.path}: tensor {name!r}"
    if is_companion(ck, name):
        return SCALE
    if dt in FLOAT_WEIGHT_DTYPES:
        return FLOAT
    if dt is None:
        raise CheckpointError(f"{head} has a packed sub-byte dtype torch cannot represent; {SUPPORTED}")
    if dt in FP8_DTYPES:
        sname = scale_name(name)
        if ck.quant is None:
            why = (f"config.json has {ck.quant_refused}" if ck.quant_refused else
                   "config.json has no quantization_config with quant_method 'fp8' and weight_block_size")
            raise CheckpointError(f"{head} has dtype {_dtype_name(dt)} but {why}, so its scales are unknown; "
                                  f"{SUPPORTED}")
        if dt != _E4M3:
            raise CheckpointError(f"{head} has dtype {_dtype_name(dt)}; block-scaled FP8 weights are "
                                  f"float8_e4m3fn; {SUPPORTED}")
        if sname not in ck:
            raise CheckpointError(f"{head} has dtype {_dtype_name(dt)} but no {sname!r} beside it (no block "
                                  f"scales); {SUPPORTED}")
        si = ck.info(sname)
        if len(info.shape) != 2:
            raise CheckpointError(f"{head} is an FP8 weight of shape {_fmt_shape(info.shape)}; block-scaled FP8 "
                                  f"weights are 2-D")
        want = tuple(math.ceil(s / b) for s, b in zip(info.shape, ck.quant.block))
        if si.dtype not in FLOAT_WEIGHT_DTYPES or tuple(si.shape) != want:
            raise CheckpointError(f"{ck.path}: scale {sname!r} has dtype {_dtype_name(si.dtype)} and shape "
                                  f"{_fmt_shape(si.shape)}; weight {name!r} of shape {_fmt_shape(info.shape)} with "
                                  f"{ck.quant.block[0]}x{ck.quant.block[1]} blocks needs a float "
                                  f"{_fmt_shape(want)}")
        return FP8_BLOCK
    # integers, bool, complex
    if ck.quant_refused:
        raise CheckpointError(f"{head} has dtype {_dtype_name(dt)} and config.json has {ck.quant_refused}: a "
                              f"quantized checkpoint; {SUPPORTED}")
    if _looks_like_weight(name) or dt.is_complex:
        raise CheckpointError(f"{head} has dtype {_dtype_name(dt)}: not a float weight (a quantized pack?); "
                              f"{SUPPORTED}")
    return BUFFER


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """float32 ``codes * scales[i // bm, j // bn]`` of a 2-D block-scaled FP8 weight (a new tensor)."""
    rows, cols = codes.shape
    bm, bn = block
    s = scales.float()
    if rows % bm == 0 and cols % bn == 0 and rows and cols:
        out = codes.float().view(rows // bm, bm, cols // bn, bn)
        out *= s.view(rows // bm, 1, cols // bn, 1)
        return out.view(rows, cols)
    full = s.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return codes.float() * full
