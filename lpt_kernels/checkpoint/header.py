"""The safetensors header: read it and refuse what the format forbids.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data. The JSON maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header); an optional ``"__metadata__"`` maps strings to strings. :func:`parse_header` accepts a file exactly when the
safetensors library does (``SafeTensors::deserialize``: the offsets, sorted, tile the data from byte 0 to the end of
the file with no gap, overlap or trailing byte; each tensor's byte length is its element count times its dtype's
size), with the differences listed in docs/checkpoint.md: a header longer than the library's 100 MB cap is read,
and a JSON key given twice (a tensor, a field or a metadata key) is refused even where the library, which keeps the
last one, would accept the file.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Tuple

from lpt_kernels.checkpoint.base import DTYPES, CheckpointError, TensorInfo, _fmt_shape

# Every dtype the format names, with its size in bits (sub-byte formats are packed). Names torch lacks are listed
# with dtype None by the reader: they can be named and aligned, not materialised.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}
_USIZE = 1 << 64  # the library counts bytes in a 64-bit usize: a shape whose product overflows it is refused


class _Duplicate(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs):
    """object_pairs_hook for json.loads: a dict, or _Duplicate for a key given twice (json.loads keeps the last)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _parse_float(text):
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} out of range")
    return v


def _parse_int(text):
    return -0.0 if text == "-0" else int(text)  # JSON's -0 is a float to the library, not an unsigned int


_MAX_DEPTH = 127  # serde_json's recursion limit, as the library applies it (the top object is level 1)


def _check_values(x, depth=1):
    """What the library's JSON parser refuses and Python's accepts: lone surrogates (escaped) in any string, and
    nesting deeper than its recursion limit."""
    if depth > _MAX_DEPTH and isinstance(x, (dict, list)):
        raise ValueError(f"nesting deeper than {_MAX_DEPTH} levels")
    if isinstance(x, str):
        if _has_surrogate(x):
            raise ValueError(f"lone surrogate in string {x!r}")
    elif isinstance(x, dict):
        for k, v in x.items():
            _check_values(k, depth)
            _check_values(v, depth + 1)
    elif isinstance(x, list):
        for v in x:
            _check_values(v, depth + 1)


def _is_u64(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _USIZE


# Valid UTF-8 cannot hold a surrogate: one can only come from a JSON escape, so a header without this text has none.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")


def _depth(text: str) -> int:
    """Nesting depth of valid JSON text (up to _MAX_DEPTH + 1): its strings and scalars dropped, then the innermost
    pairs peeled, one level a round."""
    s = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = 0
    while s and depth <= _MAX_DEPTH:
        s = _EMPTY_PAIR.sub("", s)
        depth += 1
    return depth


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in s)


def parse_header(file: str) -> Tuple[List[TensorInfo], int]:
    """Read and validate the header of one safetensors file. Returns its tensors (sorted by data offset) and the
    file size; raises :class:`CheckpointError` naming the file (and the tensor) for anything the format forbids."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{file}: corrupt safetensors header (file of {size} bytes is too short "
                                      f"to hold the 8-byte header length)")
            hlen = int.from_bytes(raw_len, "little")
            if hlen > size - 8:
                raise CheckpointError(f"{file}: corrupt safetensors header (header length {hlen} exceeds the "
                                      f"file size {size}; not a safetensors file?)")
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    if len(raw) < hlen:
        raise CheckpointError(f"{file}: truncated shard (header of {hlen} bytes, file has {size} bytes)")
    bad = f"{file}: corrupt safetensors header"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{bad} (not UTF-8: byte {e.start} of the header)") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                            parse_float=_parse_float, parse_int=_parse_int)
        if _SURROGATE_ESCAPE.search(text) or _depth(text) > _MAX_DEPTH:
            _check_values(header)  # otherwise neither can occur (the walk took ~2 ms a shard of 6 layers)
    except _Duplicate as e:
        raise CheckpointError(f"{bad}: key {e.key!r} appears twice (the safetensors library keeps the last one; "
                              f"refusing to guess which is meant)") from None
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{bad} (invalid JSON: {msg})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (JSON is a {type(header).__name__}, not an object)")
    base = 8 + hlen
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointError(f"{bad}: '__metadata__' must map strings to strings")
            continue
        where = f"{bad}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} entry is not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise CheckpointError(f"{where} has no {key!r}")
        dstr, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dstr, str) or dstr not in DTYPE_BITS:
            raise CheckpointError(f"{where} has an unknown dtype {dstr!r} (the format has "
                                  f"{', '.join(DTYPE_BITS)})")
        if not isinstance(shape, list) or not all(_is_u64(s) for s in shape):
            raise CheckpointError(f"{where} has an invalid shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_u64(o) for o in offs):
            raise CheckpointError(f"{where} has invalid data_offsets {offs!r}")
        numel = 1
        for s in shape:
            numel *= s
            if numel >= _USIZE:
                raise CheckpointError(f"{where} has shape {_fmt_shape(shape)}, too many elements to address")
        bits = numel * DTYPE_BITS[dstr]
        if bits >= _USIZE:
            raise CheckpointError(f"{where} has shape {_fmt_shape(shape)}, too many bytes to address")
        if bits % 8:
            raise CheckpointError(f"{where}: shape {_fmt_shape(shape)} of {dstr} is not a whole number of bytes")
        if offs[1] - offs[0] != bits // 8:
            raise CheckpointError(f"{where} has data_offsets {offs} ({offs[1] - offs[0]} bytes) but shape "
                                  f"{_fmt_shape(shape)} of {dstr} needs {bits // 8} bytes")
        infos.append(TensorInfo(name, DTYPES.get(dstr), tuple(shape), file, base + offs[0], base + offs[1]))
    # the offsets, sorted, must tile the data exactly: from byte 0, no gap, no overlap, to the end of the file
    infos.sort(key=lambda i: (i.start, i.end))
    last = max(infos, key=lambda i: i.end, default=None)
    if last is not None and last.end > size:
        raise CheckpointError(f"{file}: truncated shard: tensor {last.name!r} ends at byte {last.end} but the file "
                              f"has only {size} bytes")
    end, prev = base, None
    for info in infos:
        if info.start > end:
            raise CheckpointError(f"{bad}: a gap of {info.start - end} bytes before tensor {info.name!r} (data "
                                  f"bytes {end - base}-{info.start - base} belong to no tensor)")
        if info.start < end:
            raise CheckpointError(f"{bad}: tensors {prev.name!r} and {info.name!r} overlap (data bytes "
                                  f"{prev.start - base}-{prev.end - base} and {info.start - base}-{info.end - base})")
        end, prev = info.end, info
    if end < size:
        raise CheckpointError(f"{bad}: {size - end} bytes after the last tensor's data (the tensors' data_offsets "
                              f"must cover the data to the end of the file)")
    return infos, size
