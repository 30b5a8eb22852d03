"""unit_gram: per-unit Gram matrix and |d| statistics of K inputs, one pass, every input byte read once.

Two kernels, picked by which axis of the inputs is contiguous in memory (not by ``axis``, so transposed views stay
coalesced):

* ``_gram_rows_kernel`` — the reduction axis is contiguous (axis 0 on row-major weights: gate/up/q/k/v rows).
  One program per (unit, slice of the unit's ``block`` lines) streams the lines in BLOCK_N chunks.
* ``_gram_cols_kernel`` — the unit axis is contiguous (axis 1 on row-major weights: down_proj/o_proj columns).
  Tile programs over (column tile, row chunk) read rows coalesced and write per-column partials.

Both write fp32/int32 partials ``[chunks, stat, units]`` that torch ops reduce (sum / amax) and fold over the block
columns of a unit; no host synchronisation anywhere.

Cost per element position (K inputs, M deltas): sum_k itemsize_k bytes read (no writes beyond the tiny partials);
about M*(M+1) FLOPs for the Gram entries (multiply-add per upper-triangle pair) plus ~8*M for the |d| sum, max and the
two counts. For K <= 5 bf16 inputs that is < 4 FLOP/byte, well under the H100 ridge (~20 FLOP/byte fp32): memory-bound.
"""
import functools

import torch
import triton
import triton.language as tl

MODES = {"consecutive": 0, "base": 1, "given": 2}

# Programs to aim for on the device (so small unit counts still fill the GPU). None: 4 x SM count on CUDA, 1 elsewhere
# (the interpreter runs programs one after the other). Tests may set it to exercise the multi-chunk paths.
TARGET_PROGRAMS = None
# None: pick the kernel from the strides; "rows" / "cols" force one (tests).
FORCE_KERNEL = None


def _target_programs(device):
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    return _device_programs(device)


@functools.lru_cache(maxsize=None)
def _device_programs(device):
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pow2_floor(x):
    return 1 << (max(int(x), 1).bit_length() - 1)


@triton.jit
def _delta(w, m: tl.constexpr, MODE: tl.constexpr):
    # d_m as the contract defines it (MODE 0 consecutive, 1 base, 2 given); w is a tuple of fp32 tiles.
    if MODE == 0:
        d = w[m + 1] - w[m]
    elif MODE == 1:
        d = w[m + 1] - w[0]
    else:
        d = w[m]
    return d


@triton.jit
def _ref(w, m: tl.constexpr, MODE: tl.constexpr):
    # The subtrahend of d_m (|ref| scales rtol). Never called for MODE 2 (reference 0).
    if MODE == 0:
        r = w[m]
    else:
        r = w[0]
    return r


@triton.jit
def _load_all(ptrs, s_line, s_red, line, red, valid, K: tl.constexpr):
    # Load element (line, red) of each of the K inputs (own dtype, own strides), widened to fp32 right away
    # (bf16/fp16 arithmetic must not happen: the interpreter gets it wrong, and fp32 differences are exact).
    w = ()
    for k in tl.static_range(K):
        v = tl.load(ptrs[k] + line * s_line[k] + red * s_red[k], mask=valid, other=0.0)
        w = w + (v.to(tl.float32),)
    return w


@triton.jit
def _accumulate(acc, w, valid, atol, rtol, M: tl.constexpr, MODE: tl.constexpr, AXIS: tl.constexpr,
                NEAR: tl.constexpr, USE_REF: tl.constexpr):
    # acc is a flat tuple: NP = M(M+1)/2 Gram pairs (upper triangle, row-major), M abs sums, M abs maxima (fp32),
    # then M zero counts and M near-zero counts (int32). The tile is reduced along AXIS before it is added, so the
    # accumulators stay one vector each (registers), whatever M is.
    NP: tl.constexpr = M * (M + 1) // 2
    new = ()
    for a in tl.static_range(M):
        da = _delta(w, a, MODE)
        for b in tl.static_range(a, M):
            new = new + (acc[a * M - a * (a - 1) // 2 + (b - a)] + tl.sum(da * _delta(w, b, MODE), axis=AXIS),)
    for m in tl.static_range(M):
        new = new + (acc[NP + m] + tl.sum(tl.abs(_delta(w, m, MODE)), axis=AXIS),)
    for m in tl.static_range(M):
        a = tl.abs(_delta(w, m, MODE))
        # a > 0 drops NaN (the max ignores NaN, as on the CPU) and keeps tl.max NaN-free on every backend.
        new = new + (tl.maximum(acc[NP + M + m], tl.max(tl.where(a > 0, a, 0.0), axis=AXIS)),)
    for m in tl.static_range(M):
        d = _delta(w, m, MODE)
        new = new + (acc[NP + 2 * M + m] + tl.sum(((d == 0) & valid).to(tl.int32), axis=AXIS),)
    for m in tl.static_range(M):
        if NEAR:
            a = tl.abs(_delta(w, m, MODE))
            if USE_REF:
                tol = atol + rtol * tl.abs(_ref(w, m, MODE))
            else:
                tol = atol
            new = new + (acc[NP + 3 * M + m] + tl.sum(((a <= tol) & valid).to(tl.int32), axis=AXIS),)
        else:
            new = new + (acc[NP + 3 * M + m],)
    return new


@triton.jit
def _gram_rows_kernel(ptrs, s_line, s_red, idx_ptr, fsum, fmax, icnt, U, R, block, lines_per, atol, rtol,
                      K: tl.constexpr, M: tl.constexpr, MODE: tl.constexpr, HAS_INDEX: tl.constexpr,
                      NEAR: tl.constexpr, USE_REF: tl.constexpr, BLOCK_N: tl.constexpr, V: tl.constexpr):
    # Program (i, s): output unit i, lines [s*lines_per, (s+1)*lines_per) of its block. Each chunk is a
    # [BLOCK_N // V, V] tile whose V contiguous elements sit in one thread (vector loads), reduced in-thread along
    # axis 1 before accumulation. Bytes: sum_k itemsize_k per element; FLOPs: ~M*(M+1) + 8*M per element.
    NP: tl.constexpr = M * (M + 1) // 2
    i = tl.program_id(0)
    s = tl.program_id(1)
    if HAS_INDEX:
        unit = tl.load(idx_ptr + i)
    else:
        unit = i.to(tl.int64)
    red0 = tl.arange(0, BLOCK_N // V)[:, None] * V + tl.arange(0, V)[None, :]
    acc = (tl.zeros([BLOCK_N // V], tl.float32),) * (NP + 2 * M) + (tl.zeros([BLOCK_N // V], tl.int32),) * (2 * M)
    j0 = s * lines_per
    j1 = tl.minimum(j0 + lines_per, block)
    for j in range(j0, j1):
        line = unit * block + j
        for c in range(0, R, BLOCK_N):
            red = c + red0
            valid = red < R
            w = _load_all(ptrs, s_line, s_red, line, red.to(tl.int64), valid, K)
            acc = _accumulate(acc, w, valid, atol, rtol, M, MODE, 1, NEAR, USE_REF)
    # Partials are [split, stat, U] (stat-major so the host reduction is a plain sum / amax over dim 0).
    fs = fsum + s * (NP + M) * U + i
    for q in tl.static_range(NP + M):
        tl.store(fs + q * U, tl.sum(acc[q], axis=0))
    fm = fmax + s * M * U + i
    for m in tl.static_range(M):
        tl.store(fm + m * U, tl.max(acc[NP + M + m], axis=0))
    ic = icnt + s * 2 * M * U + i
    for m in tl.static_range(M):
        tl.store(ic + m * U, tl.sum(acc[NP + 2 * M + m].to(tl.int64), axis=0))
        if NEAR:
            tl.store(ic + (M + m) * U, tl.sum(acc[NP + 3 * M + m].to(tl.int64), axis=0))
        else:  # atol == rtol == 0: |d| <= 0 is d == 0
            tl.store(ic + (M + m) * U, tl.sum(acc[NP + 2 * M + m].to(tl.int64), axis=0))


@triton.jit
def _gram_cols_kernel(ptrs, s_line, s_red, idx_ptr, fsum, fmax, icnt, UB, R, block, rows_per, atol, rtol,
                      K: tl.constexpr, M: tl.constexpr, MODE: tl.constexpr, HAS_INDEX: tl.constexpr,
                      NEAR: tl.constexpr, USE_REF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      V: tl.constexpr):
    # Program (c, r): BLOCK_C unit lines (output unit i = c_flat // block, line index[i]*block + c_flat % block)
    # times the rows [r*rows_per, (r+1)*rows_per), in [BLOCK_R, BLOCK_C] tiles read along the contiguous lines.
    # BLOCK_C = V*32*num_warps keeps all threads on the lines, so the row reduction of a tile is in-thread.
    # Bytes: sum_k itemsize_k per element + (NP+4M)*4 per line per row chunk of partials; FLOPs as the rows kernel.
    NP: tl.constexpr = M * (M + 1) // 2
    pc = tl.program_id(0)
    pr = tl.program_id(1)
    # Claim only V contiguous lines: the vector width (V lines per thread) is then ours, not the widest load, so the
    # (NP+4M)*V accumulator registers per thread stay bounded and no warp sits on the reduced (row) dimension.
    cf = tl.max_contiguous(pc * BLOCK_C + tl.arange(0, BLOCK_C), V)
    cvalid = cf < UB
    if HAS_INDEX:
        unit = tl.load(idx_ptr + cf // block, mask=cvalid, other=0)
        line = unit * block + cf % block
    else:
        line = cf.to(tl.int64)
    acc = (tl.zeros([BLOCK_C], tl.float32),) * (NP + 2 * M) + (tl.zeros([BLOCK_C], tl.int32),) * (2 * M)
    r0 = pr * rows_per
    r1 = tl.minimum(r0 + rows_per, R)
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        valid = (rows < r1)[:, None] & cvalid[None, :]
        w = _load_all(ptrs, s_line, s_red, line[None, :], rows[:, None].to(tl.int64), valid, K)
        acc = _accumulate(acc, w, valid, atol, rtol, M, MODE, 0, NEAR, USE_REF)
    fs = fsum + pr * (NP + M) * UB + cf
    for q in tl.static_range(NP + M):
        tl.store(fs + q * UB, acc[q], mask=cvalid)
    fm = fmax + pr * M * UB + cf
    for m in tl.static_range(M):
        tl.store(fm + m * UB, acc[NP + M + m], mask=cvalid)
    ic = icnt + pr * 2 * M * UB + cf
    for m in tl.static_range(M):
        tl.store(ic + m * UB, acc[NP + 2 * M + m], mask=cvalid)
        if NEAR:
            tl.store(ic + (M + m) * UB, acc[NP + 3 * M + m], mask=cvalid)
        else:
            tl.store(ic + (M + m) * UB, acc[NP + 2 * M + m], mask=cvalid)


def unit_gram(ws, axis, block, mode, index, atol, rtol):
    K = len(ws)
    MODE = MODES[mode]
    M = K if MODE == 2 else K - 1
    NP = M * (M + 1) // 2
    dev = ws[0].device
    L, R = ws[0].shape[axis], ws[0].shape[1 - axis]
    U = L // block if index is None else index.numel()
    if U == 0 or R == 0 or block == 0:
        z = torch.zeros
        return (z(U, M, M, device=dev), z(U, M, device=dev), z(U, M, device=dev),
                z(U, M, dtype=torch.int64, device=dev), z(U, M, dtype=torch.int64, device=dev))
    ptrs = tuple(ws)
    s_line = tuple(w.stride(axis) for w in ws)
    s_red = tuple(w.stride(1 - axis) for w in ws)
    idx = index if index is not None else ws[0]  # dummy pointer when there is no index
    atol, rtol = float(atol), float(rtol)
    flags = dict(K=K, M=M, MODE=MODE, HAS_INDEX=index is not None, NEAR=not (atol == 0.0 and rtol == 0.0),
                 USE_REF=rtol != 0.0 and MODE != 2)
    target = _target_programs(dev)
    kind = FORCE_KERNEL
    if kind is None:
        # Reduction axis contiguous (or the more nearly so) -> rows kernel; unit axis contiguous -> cols kernel.
        kind = "cols" if (s_line[0] == 1 and s_red[0] != 1 and L > 1) else "rows"

    if kind == "rows":
        # More inputs -> shorter vectors per thread (the K loaded values and the NP+4M accumulators share registers).
        V = 8 if K <= 4 else 4
        BLOCK_N = min(V * 32 * 4, max(V, triton.next_power_of_2(R)))
        num_warps = max(1, min(4, BLOCK_N // (32 * V)))
        split = min(block, triton.cdiv(target, U))
        lines_per = triton.cdiv(block, split)
        split = triton.cdiv(block, lines_per)
        n = U
        fsum = torch.empty(split, NP + M, U, device=dev, dtype=torch.float32)
        fmax = torch.empty(split, M, U, device=dev, dtype=torch.float32)
        icnt = torch.empty(split, 2 * M, U, device=dev, dtype=torch.int64)
        _gram_rows_kernel[(U, split)](ptrs, s_line, s_red, idx, fsum, fmax, icnt, U, R, block, lines_per, atol, rtol,
                                      BLOCK_N=BLOCK_N, V=V, num_warps=num_warps, **flags)
    else:
        UB = U * block
        # Per-thread lines V: the NP+4M accumulators of V lines each should stay within ~64 registers.
        V = max(1, min(8, _pow2_floor(64 // (NP + 4 * M))))
        BLOCK_C = min(V * 32 * 4, triton.next_power_of_2(UB))
        V = min(V, BLOCK_C)
        num_warps = max(1, min(4, BLOCK_C // (32 * V)))
        # Rows per tile: ~64 loaded values per thread in flight.
        BLOCK_R = max(1, min(16, _pow2_floor(64 // (K * V)), triton.next_power_of_2(R)))
        ctiles = triton.cdiv(UB, BLOCK_C)
        chunks = max(1, min(triton.cdiv(target, ctiles), triton.cdiv(R, BLOCK_R)))
        rows_per = triton.cdiv(triton.cdiv(R, chunks), BLOCK_R) * BLOCK_R
        chunks = triton.cdiv(R, rows_per)
        n = UB
        fsum = torch.empty(chunks, NP + M, UB, device=dev, dtype=torch.float32)
        fmax = torch.empty(chunks, M, UB, device=dev, dtype=torch.float32)
        icnt = torch.empty(chunks, 2 * M, UB, device=dev, dtype=torch.int32)
        _gram_cols_kernel[(ctiles, chunks)](ptrs, s_line, s_red, idx, fsum, fmax, icnt, UB, R, block, rows_per,
                                            atol, rtol, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, V=V, num_warps=num_warps,
                                            **flags)

    fs = fsum.sum(0)
    fm = fmax.amax(0)
    ic = icnt.sum(0, dtype=torch.int64)
    if n != U:  # cols kernel: fold the block lines of each unit
        fs = fs.view(NP + M, U, block).sum(-1)
        fm = fm.view(M, U, block).amax(-1)
        ic = ic.view(2 * M, U, block).sum(-1)
    gram = torch.empty(U, M, M, device=dev, dtype=torch.float32)
    iu = torch.triu_indices(M, M, device=dev)
    g = fs[:NP].t()
    gram[:, iu[0], iu[1]] = g
    gram[:, iu[1], iu[0]] = g
    # Always copies (never views of one buffer): outputs of a custom op may not alias each other.
    own = lambda x: x.t().clone(memory_format=torch.contiguous_format)  # noqa: E731
    return gram, own(fs[NP:]), own(fm), own(ic[:M]), own(ic[M:])
