"""Trainer checkpoints read in place: verl's FSDP rank shards and torch.distributed.checkpoint directories, written
by real gloo worlds of 2 and 3 processes from real DTensors (uneven shards, Shard(1) as well as Shard(0), replicated
tensors), read through Checkpoint(path), and used by diff, select and rollback (as the source) exactly as the same
weights saved as Hugging Face safetensors are."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from dist_helpers import spawn

from lpt_kernels.checkpoint import Checkpoint, CheckpointError, detect_format


def _odd_config():
    """A tiny Qwen3 with dims that split unevenly over 2 and 3 ranks (hidden 50, intermediate 77, vocab 127)."""
    from transformers import Qwen3Config
    return Qwen3Config(hidden_size=50, intermediate_size=77, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=127, tie_word_embeddings=True,
                       max_position_embeddings=64)


def _hf_state(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
    return out


def _placement(name, t):
    """Shard on dim 1 for the tensors whose units are columns (down_proj, o_proj) and for the embedding (verl shards
    the first dim divisible by the group, not always dim 0); Shard(0) for the rest; norms replicated."""
    from torch.distributed.tensor import Replicate, Shard
    if t.dim() == 1:
        return Replicate() if "q_norm" in name or "k_norm" in name else Shard(0)
    if name.endswith(("down_proj.weight", "o_proj.weight", "embed_tokens.weight")):
        return Shard(1)
    return Shard(0)


def _save_worker(rank, world, states_file, root):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    states = torch.load(states_file, weights_only=True)
    mesh = init_device_mesh("cpu", (world,))
    for label, sd in states.items():
        dsd = {k: distribute_tensor(v, mesh, [_placement(k, v)]) for k, v in sd.items()}
        vdir = os.path.join(root, "verl", label)
        os.makedirs(vdir, exist_ok=True)
        torch.save(dsd, os.path.join(vdir, f"model_world_size_{world}_rank_{rank}.pt"))
        dcp.save(dsd, checkpoint_id=os.path.join(root, "dcp", label))
        if label == "d1":  # a trainer's nested state: the model under one key, other entries beside it
            dcp.save({"model": dsd, "extra": {"step": torch.tensor(7), "note": "x"}},
                     checkpoint_id=os.path.join(root, "dcp-nested"))
        if rank == 0:
            with open(os.path.join(vdir, "fsdp_config.json"), "w") as f:
                json.dump({"FSDP_version": 2, "world_size": world}, f)
        # the local shards really are uneven somewhere, and some tensor is sharded on dim 1
        if label == "base":
            sizes = {k: tuple(v.to_local().shape) for k, v in dsd.items()}
            assert sizes["model.layers.0.mlp.down_proj.weight"][1] in (77 // world, 77 // world + 1)
            assert any(v.placements[0].is_shard(1) for v in dsd.values())


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def trainer_ckpts(request, tmp_path_factory):
    """HF safetensors chain (base, d1, d2) of a tiny fp32 Qwen3 and the same weights as verl and DCP checkpoints
    written by `world` gloo ranks."""
    from ckpt_factory import save_chain
    world = request.param
    root = tmp_path_factory.mktemp(f"trainer{world}")
    dirs, _ = save_chain(str(root / "hf"), n_domains=2, dtype=torch.float32, config=_odd_config(), shard="40KB")
    labels = [os.path.basename(d) for d in dirs]
    states = {lab: _hf_state(d) for lab, d in zip(labels, dirs)}
    torch.save(states, str(root / "states.pt"))
    spawn(_save_worker, world, str(root / "states.pt"), str(root))
    for lab, d in zip(labels, dirs):  # verl keeps the HF config under huggingface/, DCP users beside it
        os.makedirs(root / "verl" / lab / "huggingface")
        shutil.copy(os.path.join(d, "config.json"), root / "verl" / lab / "huggingface" / "config.json")
        shutil.copy(os.path.join(d, "config.json"), root / "dcp" / lab / "config.json")
    return {"world": world, "labels": labels, "states": states,
            "hf": [str(root / "hf" / lab) for lab in labels],
            "verl": [str(root / "verl" / lab) for lab in labels],
            "dcp": [str(root / "dcp" / lab) for lab in labels], "root": root}


def test_formats_read_every_tensor_exactly(trainer_ckpts):
    for fmt in ("verl", "dcp"):
        for lab, path in zip(trainer_ckpts["labels"], trainer_ckpts[fmt]):
            assert detect_format(path) == fmt
            want = trainer_ckpts["states"][lab]
            with Checkpoint(path) as ck:
                assert ck.format == fmt and sorted(ck.names) == sorted(want)
                assert ck.config["hidden_size"] == 50
                assert ck.nbytes == sum(v.numel() * v.element_size() for v in want.values())
                for n, w in want.items():
                    assert ck.info(n).shape == tuple(w.shape) and ck.info(n).dtype == w.dtype
                    assert torch.equal(ck.tensor(n), w), (fmt, n)
                    if w.dim() == 2:
                        assert torch.equal(ck.rows(n, 3, w.shape[0] - 2), w[3:-2])
                        for axis in (0, 1):
                            k = w.shape[axis]
                            ids = [k - 1, 0, k // 2, k // 2, 1]
                            assert torch.equal(ck.gather(n, ids, axis=axis), w.index_select(axis, torch.tensor(ids)))
                            got = ck.gather(n, ids, axis=axis, within=(2, w.shape[1 - axis] - 1))
                            assert torch.equal(got, w.index_select(axis, torch.tensor(ids)).narrow(
                                1 - axis, 2, w.shape[1 - axis] - 3)), (fmt, n, axis)


def test_dcp_prefix_selects_the_model_of_a_nested_state(trainer_ckpts):
    from lpt_kernels.checkpoint.dcp import DcpCheckpoint
    want = trainer_ckpts["states"]["d1"]
    path = str(trainer_ckpts["root"] / "dcp-nested")
    with Checkpoint(path) as ck:  # everything, flattened: the model's tensors under "model.", the step beside them
        assert sorted(ck.names) == sorted(["model." + n for n in want] + ["extra.step"])
    with DcpCheckpoint(path, prefix="model.") as ck:
        assert sorted(ck.names) == sorted(want)
        for n, w in want.items():
            assert torch.equal(ck.tensor(n), w), n


def test_verl_rows_of_one_shard_are_views_of_the_mapping(trainer_ckpts):
    """Rows inside one rank's Shard(0) shard come back as a view of that rank's memory-mapped file: no copy."""
    name = "model.layers.0.mlp.gate_proj.weight"  # Shard(0), 77 rows
    with Checkpoint(trainer_ckpts["verl"][1]) as ck:
        (off, size, local), = [p for p in ck._pieces[name] if p[0][0] == 0]
        r = ck.rows(name, 1, size[0] - 1)
        assert r.untyped_storage().data_ptr() == local.untyped_storage().data_ptr()
        assert torch.equal(r, trainer_ckpts["states"]["d1"][name][1:size[0] - 1])


def test_dcp_gather_reads_only_the_chunks_holding_the_units(trainer_ckpts):
    name = "model.layers.1.mlp.up_proj.weight"  # Shard(0): one saved chunk per rank
    with Checkpoint(trainer_ckpts["dcp"][0]) as ck:
        seen = []
        orig = ck._reader.read_data

        def spy(plan, planner):
            seen.extend(it.storage_index.offset for it in plan.items)
            return orig(plan, planner)

        ck._reader.read_data = spy
        got = ck.gather(name, [0, 2, 1])
        assert torch.equal(got, trainer_ckpts["states"]["base"][name][[0, 2, 1]])
        assert seen == [torch.Size([0, 0])]  # rank 0's chunk only


def _profiles_equal(a, b):
    assert a.deltas == b.deltas and a.groups == b.groups
    assert sorted(a.arrays) == sorted(b.arrays)
    for k in a.arrays:
        assert torch.equal(a.arrays[k], b.arrays[k]), k
    assert sorted(a.hist) == sorted(b.hist)
    for k in a.hist:
        assert torch.equal(a.hist[k], b.hist[k]), k
    assert a.tensors == b.tensors
    for k in ("skipped", "mixed_dtypes", "nonfinite", "units", "group_layers", "layout", "dtypes"):
        assert a.meta[k] == b.meta[k], k


def test_diff_select_rollback_accept_trainer_checkpoints(trainer_ckpts, tmp_path):
    from lpt_kernels.analysis import diff
    from lpt_kernels.analysis.apply import rollback_checkpoint, rollback_model_
    from lpt_kernels.analysis.select import conflict_scores, select

    labels = trainer_ckpts["labels"]
    ref = diff(trainer_ckpts["hf"], labels=labels, progress=False)
    for fmt in ("verl", "dcp"):
        _profiles_equal(diff(trainer_ckpts[fmt], labels=labels, progress=False), ref)
    # formats mixed in one pass
    mixed = [trainer_ckpts["hf"][0], trainer_ckpts["verl"][1], trainer_ckpts["dcp"][2]]
    _profiles_equal(diff(mixed, labels=labels, progress=False), ref)

    # select from that profile, roll d2 back toward d1 read from each format: identical outputs
    scores = conflict_scores(ref, "d1", "d2", None, groups=("mlp",))
    sel = select(scores, ref.layout, "MC", 0.25, ("mlp",))
    outs = {}
    for fmt in ("hf", "verl", "dcp"):
        out = tmp_path / f"rolled-{fmt}"
        st = rollback_checkpoint(trainer_ckpts["hf"][2], trainer_ckpts[fmt][1], sel, str(out), alpha=0.5)
        outs[fmt] = _hf_state(str(out))
        assert st["tensors"] > 0
    for fmt in ("verl", "dcp"):
        assert outs[fmt].keys() == outs["hf"].keys()
        for k in outs["hf"]:
            assert torch.equal(outs[fmt][k], outs["hf"][k]), (fmt, k)
    # live rollback of a state dict from each format, reading only the selected rows/columns
    live = {}
    for fmt in ("hf", "verl", "dcp"):
        sd = {k: v.clone() for k, v in trainer_ckpts["states"]["d2"].items()}
        st = rollback_model_(sd, trainer_ckpts[fmt][1], sel, alpha=0.5)
        live[fmt] = sd
        assert st["bytes_read"] <= st["elements"] * 4
    for fmt in ("verl", "dcp"):
        for k in live["hf"]:
            assert torch.equal(live[fmt][k], live["hf"][k]), (fmt, k)
            assert torch.equal(live[fmt][k], outs["hf"][k]) or k not in outs["hf"]


def test_cli_accepts_trainer_checkpoints(trainer_ckpts, tmp_path):
    lpt = [sys.executable, "-m", "lpt_kernels.cli"]
    run = lambda *a: subprocess.run(lpt + list(a), capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run("diff", *trainer_ckpts["verl"], "--out", str(tmp_path / "prof"), "-q")
    assert r.returncode == 0, r.stderr
    r = run("select", "--profile", str(tmp_path / "prof"), "--earlier", "d1", "--later", "d2", "--selector", "MC",
            "--budget", "0.1", "--out", str(tmp_path / "sel.json"))
    assert r.returncode == 0, r.stderr
    r = run("rollback", trainer_ckpts["hf"][2], "--from", trainer_ckpts["dcp"][1], "--select", str(tmp_path / "sel.json"),
            "--out", str(tmp_path / "rolled"), "-q")
    assert r.returncode == 0, r.stderr
    r = run("rollback", trainer_ckpts["verl"][2], "--from", trainer_ckpts["hf"][1], "--select",
            str(tmp_path / "sel.json"), "--out", str(tmp_path / "rolled2"), "-q")
    assert r.returncode == 1 and "can be a rollback SOURCE" in r.stderr and not (tmp_path / "rolled2").exists()


def test_bad_trainer_checkpoints_name_the_problem(trainer_ckpts, tmp_path):
    src = trainer_ckpts["verl"][0]
    world = trainer_ckpts["world"]
    bad = tmp_path / "missing-rank"
    shutil.copytree(src, bad)
    os.unlink(bad / f"model_world_size_{world}_rank_1.pt")
    with pytest.raises(CheckpointError, match="rank_1.pt is missing"):
        Checkpoint(str(bad))
    bad = tmp_path / "corrupt-rank"
    shutil.copytree(src, bad)
    with open(bad / f"model_world_size_{world}_rank_0.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="rank_0.pt: cannot read"):
        Checkpoint(str(bad))
    bad = tmp_path / "pickled-object"
    shutil.copytree(src, bad)
    torch.save({"x": torch.ones(2), "opt": torch.optim.SGD}, bad / f"model_world_size_{world}_rank_0.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(str(bad))
    bad = tmp_path / "dcp-corrupt"
    shutil.copytree(trainer_ckpts["dcp"][0], bad)
    with open(bad / ".metadata", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read the DCP metadata"):
        Checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="no tensor under prefix"):
        from lpt_kernels.checkpoint.dcp import DcpCheckpoint
        DcpCheckpoint(trainer_ckpts["dcp"][0], prefix="optim.")


def _ranked_worker(rank, world, ck, sel_path, root):
    """diff and rollback_checkpoint split over a world of 2 ranks, reading trainer checkpoints written by 2 or 3."""
    from lpt_kernels.analysis import diff
    from lpt_kernels.analysis.apply import rollback_checkpoint

    for fmt in ("verl", "dcp"):
        prof = diff(ck[fmt], labels=ck["labels"], progress=False, distributed=True)
        assert (prof is None) == (rank != 0)
        if rank == 0:
            assert prof.meta["world_size"] == world and len(prof.meta["ranks"]) == world
            prof.save(os.path.join(root, f"prof-{fmt}"))
        st = rollback_checkpoint(ck["hf"][2], ck[fmt][1], sel_path, os.path.join(root, f"rolled-{fmt}"), alpha=0.5,
                                 distributed=True)
        assert st["world_size"] == world


def test_diff_and_rollback_under_a_world_read_trainer_checkpoints(trainer_ckpts, tmp_path):
    """The ranked diff and rollback (what `lpt diff`/`lpt rollback` do under torchrun) take verl and DCP checkpoints
    of another world size and give the single-process results of the same weights in safetensors."""
    from lpt_kernels.analysis import Profile, diff
    from lpt_kernels.analysis.apply import rollback_checkpoint
    from lpt_kernels.analysis.select import conflict_scores, select

    labels = trainer_ckpts["labels"]
    ref = diff(trainer_ckpts["hf"], labels=labels, progress=False)
    sel = select(conflict_scores(ref, "d1", "d2", None, groups=("mlp",)), ref.layout, "MC", 0.25, ("mlp",))
    sel.save(str(tmp_path / "sel.json"))
    rollback_checkpoint(trainer_ckpts["hf"][2], trainer_ckpts["hf"][1], sel, str(tmp_path / "one"), alpha=0.5)
    ck = {k: trainer_ckpts[k] for k in ("labels", "hf", "verl", "dcp")}
    spawn(_ranked_worker, 2, ck, str(tmp_path / "sel.json"), str(tmp_path))
    want = _hf_state(str(tmp_path / "one"))
    for fmt in ("verl", "dcp"):
        got = Profile.load(str(tmp_path / f"prof-{fmt}"))
        _profiles_equal(got, ref)
        assert got.meta["world_size"] == 2 and sum(r["tensors"] for r in got.meta["ranks"]) == len(ref.tensors)
        rolled = _hf_state(str(tmp_path / f"rolled-{fmt}"))
        assert rolled.keys() == want.keys() and all(torch.equal(rolled[k], want[k]) for k in want), fmt
