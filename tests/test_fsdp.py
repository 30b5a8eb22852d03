"""Models sharded with FSDP2 (``fully_shard`` on a CPU device mesh over gloo, 2 processes with Shard(0) and 3 with the
MLP's column-unit weights on Shard(1) through ``shard_placement_fn``): ActivationStats (each rank its own batches,
result() reduces), GradientGram (sharded gradients, through domain() and accumulate()), rollback_model_ (from a
safetensors checkpoint, a verl checkpoint, a DCP directory and a state dict) and DeltaTracker (local snapshot shards
in RAM or a file per rank; step metrics and profile()) give the numbers of one process on the unsharded model (that
sees every rank's batches, or holds the same values)."""
import copy
import json
import os

import pytest
import torch

from dist_helpers import count_collectives, spawn


def _close(a, b, what, rtol=1e-5):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, what
    if b.numel() == 0:
        return
    scale = b.abs().max().clamp_min(1e-30)
    err = (a - b).abs().max()
    assert err <= rtol * scale + 1e-12, f"{what}: max error {float(err):.3g} vs scale {float(scale):.3g}"


def _batches(world, steps, seed):
    """[step][rank] (input_ids, attention_mask with right padding) — the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        row = []
        for _ in range(world):
            ids = torch.randint(0, 128, (2, 7), generator=gen)
            mask = torch.ones(2, 7, dtype=torch.long)
            mask[1, 5:] = 0
            row.append((ids, mask))
        out.append(row)
    return out


def sync(model, ref):
    """Copy the sharded model's values into the single-process one (the gather moves weights: test only)."""
    with torch.no_grad():
        for (n, p), (m, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert n == m
            q.copy_(p.full_tensor())


def _fsdp_worker(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen3ForCausalLM

    from ckpt_factory import tiny_qwen3_config
    from lpt_kernels import distributed as ld
    from lpt_kernels.analysis.apply import rollback_model_
    from lpt_kernels.analysis.selection import Selection
    from lpt_kernels.hooks import ActivationStats, GradientGram
    from lpt_kernels.layout import detect_layout

    torch.manual_seed(0)
    cfg = tiny_qwen3_config(layers=2, tie=False)
    ref = Qwen3ForCausalLM(cfg).float()
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world,))
    # 3 ranks: the MLP's column-unit weights (down_proj) sharded on dim 1 through FSDP2's shard_placement_fn (FSDP2
    # shards dim 1 only evenly: 96 columns over 3); 2 ranks: FSDP2's default Shard(0) everywhere
    from torch.distributed.tensor import Shard
    col_units = {id(layer.mlp.down_proj.weight) for layer in model.model.layers}

    def placement(p):
        return Shard(1) if world == 3 and id(p) in col_units and p.shape[1] % world == 0 else None

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh)
    down = model.model.layers[0].mlp.down_proj.weight
    assert ld.is_dtensor(down) and down.placements == ((Shard(1),) if world == 3 else (Shard(0),))
    data = _batches(world, 2, seed=7)

    # ---- ActivationStats: each rank its own batches; result() reduces (two collectives)
    acts = ActivationStats(model, name="a")
    with acts, torch.no_grad():
        for step in data:
            ids, mask = step[rank]
            model(ids, attention_mask=mask)
    with count_collectives() as n:
        got = acts.result()
    assert n["all_reduce"] == 2 and sum(n.values()) == 2, n
    want_acts = ActivationStats(ref, name="a")
    with want_acts, torch.no_grad():
        for step in data:
            for ids, mask in step:
                ref(ids, attention_mask=mask)
    want = want_acts.result()
    assert got.meta["calls"] == want.meta["calls"] == {"a": 2 * world}
    for k in want.arrays:
        if k.endswith(("tokens", "active")):
            assert torch.equal(got.arrays[k], want.arrays[k]), k
        else:
            _close(got.arrays[k], want.arrays[k], k, 1e-5)
    assert acts.raw()[("mlp", 0)][0].max() < want_acts.raw()[("mlp", 0)][0].max()  # live buffers: this rank's only

    # ---- GradientGram: sharded gradients (domain() reads .grad; accumulate() too); FSDP's mean undone
    gg = GradientGram(model, ["a", "b"])
    gr = GradientGram(ref, ["a", "b"])
    assert gg.stored_bytes == 0 and gg.numel < gr.numel  # local shards only
    for d, seed in (("a", 11), ("b", 12)):
        for step in _batches(world, 2, seed):
            ids, mask = step[rank]
            if d == "a":
                with gg.domain(d):
                    model(ids, attention_mask=mask, labels=ids).loss.backward()
            else:
                model(ids, attention_mask=mask, labels=ids).loss.backward()
                gg.accumulate(d)
            model.zero_grad()
            with gr.domain(d):
                for ids, mask in step:
                    ref(ids, attention_mask=mask, labels=ids).loss.backward()
            ref.zero_grad()
    res, want = gg.result(), gr.result()
    assert res.meta["batches"] == {"a": 2 * world, "b": 2 * world} and want.meta["batches"] == {"a": 2, "b": 2}
    for name in want.param_gram:
        _close(res.param_gram[name], want.param_gram[name], f"gradient gram {name}", 1e-4)
    assert sorted(res.arrays) == sorted(want.arrays)
    for k in want.arrays:
        _close(res.arrays[k], want.arrays[k], k, 1e-4)

    # ---- rollback_model_: sharded parameters patched in place from a checkpoint, verl shards, a state dict
    names = [n for n, _ in ref.named_parameters()]
    lay = detect_layout({n: tuple(p.shape) for n, p in ref.named_parameters()}, cfg.to_dict(),
                        ("mlp", "attn", "kv"))
    sel = Selection(lay, {"mlp": {0: [0, 5, 95], 1: [3, 40]}, "attn": {1: [0, 3]}, "kv": {0: [1]}})
    src_model = copy.deepcopy(ref)
    with torch.no_grad():
        for p in src_model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    src_dir = os.path.join(root, "src")
    if rank == 0:
        src_model.save_pretrained(src_dir, max_shard_size="60KB")
    torch.distributed.barrier()
    # the same source as a verl checkpoint written by this world
    from torch.distributed.tensor import distribute_tensor
    vdir = os.path.join(root, "src-verl")
    os.makedirs(vdir, exist_ok=True)
    vsd = {k: distribute_tensor(v.detach(), mesh, [Shard(1 if v.dim() == 2 and "down" in k else 0)])
           for k, v in src_model.state_dict().items()}
    torch.save(vsd, os.path.join(vdir, f"model_world_size_{world}_rank_{rank}.pt"))
    if rank == 0:
        with open(os.path.join(vdir, "fsdp_config.json"), "w") as f:
            json.dump({"FSDP_version": 2, "world_size": world}, f)
    ddir = os.path.join(root, "src-dcp")  # and as a torch.distributed.checkpoint directory
    import torch.distributed.checkpoint as dcp
    dcp.save(vsd, checkpoint_id=ddir)
    torch.distributed.barrier()
    orig = {n: ld.local_tensor(p).detach().clone() for n, p in model.named_parameters()}
    for alpha in (1.0, 0.5):
        want_model = copy.deepcopy(ref)
        rollback_model_(want_model, src_dir, sel, alpha=alpha)
        want_sd = dict(want_model.named_parameters())
        for sname, source in (("safetensors", src_dir), ("verl", vdir), ("dcp", ddir),
                              ("state dict", src_model.state_dict())):
            with torch.no_grad():  # FSDP modules cannot be deep-copied: restore the local shards instead
                for n, p in model.named_parameters():
                    ld.local_tensor(p).copy_(orig[n])
            with count_collectives() as n:
                st = rollback_model_(model, source, sel, alpha=alpha)
            assert sum(n.values()) == 0, (sname, n)
            assert st["tensors"] == len({m.tensor for m, _ in sel.slices()}) == 10
            for name, p in model.named_parameters():
                assert torch.equal(p.full_tensor(), want_sd[name]), (sname, alpha, name)
    assert names

    # ---- DeltaTracker: each rank snapshots its local shards; metrics and profile() of the whole model
    from lpt_kernels.train import DeltaTracker
    with torch.no_grad():  # back to the initial values; the single-process model follows the sharded one exactly
        for n, p in model.named_parameters():
            ld.local_tensor(p).copy_(orig[n])
    for snap in ("cpu", "disk:" + os.path.join(root, "snaps")):
        sync(model, ref)
        tr = DeltaTracker(model, groups=("mlp", "attn"), snapshot=snap, atol=1e-4)
        rt = DeltaTracker(ref, groups=("mlp", "attn"), snapshot="cpu", atol=1e-4)
        assert tr.memory()["snapshots"] == 0 and DeltaTracker.snapshot_bytes(model) < DeltaTracker.snapshot_bytes(ref)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for d, seed in (("code", 21), ("math", 22)):
            tr.start_domain(d)
            rt.start_domain(d)
            for step in _batches(world, 2, seed):
                ids, mask = step[rank]
                model(ids, attention_mask=mask, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
                sync(model, ref)
                got, want = tr.step(), rt.step()
                assert sorted(got) == sorted(want) and got, (sorted(got), sorted(want))
                for k in want:
                    assert abs(got[k] - want[k]) <= 1e-5 * max(1.0, abs(want[k])) or (
                        got[k] != got[k] and want[k] != want[k]), (snap, k, got[k], want[k])
        pg, pw = tr.profile(), rt.profile()
        assert sorted(pg.arrays) == sorted(pw.arrays) and sorted(pg.hist) == sorted(pw.hist)
        for k in pw.arrays:
            if k.endswith(("zeros", "near_zeros")):
                assert torch.equal(pg.arrays[k], pw.arrays[k]), k
            else:
                _close(pg.arrays[k], pw.arrays[k], f"tracker {k}", 1e-5)
        for k in pw.hist:
            assert torch.equal(pg.hist[k], pw.hist[k]), k
        for n, e in pw.tensors.items():
            assert pg.tensors[n]["zeros"] == e["zeros"] and pg.tensors[n]["shape"] == e["shape"], n
        tr.close()
        rt.close()
    assert sorted(os.listdir(os.path.join(root, "snaps")))[:2] == ["00-base.rank0.safetensors",
                                                                     "00-base.rank1.safetensors"]
    if rank == 0:
        with open(os.path.join(root, "fsdp.ok"), "w") as f:
            f.write("ok")


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_models_equal_single_process(world, tmp_path):
    spawn(_fsdp_worker, world, str(tmp_path))
    assert (tmp_path / "fsdp.ok").read_text() == "ok"
