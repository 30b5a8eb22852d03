"""act_stats_: per-channel activation statistics accumulated in place, without host synchronisation.

Programs tile (channel tile, token chunk); each streams its tokens in [BLOCK_T, BLOCK_C] tiles, sums |x| and x^2 in
fp32 over FOLD tokens at a time and folds those into float64 (so the precision does not depend on the token count,
as on the CPU and CUDA backends), and writes float64 / fp32 / int32 partials per chunk; torch ops then reduce the
chunks and add (max) them into the float64 ``stats``. Nothing reads a device value on the host and no shape depends
on the data, so the call is safe inside a forward hook on a GPU (and under CUDA-graph capture).

Cost per element: itemsize(x) bytes read (+1 byte per token for the mask), ~7 FLOPs (|x|, x*x, two adds, a max and a
compare): memory-bound everywhere. The partials add 24 bytes per channel per token chunk (one wave of chunks).
"""
import torch
import triton
import triton.language as tl

from ._launch import fit_split, on_device, resident_programs

# Programs to aim for off CUDA (None: 1, as the interpreter runs programs one after the other); tests set it to
# exercise several chunks. On CUDA the grid is sized from the compiled kernel's occupancy.
TARGET_PROGRAMS = None
FOLD = 256  # tokens summed in fp32 before the fold into float64


@triton.jit(do_not_specialize=["rows_per"])  # set from the occupancy of this very kernel: one compile
def _act_stats_kernel(x_ptr, s_t, s_c, mask_ptr, s_m, dpart, fmax, ipart, T, C, rows_per, threshold,
                      HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, V: tl.constexpr,
                      FOLD: tl.constexpr):
    # BLOCK_C = V*32*num_warps: every thread owns V channels and all BLOCK_T tokens of a tile, so the token reduction
    # is in-thread. Bytes: itemsize per element; FLOPs: ~7 per element.
    pc = tl.program_id(0)
    pr = tl.program_id(1)
    cols = tl.max_contiguous(pc * BLOCK_C + tl.arange(0, BLOCK_C), V)
    cvalid = cols < C
    s_abs = tl.zeros([BLOCK_C], tl.float64)
    s_sq = tl.zeros([BLOCK_C], tl.float64)
    m_abs = tl.zeros([BLOCK_C], tl.float32)
    n_act = tl.zeros([BLOCK_C], tl.int32)
    t0 = pr * rows_per
    t1 = tl.minimum(t0 + rows_per, T)
    for f in range(t0, t1, FOLD):
        f1 = tl.minimum(f + FOLD, t1)
        f_abs = tl.zeros([BLOCK_C], tl.float32)
        f_sq = tl.zeros([BLOCK_C], tl.float32)
        for t in range(f, f1, BLOCK_T):
            rows = t + tl.arange(0, BLOCK_T)
            rvalid = rows < f1
            if HAS_MASK:  # padding tokens are skipped: they count nowhere
                rvalid = rvalid & (tl.load(mask_ptr + rows.to(tl.int64) * s_m, mask=rvalid, other=0) != 0)
            valid = rvalid[:, None] & cvalid[None, :]
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_t + cols[None, :].to(tl.int64) * s_c, mask=valid,
                        other=0.0)
            x = x.to(tl.float32)  # widen first: no bf16/fp16 arithmetic
            a = tl.abs(x)
            f_abs += tl.sum(a, axis=0)
            f_sq += tl.sum(x * x, axis=0)
            # a > 0 drops NaN: maxima ignore NaN on every backend (docs/kernels.md), and tl.max stays NaN-free.
            m_abs = tl.maximum(m_abs, tl.max(tl.where(a > 0, a, 0.0), axis=0))
            n_act += tl.sum(((a > threshold) & valid).to(tl.int32), axis=0)
        s_abs += f_abs.to(tl.float64)
        s_sq += f_sq.to(tl.float64)
    dp = dpart + pr * 2 * C + cols
    tl.store(dp, s_abs, mask=cvalid)
    tl.store(dp + C, s_sq, mask=cvalid)
    tl.store(fmax + pr * C + cols, m_abs, mask=cvalid)
    tl.store(ipart + pr * C + cols, n_act, mask=cvalid)


def act_meta(itemsize, T, C):
    """Block sizes for x [T, C] of `itemsize` bytes: 16-byte loads per thread when x is channel-contiguous."""
    V = 8 if itemsize <= 2 else 4
    BLOCK_C = min(V * 32 * 4, max(V, triton.next_power_of_2(C)))
    V = min(V, BLOCK_C)
    return dict(BLOCK_T=min(8, triton.next_power_of_2(T)), BLOCK_C=BLOCK_C, V=V,
                num_warps=max(1, min(4, BLOCK_C // (32 * V))))


def act_stats_(x, stats, token_mask, threshold):
    T, C = x.shape
    dev = x.device
    with on_device(dev):
        # Row 0: the token count (device-side sum for a mask: no sync).
        if token_mask is None:
            stats[0] += T
        else:
            stats[0] += token_mask.sum().to(stats.dtype)
        if T == 0 or C == 0:
            return
        meta = act_meta(x.element_size(), T, C)
        BLOCK_T = meta["BLOCK_T"]
        ctiles = triton.cdiv(C, meta["BLOCK_C"])
        has_mask = token_mask is not None
        m = token_mask.view(torch.uint8) if has_mask else x  # dummy pointer without a mask
        flags = dict(HAS_MASK=has_mask, FOLD=FOLD, **meta)
        head = (x, x.stride(0), x.stride(1), m, token_mask.stride(0) if has_mask else 0)
        tail = (T, C, 1, float(threshold))  # rows_per (1 here) is not specialised on
        slots = resident_programs(_act_stats_kernel, dev, (x.dtype, has_mask, tuple(meta.values())),
                                  (*head, torch.float64, torch.float32, torch.int32, *tail), flags)
        chunks = fit_split(ctiles, triton.cdiv(T, BLOCK_T), slots or TARGET_PROGRAMS or 1)
        rows_per = triton.cdiv(triton.cdiv(T, chunks), BLOCK_T) * BLOCK_T
        chunks = triton.cdiv(T, rows_per)
        dpart = torch.empty(chunks, 2, C, device=dev, dtype=torch.float64)
        fmax = torch.empty(chunks, C, device=dev, dtype=torch.float32)
        ipart = torch.empty(chunks, C, device=dev, dtype=torch.int32)
        _act_stats_kernel[(ctiles, chunks)](*head, dpart, fmax, ipart, T, C, rows_per, float(threshold), **flags)
        stats[1] += dpart[:, 0].sum(0)
        stats[2] += dpart[:, 1].sum(0)
        stats[3] = torch.maximum(stats[3], fmax.amax(0).to(torch.float64))
        stats[4] += ipart.sum(0, dtype=torch.float64)
