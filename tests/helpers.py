"""Comparison helpers with the tolerances of docs/architecture.md (the kernel contract)."""
import math

import torch


def rand(shape, dtype, device="cpu", gen=None, scale=1.0, layout="contiguous"):
    """A random tensor of `shape` in `dtype`, laid out contiguous, transposed (stride(0) == 1) or as a strided
    slice of a larger tensor — the kernels must handle any strides."""
    r, c = shape
    if layout == "transposed":
        return (torch.randn(c, r, generator=gen) * scale).to(dtype).to(device).t()
    if layout == "sliced":
        big = (torch.randn(r + 3, 2 * c + 1, generator=gen) * scale).to(dtype).to(device)
        return big[3:, 1::2]
    return (torch.randn(r, c, generator=gen) * scale).to(dtype).to(device)


def assert_gram_close(got, ref, n_elems):
    """Sums: <= 1e-5 relative, with the absolute slack of an fp32 reduction of n_elems terms; counts and maxima
    exact."""
    g, rg = got.gram.double().cpu(), ref.gram.double().cpu()
    diag = torch.diagonal(rg, dim1=1, dim2=2)
    scale = torch.sqrt(diag[:, :, None] * diag[:, None, :])
    tol = 1e-5 * scale * max(1.0, math.sqrt(n_elems) / 16) + 1e-30
    assert ((g - rg).abs() <= tol).all(), f"gram mismatch: max err {(g - rg).abs().max()}"
    s, rs = got.abs_sum.double().cpu(), ref.abs_sum.double().cpu()
    assert ((s - rs).abs() <= 1e-5 * rs * max(1.0, math.sqrt(n_elems) / 16) + 1e-30).all(), "abs_sum mismatch"
    assert torch.equal(got.abs_max.cpu(), ref.abs_max.cpu()), "abs_max mismatch"
    assert torch.equal(got.zeros.cpu(), ref.zeros.cpu()), "zeros mismatch"
    assert torch.equal(got.near_zeros.cpu(), ref.near_zeros.cpu()), "near_zeros mismatch"
    assert got.gram.dtype == torch.float32 and got.zeros.dtype == torch.int64


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (x in float64)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(e - mant)


INDEX_LAYOUTS = ("list", "tensor", "strided", "int32", "expanded")


def index_as(ids, layout, gen=None):
    """The unit ids `ids` (a list) passed the way `layout` says: a list, a contiguous int64 tensor, a strided view
    (column 0 of an int64 [n, 2] tensor whose other column is junk), an int32 tensor, or, for a single repeated id,
    an expanded (stride 0) view. Every backend must read them as the same ids."""
    if layout == "list":
        return list(ids)
    if layout == "tensor":
        return torch.tensor(ids, dtype=torch.int64)
    if layout == "int32":
        return torch.tensor(ids, dtype=torch.int32)
    if layout == "strided":
        two = torch.full((len(ids), 2), 10 ** 6, dtype=torch.int64)  # junk in column 1: out of any range
        two[:, 0] = torch.tensor(ids, dtype=torch.int64)
        return two[:, 0]
    if layout == "expanded":
        if len(set(ids)) == 1:
            return torch.tensor(ids[:1], dtype=torch.int64).expand(len(ids))
        return torch.tensor(ids, dtype=torch.int64)[::1]
    raise ValueError(layout)


def strided_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of `t` (2-D) laid out contiguous, transposed (the values in column-major storage) or as a strided
    slice of a larger buffer, holding the same values."""
    r, c = t.shape
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        big = torch.zeros(r + 2, 2 * c + 1, dtype=t.dtype, device=t.device)
        v = big[2:, 1::2]
        v.copy_(t)
        return v
    return t.clone()
