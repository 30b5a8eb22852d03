"""act_stats_: per-channel activation statistics accumulated in place, without host synchronisation.

Programs tile (channel tile, token chunk); each streams its tokens in [BLOCK_T, BLOCK_C] tiles and writes fp32 /
int32 partials [chunks, stat, C]; torch ops then reduce the chunks and add (max) them into the float64 ``stats``.
Nothing reads a device value on the host and no shape depends on the data, so the call is safe inside a forward hook
on a GPU (and under CUDA-graph capture).

Cost per element: itemsize(x) bytes read (+1 byte per token for the mask), ~7 FLOPs (|x|, x*x, two adds, a max and a
compare): memory-bound everywhere. The partials add 16 bytes per channel per token chunk (few chunks).
"""
import torch
import triton
import triton.language as tl

from .unit_gram import _device_programs

# Programs to aim for (None: 4 x SM count on CUDA, 1 elsewhere); tests may set it to exercise several chunks.
TARGET_PROGRAMS = None


@triton.jit
def _act_stats_kernel(x_ptr, s_t, s_c, mask_ptr, s_m, fpart, ipart, T, C, rows_per, threshold,
                      HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, V: tl.constexpr):
    # BLOCK_C = V*32*num_warps: every thread owns V channels and all BLOCK_T tokens of a tile, so the token reduction
    # is in-thread. Bytes: itemsize per element; FLOPs: ~7 per element.
    pc = tl.program_id(0)
    pr = tl.program_id(1)
    cols = tl.max_contiguous(pc * BLOCK_C + tl.arange(0, BLOCK_C), V)
    cvalid = cols < C
    s_abs = tl.zeros([BLOCK_C], tl.float32)
    s_sq = tl.zeros([BLOCK_C], tl.float32)
    m_abs = tl.zeros([BLOCK_C], tl.float32)
    n_act = tl.zeros([BLOCK_C], tl.int32)
    t0 = pr * rows_per
    t1 = tl.minimum(t0 + rows_per, T)
    for t in range(t0, t1, BLOCK_T):
        rows = t + tl.arange(0, BLOCK_T)
        rvalid = rows < t1
        if HAS_MASK:  # padding tokens are skipped: they count nowhere
            rvalid = rvalid & (tl.load(mask_ptr + rows.to(tl.int64) * s_m, mask=rvalid, other=0) != 0)
        valid = rvalid[:, None] & cvalid[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_t + cols[None, :].to(tl.int64) * s_c, mask=valid, other=0.0)
        x = x.to(tl.float32)  # widen first: no bf16/fp16 arithmetic
        a = tl.abs(x)
        s_abs += tl.sum(a, axis=0)
        s_sq += tl.sum(x * x, axis=0)
        # a > 0 drops NaN: the max ignores NaN as on the CPU (and tl.max stays NaN-free on every backend).
        m_abs = tl.maximum(m_abs, tl.max(tl.where(a > 0, a, 0.0), axis=0))
        n_act += tl.sum(((a > threshold) & valid).to(tl.int32), axis=0)
    fp = fpart + pr * 3 * C + cols
    tl.store(fp, s_abs, mask=cvalid)
    tl.store(fp + C, s_sq, mask=cvalid)
    tl.store(fp + 2 * C, m_abs, mask=cvalid)
    tl.store(ipart + pr * C + cols, n_act, mask=cvalid)


def act_stats_(x, stats, token_mask, threshold):
    T, C = x.shape
    # Row 0: the token count (device-side sum for a mask: no sync).
    if token_mask is None:
        stats[0] += T
    else:
        stats[0] += token_mask.sum().to(stats.dtype)
    if T == 0 or C == 0:
        return
    dev = x.device
    target = TARGET_PROGRAMS if TARGET_PROGRAMS is not None else _device_programs(dev)
    V = 8 if x.element_size() <= 2 else 4  # 16-byte loads when x is channel-contiguous
    BLOCK_C = min(V * 32 * 4, max(V, triton.next_power_of_2(C)))
    V = min(V, BLOCK_C)
    num_warps = max(1, min(4, BLOCK_C // (32 * V)))
    BLOCK_T = min(8, triton.next_power_of_2(T))
    ctiles = triton.cdiv(C, BLOCK_C)
    chunks = max(1, min(triton.cdiv(target, ctiles), triton.cdiv(T, BLOCK_T)))
    rows_per = triton.cdiv(triton.cdiv(T, chunks), BLOCK_T) * BLOCK_T
    chunks = triton.cdiv(T, rows_per)
    fpart = torch.empty(chunks, 3, C, device=dev, dtype=torch.float32)
    ipart = torch.empty(chunks, C, device=dev, dtype=torch.int32)
    has_mask = token_mask is not None
    m = token_mask.view(torch.uint8) if has_mask else x  # dummy pointer without a mask
    _act_stats_kernel[(ctiles, chunks)](x, x.stride(0), x.stride(1), m, token_mask.stride(0) if has_mask else 0,
                                        fpart, ipart, T, C, rows_per, float(threshold), HAS_MASK=has_mask,
                                        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, V=V, num_warps=num_warps)
    stats[1] += fpart[:, 0].sum(0, dtype=torch.float64)
    stats[2] += fpart[:, 1].sum(0, dtype=torch.float64)
    stats[3] = torch.maximum(stats[3], fpart[:, 2].amax(0).to(torch.float64))
    stats[4] += ipart.sum(0, dtype=torch.float64)
