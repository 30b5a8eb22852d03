"""The shared element math (csrc/include/lpt/element.h) through the CPU kernels: conversions and rounding of
bf16/fp16 agree with torch bit for bit, including subnormals, overflow, infinities and NaN."""
import pytest
import torch

import lpt_kernels as L


def _specials():
    f32 = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 1e30, -1e30, float("inf"),
                        float("-inf"), 6.0e-8, 2.98e-8, 2.99e-8, 5.96e-8, 6.1e-5, 6.09e-5, 1e-40, 3.0e38,
                        3.4e38, 1.00390625, 1.01171875, 1.0009765625, 1.00146484375])
    gen = torch.Generator().manual_seed(0)
    rnd = torch.randn(4000, generator=gen) * torch.exp2(torch.randint(-30, 20, (4000,), generator=gen).float())
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (4000,), generator=gen, dtype=torch.int64).to(torch.int32)
    raw = bits.view(torch.float32)
    raw = raw[torch.isfinite(raw)]
    return torch.cat([f32, rnd, raw])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_to_narrow_rounding(dtype):
    src = _specials().reshape(-1, 1)
    t = torch.zeros_like(src, dtype=dtype)
    L.rollback_(t, src, torch.arange(src.shape[0]), backend="cpu")
    want = src.to(dtype)
    assert torch.equal(t.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_to_fp32_widening(dtype):
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    finite = every[torch.isfinite(every.float())].reshape(-1, 1)
    t = torch.zeros(finite.shape, dtype=torch.float32)
    L.rollback_(t, finite, torch.arange(finite.shape[0]), backend="cpu")
    assert torch.equal(t, finite.float())


def test_nan_stays_nan():
    src = torch.tensor([[float("nan")], [1.0]])
    for dtype in (torch.bfloat16, torch.float16):
        t = torch.zeros(2, 1, dtype=dtype)
        L.rollback_(t, src, [0, 1], alpha=0.5, backend="cpu")
        assert torch.isnan(t[0]).all() and t[1].item() == 0.5
