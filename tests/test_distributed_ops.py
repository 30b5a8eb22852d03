"""The four ops on DTensors, in real gloo worlds of 2 and 3 processes: every placement (Shard(0), Shard(1), Replicate,
and 2-D meshes), uneven shards, units of block > 1 split across a shard boundary, index lists with duplicates,
mixed dtypes; results equal the single-process call on the full tensors (counts and maxima exact, sums within fp32
tolerance, rollback bit-exact), and the collectives each call makes are counted."""
import os

import pytest
import torch

from dist_helpers import count_collectives, mesh_cases, spawn

BF16, FP32 = torch.bfloat16, torch.float32


def _close(a, b, what, rtol=2e-5):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if b.numel() == 0:
        return
    scale = b.abs().max().clamp_min(1e-30)
    err = (a - b).abs().max()
    assert err <= rtol * scale + 1e-12, f"{what}: max error {float(err):.3g} vs scale {float(scale):.3g}"


def _assert_gram(got, want, what):
    _close(got.gram, want.gram, what + " gram")
    _close(got.abs_sum, want.abs_sum, what + " abs_sum")
    assert torch.equal(got.abs_max, want.abs_max), what + " abs_max"
    assert torch.equal(got.zeros, want.zeros), what + " zeros"
    assert torch.equal(got.near_zeros, want.near_zeros), what + " near_zeros"
    for t in got:
        assert type(t) is torch.Tensor, what + ": results must be plain tensors"


def _chain(gen, shape, k=3):
    """K versions of a weight with sparse changes (exact zeros in the deltas) and mixed dtypes."""
    w = [torch.randn(shape, generator=gen)]
    for _ in range(k - 1):
        d = torch.randn(shape, generator=gen) * 1e-2
        d[torch.rand(shape, generator=gen) < 0.4] = 0
        w.append(w[-1] + d)
    return [w[0].to(BF16)] + [x.to(FP32) for x in w[1:]]


def _ops_worker(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    import lpt_kernels as lk

    gen = torch.Generator().manual_seed(1234)  # the same global tensors on every rank
    log = []
    for label, mshape, placements in mesh_cases(world):
        mesh = init_device_mesh("cpu", mshape)
        sharded = any(p.is_shard() for p in placements)

        def dt(t):
            return distribute_tensor(t, mesh, placements)

        # ---- unit_gram: shapes with uneven shards and units split across boundaries (block 4: 20 = 5 units)
        for shape in ((20, 13), (13, 20)):
            ws = _chain(gen, shape)
            dws = [dt(w) for w in ws]
            for axis in (0, 1):
                for block in (1, 4) if shape[axis] % 4 == 0 else (1,):
                    n_units = shape[axis] // block
                    for mode in ("consecutive", "base", "given"):
                        for index in (None, [n_units - 1, 0, 2, 2, 1], []):
                            kw = dict(axis=axis, block=block, mode=mode, index=index, atol=1e-3, rtol=1e-2)
                            want = lk.unit_gram(ws, **kw)
                            with count_collectives() as n:
                                got = lk.unit_gram(dws, **kw)
                            what = f"{label} unit_gram {shape} axis {axis} block {block} {mode} index {index}"
                            _assert_gram(got, want, what)
                            assert n["all_reduce"] == (3 if sharded else 0), (what, n)
                            assert sum(n.values()) == n["all_reduce"], (what, n)
            # a plain tensor of the global shape beside DTensors: read at the DTensors' local rectangle
            got = lk.unit_gram([ws[0], dws[1], ws[2]], axis=0)
            _assert_gram(got, lk.unit_gram(ws, axis=0), f"{label} unit_gram mixed plain/DTensor")
        log.append(f"unit_gram {label} ok")

        # ---- masked_cosine: updates, (before, after) pairs, a chain, a pair beside an update
        a, b, c = _chain(gen, (20, 13))
        u, v = b.float() - a.float(), c.float() - b.float()
        da, db, dc, du, dv = (dt(x) for x in (a, b, c, u, v))
        for axis, block in ((0, 4), (1, 1), (0, 1)):
            n_units = (20, 13)[axis] // block
            idx = [n_units - 1, 0, 2, 2]
            for (x, y), (dx, dy) in (((u, v), (du, dv)), (((a, b), (b, c)), ((da, db), (db, dc))),
                                     (((a, b), (a, c)), ((da, db), (da, dc))), ((u, (b, c)), (du, (db, dc)))):
                want = lk.masked_cosine(x, y, idx, axis=axis, block=block)
                with count_collectives() as n:
                    got = lk.masked_cosine(dx, dy, idx, axis=axis, block=block)
                what = f"{label} masked_cosine axis {axis} block {block}"
                _close(got[0], want[0], what + " pooled", 1e-5)
                _close(got[1], want[1], what + " per unit", 1e-5)
                assert n["all_reduce"] == (1 if sharded else 0) and sum(n.values()) == n["all_reduce"], (what, n)
        log.append(f"masked_cosine {label} ok")

        # ---- rollback_: DTensor source, full source, memory-mapped checkpoint source; split units; alpha < 1
        t, s = _chain(gen, (20, 12), k=2)
        t = t.float()
        src_file = os.path.join(tmp, f"src-{label}.safetensors")
        if rank == 0:
            from safetensors.torch import save_file
            save_file({"w": s}, src_file)
        torch.distributed.barrier()
        from lpt_kernels.checkpoint import Checkpoint
        with Checkpoint(src_file) as ck:
            mapped = ck.tensor("w")
            for axis in (0, 1):
                for block in (1, 4):
                    n_units = (20, 12)[axis] // block
                    idx = [n_units - 1, 1, 1, 0]
                    for alpha in (1.0, 0.5):
                        want = t.clone()
                        lk.rollback_(want, s, idx, axis=axis, block=block, alpha=alpha)
                        for sname, source in (("dtensor", dt(s)), ("full", s), ("mapped", mapped)):
                            tgt = dt(t.clone())
                            with count_collectives() as n:
                                lk.rollback_(tgt, source, idx, axis=axis, block=block, alpha=alpha)
                            what = f"{label} rollback_ axis {axis} block {block} alpha {alpha} from {sname}"
                            assert sum(n.values()) == 0, (what, n)
                            assert torch.equal(tgt.full_tensor(), want), what
        log.append(f"rollback_ {label} ok")

    # ---- act_stats_: x [B, T, C] DTensor (tokens or channels sharded), token masks as DTensor or plain
    from torch.distributed.tensor import Replicate, Shard
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(3, 8, 10, generator=gen).to(BF16)
    mask = torch.rand(3, 8, generator=gen) > 0.3
    for xp in (Shard(0), Shard(1), Shard(2), Replicate()):
        dx = distribute_tensor(x, mesh, [xp])
        mp_ = xp if xp.is_shard() and xp.dim < 2 else Replicate()
        for m, dm in ((None, None), (mask, mask), (mask, distribute_tensor(mask, mesh, [mp_]))):
            want = lk.new_act_stats(10)
            got = lk.new_act_stats(10)
            what = f"act_stats_ x {xp} mask {type(dm).__name__}"
            for _ in range(2):  # accumulates in place, the maximum a running one
                lk.act_stats_(x, want, token_mask=m, threshold=0.5)
                with count_collectives() as n:
                    lk.act_stats_(dx, got, token_mask=dm, threshold=0.5)
                assert sum(n.values()) == (1 if xp.is_shard() else 0), (what, n)
            assert torch.equal(got[[0, 3, 4]], want[[0, 3, 4]]), what
            _close(got[[1, 2]], want[[1, 2]], what, 1e-5)
    log.append("act_stats_ ok")
    # ---- errors name the argument
    w0, w1 = distribute_tensor(torch.randn(8, 6), mesh, [Shard(0)]), distribute_tensor(torch.randn(8, 6), mesh,
                                                                                        [Shard(1)])
    for fn, msg in ((lambda: lk.unit_gram([w0, w1]), "ws[1]: placements"),
                    (lambda: lk.unit_gram([w0, torch.randn(8, 5)]), "ws[1]: shape"),
                    (lambda: lk.unit_gram([w0, w0], index=[8]), "index: unit id 8 out of range"),
                    (lambda: lk.unit_gram([w0, w0], block=3), "block: 3 does not divide"),
                    (lambda: lk.rollback_(torch.randn(8, 6), w0, [0]), "DTensor target"),
                    (lambda: lk.rollback_(w0, w1, [0]), "source: placements"),
                    (lambda: lk.masked_cosine(w0, w0, None), "index:")):
        with pytest.raises((ValueError, TypeError), match=msg.replace("[", r"\[").replace("]", r"\]")):
            fn()
    if rank == 0:
        with open(os.path.join(tmp, f"ops-{world}.log"), "w") as f:
            f.write("\n".join(log))


@pytest.mark.parametrize("world", [2, 3])
def test_ops_on_dtensors_equal_single_process(world, tmp_path):
    spawn(_ops_worker, world, str(tmp_path))
    log = (tmp_path / f"ops-{world}.log").read_text().splitlines()
    assert len(log) == 5 * 3 + 1, log  # 5 placements x (unit_gram, masked_cosine, rollback_) + act_stats_


def test_pieces_cover_the_local_range():
    from lpt_kernels.distributed import _pieces, chunk_extent
    for n in range(0, 30):
        for parts in (1, 2, 3, 4, 7):
            for block in (1, 2, 3, 5):
                if n % block:
                    continue
                seen = torch.zeros(n, dtype=torch.int64)
                for k in range(parts):
                    o, size = chunk_extent(n, parts, k)
                    for ls, ln, u0, cnt, blk in _pieces(o, size, block):
                        assert ln == cnt * blk and 0 <= ls and ls + ln <= size
                        g0 = o + ls
                        assert u0 == g0 // block and (g0 + ln - 1) // block == u0 + cnt - 1
                        seen[g0:g0 + ln] += 1
                assert torch.equal(seen, torch.ones(n, dtype=torch.int64)), (n, parts, block)


def test_partition_balances_bytes():
    from lpt_kernels.distributed import partition
    sizes = [389, 75, 75, 75, 75, 21, 21, 21, 21, 5, 5, 5, 5, 1, 1]
    for parts in (1, 2, 3, 4):
        out = partition(sizes, parts)
        assert sorted(i for p in out for i in p) == list(range(len(sizes)))
        assert all(p == sorted(p) for p in out)
        loads = [sum(sizes[i] for i in p) for p in out]
        assert max(loads) - min(loads) <= max(sizes) or parts == 1, loads
    assert partition([], 3) == [[], [], []]


def test_shard_region_follows_torch_chunk_and_refuses_other_placements():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import Partial

    from lpt_kernels.distributed import shard_region
    for n in range(0, 12):
        for parts in (1, 2, 3, 5):
            chunks = torch.arange(n).chunk(parts) if n else []
            for k in range(parts):
                off, size = shard_region((n, 4), (parts,), (k,), (Shard(0),))
                want = chunks[k] if k < len(chunks) else torch.empty(0)
                assert size == (want.numel(), 4) and (not want.numel() or off[0] == int(want[0]))
    assert shard_region((6, 5), (2, 3), (1, 2), (Shard(0), Shard(1))) == ((3, 4), (3, 1))
    assert shard_region((6, 5), (2, 3), (1, 2), (Replicate(), Shard(0))) == ((4, 0), (2, 5))
    with pytest.raises(ValueError, match="partial sums"):
        shard_region((6, 5), (2,), (0,), (Partial(),))
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        return
    with pytest.raises(ValueError, match="strided"):
        shard_region((6, 5), (2,), (0,), (_StridedShard(0, split_factor=2),))
