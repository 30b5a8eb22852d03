"""`lpt diff` and `lpt rollback` under torchrun itself (``python -m torch.distributed.run``, gloo, CPU, 2 and 3
ranks): the profile rank 0 writes is the single-process one (byte-identical arrays; profile.json equal but for
world_size and the per-rank split it records), the rolled-back checkpoint is byte-identical; and through the Python
API in spawned worlds: ranks other than 0 get None, a failure on one rank fails every rank and leaves nothing."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_helpers import spawn

def _torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "lpt_kernels.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _tree(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from ckpt_factory import save_chain
    root = tmp_path_factory.mktemp("torchrun")
    from lpt_kernels.cli import main
    dirs, _ = save_chain(str(root), n_domains=3)
    assert main(["diff", *dirs, "--out", str(root / "prof1"), "-q"]) == 0
    return root, dirs


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_diff_writes_the_single_process_profile(chain, nproc):
    root, dirs = chain
    out = root / f"prof-{nproc}"
    r = _torchrun(nproc, "diff", *dirs, "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    with open(root / "prof1" / "profile.safetensors", "rb") as a, open(out / "profile.safetensors", "rb") as b:
        assert a.read() == b.read()
    one, many = json.loads((root / "prof1" / "profile.json").read_text()), json.loads((out / "profile.json").read_text())
    assert one["meta"]["world_size"] == 1 and many["meta"]["world_size"] == nproc
    ranks = many["meta"]["ranks"]
    assert len(ranks) == nproc and all(x["tensors"] > 0 and x["bytes"] > 0 for x in ranks)
    assert sum(x["tensors"] for x in ranks) == one["meta"]["ranks"][0]["tensors"] == len(one["tensors"])
    assert sum(x["bytes"] for x in ranks) == one["meta"]["ranks"][0]["bytes"]
    for doc in (one, many):
        del doc["meta"]["world_size"], doc["meta"]["ranks"]
    assert one == many
    assert sorted(os.listdir(out)) == [".lpt-output.json", "profile.json", "profile.safetensors"]


def test_torchrun_rollback_writes_the_single_process_checkpoint(chain, tmp_path):
    from lpt_kernels.cli import main
    root, dirs = chain
    assert main(["select", "--profile", str(root / "prof1"), "--earlier", "d2", "--later", "d3", "--selector", "MC",
                 "--budget", "0.2", "--out", str(tmp_path / "sel.json")]) == 0
    args = [dirs[3], "--from", dirs[2], "--select", str(tmp_path / "sel.json"), "--alpha", "0.5"]
    assert main(["rollback", *args, "--out", str(tmp_path / "one"), "-q"]) == 0
    r = _torchrun(2, "rollback", *args, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 1 and "world_size 2" in r.stdout  # rank 0 reports, once
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    assert _tree(tmp_path / "one") != _tree(dirs[3])
    assert sorted(os.listdir(tmp_path)) == ["one", "sel.json", "two"]  # no temp left


def _api_worker(rank, world, dirs, root):
    import lpt_kernels.analysis.apply as apply
    import lpt_kernels.analysis.profile as profile
    from lpt_kernels.analysis import diff
    from lpt_kernels.analysis.apply import RollbackError, rollback_checkpoint
    from lpt_kernels.analysis.selection import Selection

    prof = diff(dirs, progress=False, distributed=True)
    assert (prof is None) == (rank != 0)
    if rank == 0:
        assert prof.meta["world_size"] == world
        prof.save(os.path.join(root, "api-prof"))
    # a failure in one rank's share of the pass fails every rank
    real = profile._pass

    def broken(*a, **k):
        if rank == 1:
            raise ValueError("disk on fire")
        return real(*a, **k)

    profile._pass = broken
    with pytest.raises((ValueError, RuntimeError), match="disk on fire"):
        diff(dirs, progress=False, distributed=True)
    profile._pass = real
    # a failure while one rank patches its files: nothing published, no temp left, every rank raises
    torch.distributed.barrier()
    sel = Selection.load(os.path.join(root, "sel.json"))
    real_patch = apply._patch_shard

    def broken_patch(*a, **k):
        if rank == 1:
            raise OSError(28, "No space left on device")
        return real_patch(*a, **k)

    apply._patch_shard = broken_patch
    out = os.path.join(root, "rolled")
    with pytest.raises(RollbackError, match="No space left|failed on another rank"):
        rollback_checkpoint(dirs[3], dirs[2], sel, out, distributed=True)
    apply._patch_shard = real_patch
    torch.distributed.barrier()
    assert not os.path.exists(out) and not [e for e in os.listdir(root) if ".tmp-" in e]
    st = rollback_checkpoint(dirs[3], dirs[2], sel, out, distributed=True)
    if rank == 0:
        assert st["world_size"] == world and len(st["ranks"]) == world
        assert sum(r["files"] for r in st["ranks"]) == st["files_copied"]
    # an existing output: refused on every rank before any work; with force, replaced by the one publish (the swap)
    forced = os.path.join(root, "forced")
    if rank == 0:  # an earlier output of the package (only those may be replaced, even with force)
        from lpt_kernels.checkpoint.writer import AtomicDir

        with AtomicDir(forced) as tmp, open(os.path.join(tmp, "old.txt"), "w") as f:
            f.write("an earlier output")
    torch.distributed.barrier()
    with pytest.raises(RollbackError, match="not empty"):
        rollback_checkpoint(dirs[3], dirs[2], sel, forced, alpha=0.5, distributed=True)
    torch.distributed.barrier()
    st = rollback_checkpoint(dirs[3], dirs[2], sel, forced, alpha=0.5, force=True, distributed=True)
    assert st["world_size"] == world
    torch.distributed.barrier()
    assert not os.path.exists(os.path.join(forced, "old.txt"))
    assert not [e for e in os.listdir(root) if ".tmp-" in e or ".old-" in e]


def test_python_api_in_a_spawned_world(chain, tmp_path):
    from lpt_kernels.cli import main
    root, dirs = chain
    assert main(["select", "--profile", str(root / "prof1"), "--earlier", "d2", "--later", "d3", "--selector", "M",
                 "--budget", "0.3", "--out", str(tmp_path / "sel.json")]) == 0
    spawn(_api_worker, 2, dirs, str(tmp_path))
    with open(root / "prof1" / "profile.safetensors", "rb") as a, \
            open(tmp_path / "api-prof" / "profile.safetensors", "rb") as b:
        assert a.read() == b.read()
    assert main(["rollback", dirs[3], "--from", dirs[2], "--select", str(tmp_path / "sel.json"), "--out",
                 str(tmp_path / "one"), "-q"]) == 0
    assert _tree(tmp_path / "one") == _tree(tmp_path / "rolled")
    assert main(["rollback", dirs[3], "--from", dirs[2], "--select", str(tmp_path / "sel.json"), "--alpha", "0.5",
                 "--out", str(tmp_path / "half"), "-q"]) == 0
    assert _tree(tmp_path / "half") == _tree(tmp_path / "forced") != _tree(tmp_path / "one")
