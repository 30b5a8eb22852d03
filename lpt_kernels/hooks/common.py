"""What the activation and gradient hooks share: the error they raise, the model's layout, and saving and
loading a result (a safetensors file of arrays beside a JSON document, each replaced atomically)."""
from __future__ import annotations

import json
import os
from typing import Dict, Sequence, Tuple

import torch

from lpt_kernels.checkpoint.writer import replace_file
from lpt_kernels.layout import Layout, load_layout, model_config


class HookError(ValueError):
    """A model, layout or result that the hooks cannot work with (one-line message naming the culprit)."""


# ---- shared helpers -------------------------------------------------------------------------------------------

def _model_layout(model: torch.nn.Module, layout, groups: Sequence[str]) -> Layout:
    """The layout of ``model`` (a Layout, a spec dict/path, a built-in family name, or None to detect), validated
    against the model's parameter shapes."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    if isinstance(layout, Layout):
        lay = layout
        lay.validate(shapes)
    else:
        lay = load_layout(layout, shapes, model_config(model), groups=tuple(groups))
    return lay


def _write_atomic(out_dir: str, tensors: Dict[str, torch.Tensor], doc: dict, files: Tuple[str, str]) -> str:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write_json(p):
        with open(p, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=True)

    for name, write in ((files[0], lambda p: save_file(tensors, p)), (files[1], write_json)):
        replace_file(os.path.join(out_dir, name), write)
    return out_dir


def _read(out_dir: str, files: Tuple[str, str], kind: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    apath, jpath = (os.path.join(out_dir, f) for f in files)
    for p in (apath, jpath):
        if not os.path.isfile(p):
            raise HookError(f"{out_dir}: not a saved {kind} result ({os.path.basename(p)} missing)")
    try:
        with open(jpath) as f:
            doc = json.load(f)
        arrays = load_file(apath)
    except (OSError, ValueError) as e:
        raise HookError(f"{out_dir}: cannot read the {kind} result ({e})") from None
    if doc.get("meta", {}).get("kind") != kind:
        raise HookError(f"{out_dir}: {files[1]} does not describe {'an' if kind[:1] in 'aeiou' else 'a'} {kind} result")
    return doc, arrays
