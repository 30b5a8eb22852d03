"""Backends: one module per backend, each implementing the same kernel entry points (one of them optional).

`lpt_kernels.ops` validates every argument (shapes, dtypes, devices, index ranges, block divisibility) before it
calls a backend, so a backend may assume what follows. Every backend also keeps the contracts of docs/kernels.md bit
for bit: zero-size dimensions anywhere (no memory read through them), the near-zero bound as a rounded product plus
atol (never an fma), maxima that ignore NaN, raw-word copies for alpha == 1 with equal dtypes, and launches on the
tensors' device without host synchronisation.

``unit_gram(ws, axis, block, mode, index, atol, rtol) -> (gram, abs_sum, abs_max, zeros, near_zeros)``
    ``ws``: list of K >= 1 2-D tensors of one shape [R, N] on one device, dtypes in {bf16, fp16, fp32} (mixed
    allowed), arbitrary strides. ``axis`` 0 or 1; ``block`` divides ``shape[axis]``; unit u covers indices
    ``[u*block, (u+1)*block)`` along ``axis``. ``mode`` one of "consecutive" (d_m = w[m+1]-w[m], ref w[m]),
    "base" (d_m = w[m+1]-w[0], ref w[0]), "given" (d_m = w[m], ref 0); M = K-1 or K deltas (M >= 1).
    ``index``: None (all units, U = shape[axis] // block) or an int64 1-D tensor on the inputs' device with values in
    [0, shape[axis] // block) (duplicates allowed: gathered as listed; any strides: a backend reading it as a dense
    array makes it contiguous first), U = len(index). Any extent may be 0.
    Returns new tensors on the inputs' device: gram [U, M, M] float32 (full symmetric matrix), abs_sum [U, M]
    float32, abs_max [U, M] float32, zeros [U, M] int64 (d == 0 exactly), near_zeros [U, M] int64
    (|d| <= fl(fl(rtol * |ref|) + atol)). Values are loaded, widened to fp32, then differenced (exact for bf16/fp16).

``masked_cosine(ws, mode, a, b, index, axis, block) -> (pooled [] float32, per_unit [U] float32)`` (optional)
    The cosines of deltas a and b over the listed units, as ``unit_gram`` with atol = rtol = 0 followed by
    ``G[a,b] / sqrt(G[a,a] G[b,b])`` in fp64 (0 where the denominator is 0), per unit and over the units' summed Gram.
    Backends without it get that finish from ``lpt_kernels.ops`` in torch ops.

``act_stats_(x, stats, token_mask, threshold) -> None``
    ``x`` [T, C] (any float dtype above, any strides, T and C may be 0), ``stats`` [5, C] float64 on x's device,
    any strides; ``token_mask`` None or bool [T] on x's device, any stride. Adds, over the tokens whose mask is True: row 0 the
    token count, row 1 sum|x|, row 2 sum x^2, row 3 max|x| (max with the existing value), row 4 count(|x| > threshold).
    Must not synchronise with the host on a GPU.

``rollback_(target, source, index, axis, block, alpha, compact) -> None``
    ``target`` 2-D, any dtype above, any strides; ``source`` on target's device, any dtype above, any strides.
    ``index`` int64 1-D on target's device, unique and sorted, in range (possibly empty; target may be zero-size). If ``compact`` is False ``source`` has
    target's shape and unit u is read at the same place; if True ``source``'s extent along ``axis`` is
    ``len(index) * block`` and the i-th listed unit is read from position i. For every listed unit:
    target = round_to_target_dtype(t + alpha * (s - t)) computed in fp32 (fmaf(alpha, s - t, t)); alpha == 1 stores
    round(s) so the copy is exact. Nothing else in target is touched.
"""
