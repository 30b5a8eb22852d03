"""unit_gram: per-unit Gram matrix and |d| statistics of K inputs, one pass, every input byte read once.

Two kernels, picked by which axis of the inputs is contiguous in memory (not by ``axis``, so transposed views stay
coalesced):

* ``_gram_rows_kernel`` — the reduction axis is contiguous (axis 0 on row-major weights: gate/up/q/k/v rows).
  One program per (unit, slice of the unit's ``block`` lines) streams the lines in BLOCK_N chunks.
* ``_gram_cols_kernel`` — the unit axis is contiguous (axis 1 on row-major weights: down_proj/o_proj columns).
  Tile programs over (column tile, row chunk) read rows coalesced and write per-column partials.

Both write fp32/int32 partials ``[chunks, stat, units]`` that torch ops reduce (sum / amax) and fold over the block
columns of a unit; no host synchronisation anywhere. Grids are whole waves of the programs that fit on the device
(the compiled kernel's occupancy, ``_launch``), and every launch runs on the inputs' device.

The near-zero bound ``atol + rtol * |w_ref|`` is a rounded product plus atol, never an fma (the contract of every
backend, docs/kernels.md): Triton's compiler contracts ``a * b + c`` by default, so on CUDA the bound is PTX
``mul.rn.f32`` + ``add.rn.f32`` (explicit rounding: never fused, subnormals kept); the interpreter's numpy arithmetic
never fuses.

Cost per element position (K inputs, M deltas): sum_k itemsize_k bytes read (no writes beyond the tiny partials);
about M*(M+1) FLOPs for the Gram entries (multiply-add per upper-triangle pair) plus ~8*M for the |d| sum, max and the
two counts. For K <= 5 bf16 inputs that is < 4 FLOP/byte, well under the H100 ridge (~20 FLOP/byte fp32): memory-bound.
"""
import torch
import triton
import triton.language as tl

from ._launch import fit_split, on_device, resident_programs

MODES = {"consecutive": 0, "base": 1, "given": 2}

# Programs to aim for off CUDA (None: 1, as the interpreter runs programs one after the other); tests set it to
# exercise the multi-chunk paths. On CUDA the grid is sized from the compiled kernel's occupancy.
TARGET_PROGRAMS = None
# None: pick the kernel from the strides; "rows" / "cols" force one (tests).
FORCE_KERNEL = None


def _pow2_floor(x):
    return 1 << (max(int(x), 1).bit_length() - 1)


@triton.jit
def _near_bound(r, atol, rtol, RN_LIB: tl.constexpr):
    # atol + rtol * |r| with the product rounded on its own (never an fma): see the module docstring.
    if RN_LIB:
        # PTX mul.rn / add.rn: never contracted, and no flush of subnormals (libdevice's mul_rn would be .ftz).
        b = tl.inline_asm_elementwise("{ .reg .f32 p; mul.rn.f32 p, $1, $2; add.rn.f32 $0, p, $3; }", "=f,f,f,f",
                                      [tl.abs(r), rtol + tl.zeros_like(r), atol + tl.zeros_like(r)], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        b = rtol * tl.abs(r)
        b = b + atol
    return b


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
                NEAR: tl.constexpr, USE_REF: tl.constexpr, RN_LIB: tl.constexpr):
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
        # a > 0 drops NaN: maxima ignore NaN on every backend (docs/kernels.md), and tl.max stays NaN-free.
        new = new + (tl.maximum(acc[NP + M + m], tl.max(tl.where(a > 0, a, 0.0), axis=AXIS)),)
    for m in tl.static_range(M):
        d = _delta(w, m, MODE)
        new = new + (acc[NP + 2 * M + m] + tl.sum(((d == 0) & valid).to(tl.int32), axis=AXIS),)
    for m in tl.static_range(M):
        if NEAR:
            a = tl.abs(_delta(w, m, MODE))
            if USE_REF:
                tol = _near_bound(_ref(w, m, MODE), atol, rtol, RN_LIB)
            else:
                tol = atol
            new = new + (acc[NP + 3 * M + m] + tl.sum(((a <= tol) & valid).to(tl.int32), axis=AXIS),)
        else:
            new = new + (acc[NP + 3 * M + m],)
    return new


@triton.jit(do_not_specialize=["lines_per"])  # set from this kernel's occupancy: one compile
def _gram_rows_kernel(ptrs, s_line, s_red, idx_ptr, fsum, fmax, icnt, U, R, block, lines_per, atol, rtol,
                      K: tl.constexpr, M: tl.constexpr, MODE: tl.constexpr, HAS_INDEX: tl.constexpr,
                      NEAR: tl.constexpr, USE_REF: tl.constexpr, RN_LIB: tl.constexpr, BLOCK_N: tl.constexpr,
                      V: tl.constexpr):
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
            acc = _accumulate(acc, w, valid, atol, rtol, M, MODE, 1, NEAR, USE_REF, RN_LIB)
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


@triton.jit(do_not_specialize=["rows_per"])  # set from this kernel's occupancy: one compile
def _gram_cols_kernel(ptrs, s_line, s_red, idx_ptr, fsum, fmax, icnt, UB, R, block, rows_per, atol, rtol,
                      K: tl.constexpr, M: tl.constexpr, MODE: tl.constexpr, HAS_INDEX: tl.constexpr,
                      NEAR: tl.constexpr, USE_REF: tl.constexpr, RN_LIB: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr, V: tl.constexpr):
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
        acc = _accumulate(acc, w, valid, atol, rtol, M, MODE, 0, NEAR, USE_REF, RN_LIB)
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
    with on_device(ws[0].device):
        return _unit_gram(ws, axis, block, mode, index, atol, rtol)


def rows_meta(K, R):
    """Block sizes of the rows kernel for K inputs and reduction length R. More inputs -> shorter vectors per thread
    (the K loaded values and the NP+4M accumulators share registers)."""
    V = 8 if K <= 4 else 4
    BLOCK_N = min(V * 32 * 4, max(V, triton.next_power_of_2(R)))
    return dict(BLOCK_N=BLOCK_N, V=V, num_warps=max(1, min(4, BLOCK_N // (32 * V))))


def cols_meta(K, M, UB, R):
    """Block sizes of the cols kernel for K inputs, M deltas, UB unit lines and R rows. Per-thread lines V: the
    NP+4M accumulators of V lines each should stay within ~64 registers; rows per tile: ~64 loaded values per thread
    in flight."""
    NP = M * (M + 1) // 2
    V = max(1, min(8, _pow2_floor(64 // (NP + 4 * M))))
    BLOCK_C = min(V * 32 * 4, triton.next_power_of_2(UB))
    V = min(V, BLOCK_C)
    BLOCK_R = max(1, min(16, _pow2_floor(64 // (K * V)), triton.next_power_of_2(R)))
    return dict(BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, V=V, num_warps=max(1, min(4, BLOCK_C // (32 * V))))


_pairs = {}


def _symmetric_pairs(M, dev):
    """[M*M] positions in the upper-triangle partials of every (a, b) entry of the Gram matrix (row-major), on `dev`
    (made once per device: no per-call index upload)."""
    key = (M, dev)
    if key not in _pairs:
        p = [[0] * M for _ in range(M)]
        q = 0
        for a in range(M):
            for b in range(a, M):
                p[a][b] = p[b][a] = q
                q += 1
        _pairs[key] = torch.tensor(p, dtype=torch.int64).reshape(-1).to(dev)
    return _pairs[key]


def _unit_gram(ws, axis, block, mode, index, atol, rtol):
    K = len(ws)
    MODE = MODES[mode]
    M = K if MODE == 2 else K - 1
    NP = M * (M + 1) // 2
    dev = ws[0].device
    L, R = ws[0].shape[axis], ws[0].shape[1 - axis]
    U = L // block if index is None else index.numel()
    if U == 0 or R == 0:
        z = torch.zeros
        return (z(U, M, M, device=dev), z(U, M, device=dev), z(U, M, device=dev),
                z(U, M, dtype=torch.int64, device=dev), z(U, M, dtype=torch.int64, device=dev))
    ptrs = tuple(ws)
    s_line = tuple(w.stride(axis) for w in ws)
    s_red = tuple(w.stride(1 - axis) for w in ws)
    # The kernels read the ids as a dense array (a strided view, e.g. ids[:, 0], would be read wrongly).
    idx = index.contiguous() if index is not None else ws[0]  # dummy pointer when there is no index
    atol, rtol = float(atol), float(rtol)
    flags = dict(K=K, M=M, MODE=MODE, HAS_INDEX=index is not None, NEAR=not (atol == 0.0 and rtol == 0.0),
                 USE_REF=rtol != 0.0 and MODE != 2, RN_LIB=dev.type == "cuda")
    key = (tuple(w.dtype for w in ws), tuple(sorted(flags.items())))
    kind = FORCE_KERNEL
    if kind is None:
        # Reduction axis contiguous (or the more nearly so) -> rows kernel; unit axis contiguous -> cols kernel.
        kind = "cols" if (s_line[0] == 1 and s_red[0] != 1 and L > 1) else "rows"

    if kind == "rows":
        meta = rows_meta(K, R)
        kw = dict(**meta, **flags)
        slots = resident_programs(_gram_rows_kernel, dev, ("rows", key, tuple(meta.values())),
                                  (ptrs, s_line, s_red, idx, torch.float32, torch.float32, torch.int64, U, R, block, 1,
                                   atol, rtol), kw)
        split = fit_split(U, block, slots or TARGET_PROGRAMS or 1)
        lines_per = triton.cdiv(block, split)
        split = triton.cdiv(block, lines_per)
        n = U
        fsum = torch.empty(split, NP + M, U, device=dev, dtype=torch.float32)
        fmax = torch.empty(split, M, U, device=dev, dtype=torch.float32)
        icnt = torch.empty(split, 2 * M, U, device=dev, dtype=torch.int64)
        _gram_rows_kernel[(U, split)](ptrs, s_line, s_red, idx, fsum, fmax, icnt, U, R, block, lines_per, atol, rtol,
                                      **kw)
    else:
        UB = U * block
        meta = cols_meta(K, M, UB, R)
        BLOCK_R = meta["BLOCK_R"]
        ctiles = triton.cdiv(UB, meta["BLOCK_C"])
        kw = dict(**meta, **flags)
        slots = resident_programs(_gram_cols_kernel, dev, ("cols", key, tuple(meta.values())),
                                  (ptrs, s_line, s_red, idx, torch.float32, torch.float32, torch.int32, UB, R, block, 1,
                                   atol, rtol), kw)
        chunks = fit_split(ctiles, triton.cdiv(R, BLOCK_R), slots or TARGET_PROGRAMS or 1)
        rows_per = triton.cdiv(triton.cdiv(R, chunks), BLOCK_R) * BLOCK_R
        chunks = triton.cdiv(R, rows_per)
        n = UB
        fsum = torch.empty(chunks, NP + M, UB, device=dev, dtype=torch.float32)
        fmax = torch.empty(chunks, M, UB, device=dev, dtype=torch.float32)
        icnt = torch.empty(chunks, 2 * M, UB, device=dev, dtype=torch.int32)
        _gram_cols_kernel[(ctiles, chunks)](ptrs, s_line, s_red, idx, fsum, fmax, icnt, UB, R, block, rows_per,
                                            atol, rtol, **kw)

    fs = fsum.sum(0)
    fm = fmax.amax(0)
    ic = icnt.sum(0, dtype=torch.int64)
    if n != U:  # cols kernel: fold the block lines of each unit
        fs = fs.view(NP + M, U, block).sum(-1)
        fm = fm.view(M, U, block).amax(-1)
        ic = ic.view(2 * M, U, block).sum(-1)
    gram = fs.index_select(0, _symmetric_pairs(M, dev)).view(M, M, U).permute(2, 0, 1).contiguous()
    # Always copies (never views of one buffer): outputs of a custom op may not alias each other.
    own = lambda x: x.t().clone(memory_format=torch.contiguous_format)  # noqa: E731
    return gram, own(fs[NP:]), own(fm), own(ic[:M]), own(ic[M:])
