"""Cases only a GPU can run, for both GPU backends: launches on a device that is not the current one (two GPUs),
tensors past 2^31 elements, and no host synchronisation on the index and activation paths. Each is reported as
skipped on a machine without them; `python benchmarks/gpu_check.py` runs them (and the GPU cases of the other kernel
tests) whenever a GPU is lent."""
import pytest
import torch

import lpt_kernels as L
from conftest import gpu_params

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@needs_two
@pytest.mark.parametrize("backend", gpu_params())
def test_second_device_while_first_is_current(backend):
    """A model split over two GPUs: every op on cuda:1 tensors while cuda:0 is current runs on cuda:1 (its stream)
    and gives the reference's results."""
    dev = torch.device("cuda:1")
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(37, 29, generator=gen).to(torch.bfloat16) for _ in range(3)]
    x = torch.randn(4, 9, 29, generator=gen).to(torch.float16)
    mask = torch.rand(4, 9, generator=gen) > 0.3
    t, s = torch.randn(37, 29, generator=gen), torch.randn(37, 29, generator=gen).to(torch.bfloat16)
    with torch.cuda.device(0):
        g = L.unit_gram([w.to(dev) for w in ws], index=[3, 1, 3], atol=1e-3, rtol=1e-2, backend=backend)
        pooled, per = L.masked_cosine((ws[0].to(dev), ws[1].to(dev)), (ws[1].to(dev), ws[2].to(dev)), [0, 5],
                                      backend=backend)
        stats = L.act_stats_(x.to(dev), L.new_act_stats(29, dev), token_mask=mask.to(dev), backend=backend)
        tt = t.to(dev)
        L.rollback_(tt, s.to(dev), [2, 30], alpha=0.5, backend=backend)
        L.rollback_(tt, s, [7], backend=backend)  # source on the host: moved without a sync
        torch.cuda.synchronize(dev)
    rg = L.unit_gram(ws, index=[3, 1, 3], atol=1e-3, rtol=1e-2, backend="reference")
    assert torch.equal(g.zeros.cpu(), rg.zeros) and torch.equal(g.near_zeros.cpu(), rg.near_zeros)
    assert torch.allclose(g.gram.cpu(), rg.gram, rtol=1e-5, atol=1e-6)
    rp, rper = L.masked_cosine((ws[0], ws[1]), (ws[1], ws[2]), [0, 5], backend="reference")
    assert abs(pooled.item() - rp.item()) < 1e-5 and torch.allclose(per.cpu(), rper, atol=1e-5)
    rs = L.act_stats_(x, L.new_act_stats(29), token_mask=mask, backend="reference")
    assert torch.equal(stats[0].cpu(), rs[0]) and torch.allclose(stats.cpu(), rs, rtol=1e-5)
    rt = t.clone()
    L.rollback_(rt, s, [2, 30], alpha=0.5, backend="reference")
    L.rollback_(rt, s, [7], backend="reference")
    assert torch.allclose(tt.cpu(), rt, rtol=1e-6, atol=1e-7) and torch.equal(tt.cpu()[7], rt[7])


@needs_cuda
@pytest.mark.parametrize("backend", gpu_params())
def test_more_than_2_31_elements(backend):
    """65538 x 32768 bf16 tensors (2^31 + 65536 elements, 4.3 GB each): 64-bit offsets in every kernel. The values are
    zero but for a few known elements at both ends, so the expected statistics are exact numbers."""
    rows, cols = 65538, 32768
    if _free_bytes() < 3 * rows * cols * 2 + (1 << 30):
        pytest.skip("needs ~14 GB of free GPU memory")
    dev = torch.device("cuda")
    w0 = torch.zeros(rows, cols, dtype=torch.bfloat16, device=dev)
    w1 = torch.zeros_like(w0)
    w1[0, 0], w1[-1, 0], w1[-1, -1] = -2.0, 1.0, 3.0
    g = L.unit_gram([w0, w1], index=[0, rows - 1], backend=backend)
    assert g.sq_norm[:, 0].cpu().tolist() == [4.0, 10.0] and g.abs_max[:, 0].cpu().tolist() == [2.0, 3.0]
    assert g.zeros[:, 0].cpu().tolist() == [cols - 1, cols - 2]
    g = L.unit_gram([w0, w1], axis=1, backend=backend)  # every column unit: 2^31 + 65536 elements in one pass
    assert g.sq_norm[[0, cols - 1], 0].cpu().tolist() == [5.0, 9.0] and g.sq_norm[1:-1].sum().item() == 0.0
    assert g.zeros.sum().item() == rows * cols - 3
    stats = L.act_stats_(w1, L.new_act_stats(cols, dev), threshold=0.5, backend=backend).cpu()
    assert stats[0, 0].item() == rows and stats[2, 0].item() == 5.0 and stats[3, -1].item() == 3.0
    assert stats[4].sum().item() == 3.0
    L.rollback_(w0, w1, [rows - 1], backend=backend)
    assert w0[-1, 0].item() == 1.0 and w0[-1, -1].item() == 3.0 and torch.count_nonzero(w0).item() == 2
    del w0, w1
    torch.cuda.empty_cache()


@needs_cuda
@pytest.mark.parametrize("backend", gpu_params())
def test_no_host_sync(backend):
    """Ids given on the host are checked and de-duplicated there and moved without a synchronisation; act_stats_
    with a mask never synchronises: torch's sync debug mode raises on any synchronising call."""
    dev = torch.device("cuda")
    ws = [torch.randn(64, 48, device=dev) for _ in range(3)]
    x, mask = torch.randn(5, 7, 48, device=dev), torch.rand(5, 7, device=dev) > 0.5
    t, s = torch.randn(64, 48, device=dev), torch.randn(64, 48)

    def calls():
        L.unit_gram(ws, index=[5, 3, 5], atol=1e-3, backend=backend)
        L.masked_cosine((ws[0], ws[1]), (ws[1], ws[2]), [1, 2], axis=1, backend=backend)
        L.act_stats_(x, L.new_act_stats(48, dev), token_mask=mask, backend=backend)
        L.rollback_(t, ws[2], [9, 2, 9], alpha=0.5, backend=backend)
        L.rollback_(t, s, [4, 1], backend=backend)

    calls()  # compile and load the kernels first (not a stream synchronisation, but not what is tested here)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
