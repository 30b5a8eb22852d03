"""rollback_: target += alpha * (source - target) on the listed units only, in place.

A unit is ``block`` lines along ``axis`` (rows for axis 0, columns for axis 1). The listed lines are numbered
l = i*block + j (i-th listed unit, j-th line of it) and tiled as [BLOCK_L lines, BLOCK_X elements across the line];
target line index[i]*block + j is read from source line l (``compact``) or from the same line. Nothing outside the
listed units is read or written. With alpha == 1 and equal dtypes the raw words are copied (through integer views):
exact, NaN payloads included, as on the CPU (a trip through fp32 would quiet bf16 0x7f81 into 0x7fc1).

Cost per element of the listed units: itemsize(target) read + written, itemsize(source) read; 3 FLOPs (a subtraction
and one fma) plus ~10 integer ops for the round-to-nearest-even of a 16-bit target: memory-bound.
"""
import torch
import triton
import triton.language as tl

from ._launch import on_device

_WORDS = {2: torch.int16, 4: torch.int32}


@triton.jit
def _f32_to_bf16_bits(v):
    # Round to nearest even; NaN stays NaN (quieted), as lpt::f32_to_bf16. Done on the bits because the Triton
    # interpreter's fp32 -> bf16 cast truncates (and to give the CPU backend's NaN bits on the GPU too).
    x = v.to(tl.uint32, bitcast=True)
    rounded = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
    nan = (x >> 16) | 0x40
    return tl.where((x & 0x7FFFFFFF) > 0x7F800000, nan, rounded).to(tl.uint16)


@triton.jit
def _f32_to_f16_bits(v):
    # Round to nearest even with overflow to inf, correct subnormals and quiet NaN, as lpt::f32_to_f16.
    x = v.to(tl.uint32, bitcast=True)
    sign = (x >> 16) & 0x8000
    ax = x & 0x7FFFFFFF
    # Below 2^-14 (fp16 subnormal): adding 0.5 rounds |v| to a multiple of 2^-24 (nearest even, by the fp32 adder) and
    # the low bits of the sum are the fp16 bits.
    sub = (ax.to(tl.float32, bitcast=True) + 0.5).to(tl.uint32, bitcast=True) - 0x3F000000
    # Normals: re-bias the exponent by -112 (wrapping is fine: only used when ax >= 2^-14) and round off 13 bits.
    normal = (ax - 0x38000000 + 0xFFF + ((ax >> 13) & 1)) >> 13
    special = tl.where(ax > 0x7F800000, 0x7E00, 0x7C00).to(tl.uint32)  # quiet NaN or inf
    r = tl.where(ax < 0x38800000, sub, normal)
    r = tl.where(ax >= 0x477FF000, special, r)  # |v| >= 65520 rounds to inf
    return (sign | r).to(tl.uint16)


@triton.jit
def _rollback_kernel(t_ptr, t_line, t_x, s_ptr, s_line, s_x, idx_ptr, n_lines, X, block, alpha, n_xtiles,
                     COMPACT: tl.constexpr, IS_COPY: tl.constexpr, RAW: tl.constexpr, FMA64: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_X: tl.constexpr):
    # 1-D grid (line tiles x cross tiles: no 65535 limit on a second grid dimension).
    pid = tl.program_id(0)
    pl = pid // n_xtiles
    px = pid % n_xtiles
    l = pl * BLOCK_L + tl.arange(0, BLOCK_L)
    lvalid = l < n_lines
    unit = tl.load(idx_ptr + l // block, mask=lvalid, other=0)
    tline = unit * block + l % block
    if COMPACT:
        sl = l.to(tl.int64)
    else:
        sl = tline
    xs = px * BLOCK_X + tl.arange(0, BLOCK_X)
    valid = lvalid[:, None] & (xs < X)[None, :]
    xs64 = xs[None, :].to(tl.int64)
    tp = t_ptr + tline[:, None] * t_line + xs64 * t_x
    if RAW:  # alpha == 1, equal dtypes: t_ptr and s_ptr are integer views, the words are copied as they are
        tl.store(tp, tl.load(s_ptr + sl[:, None] * s_line + xs64 * s_x, mask=valid), mask=valid)
    else:
        _update(tp, s_ptr + sl[:, None] * s_line + xs64 * s_x, valid, alpha, IS_COPY, FMA64)


@triton.jit
def _update(tp, sp, valid, alpha, IS_COPY: tl.constexpr, FMA64: tl.constexpr):
    s = tl.load(sp, mask=valid, other=0.0).to(tl.float32)
    if IS_COPY:
        v = s  # alpha == 1: the rounded source itself, bit-exact (the target is not even read)
    else:
        t = tl.load(tp, mask=valid, other=0.0).to(tl.float32)
        if FMA64:
            # The interpreter's fma is an unfused a*b+c. In fp64 the product of two fp32 is exact, so one rounding
            # of the sum to fp64 and one to fp32 match fmaf except in rare double-rounding ties.
            v = ((s - t).to(tl.float64) * alpha + t.to(tl.float64)).to(tl.float32)
        else:
            v = tl.fma(s - t, alpha, t)  # fmaf(alpha, s - t, t), as every backend
    if tp.dtype.element_ty == tl.bfloat16:
        out = _f32_to_bf16_bits(v).to(tl.bfloat16, bitcast=True)
    elif tp.dtype.element_ty == tl.float16:
        out = _f32_to_f16_bits(v).to(tl.float16, bitcast=True)
    else:
        out = v
    tl.store(tp, out, mask=valid)


def rollback_(target, source, index, axis, block, alpha, compact):
    n_lines = index.numel() * block
    X = target.shape[1 - axis]
    if n_lines == 0 or X == 0:
        return
    with on_device(target.device):
        _rollback(target, source, index.contiguous(), axis, block, alpha, compact, n_lines, X)


def _rollback(target, source, index, axis, block, alpha, compact, n_lines, X):
    # Tiles of ~4K elements; along the lines' own extent as far as it goes (coalesced when axis 0 is row-major).
    BLOCK_X = min(1024, triton.next_power_of_2(X))
    BLOCK_L = max(1, min(triton.next_power_of_2(n_lines), 4096 // BLOCK_X))
    if target.stride(axis) == 1 and target.stride(1 - axis) != 1:
        # The listed lines are the contiguous direction (axis 1 on row-major): make the tile long along the lines.
        BLOCK_L = min(triton.next_power_of_2(n_lines), 128)
        BLOCK_X = max(1, min(triton.next_power_of_2(X), 4096 // BLOCK_L))
    n_xtiles = triton.cdiv(X, BLOCK_X)
    grid = (triton.cdiv(n_lines, BLOCK_L) * n_xtiles,)
    # The fp32 alpha every backend uses (also for the == 1 test); a CPU scalar, no device work.
    alpha = float(torch.tensor(float(alpha), dtype=torch.float32))
    raw = alpha == 1.0 and source.dtype == target.dtype
    t, s = (target.view(_WORDS[target.element_size()]), source.view(_WORDS[source.element_size()])) if raw else \
        (target, source)
    _rollback_kernel[grid](t, target.stride(axis), target.stride(1 - axis), s, source.stride(axis),
                           source.stride(1 - axis), index, n_lines, X, block, alpha, n_xtiles, COMPACT=bool(compact),
                           IS_COPY=alpha == 1.0, RAW=raw, FMA64=target.device.type == "cpu",
                           BLOCK_L=BLOCK_L, BLOCK_X=BLOCK_X, num_warps=4)
