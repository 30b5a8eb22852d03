"""The `lpt` command end to end on real sharded checkpoints, and its bad-input behaviour (exit codes, one line)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from ckpt_factory import save_chain


def lpt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lpt_kernels.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    dirs, _ = save_chain(str(root), n_domains=3)
    return root, dirs


def test_diff_overlap_report(chain):
    root, dirs = chain
    out = str(root / "prof")
    r = lpt("diff", *dirs, "--out", out, "--atol", "1e-3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "profile.safetensors"))
    meta = json.load(open(os.path.join(out, "profile.json")))["meta"]
    assert meta["labels"] == ["base", "d1", "d2", "d3"] and meta["atol"] == 1e-3

    r = lpt("overlap", out, "--top", "0.1", "--group", "mlp", "--csv", str(root / "ov.csv"))
    assert r.returncode == 0, r.stderr
    assert "Jaccard" in r.stdout and "cosine d1 vs d2" in r.stdout
    assert open(root / "ov.csv").read().startswith("group,kind,a,b,layer,value")

    r = lpt("report", out)
    assert r.returncode == 0, r.stderr
    pngs = glob.glob(os.path.join(out, "report", "*.png"))
    assert {"sparsity.png", "jaccard_mlp.png", "shared_cosine_mlp.png", "hist_abs.png"} <= {os.path.basename(p) for p in pngs}
    html = open(os.path.join(out, "report", "report.html")).read()
    assert html.count("data:image/png;base64,") == len(pngs)  # self-contained


def test_help_and_usage_errors():
    r = lpt("--help")
    assert r.returncode == 0 and "diff" in r.stdout and "overlap" in r.stdout and "report" in r.stdout
    assert lpt("diff", "--help").returncode == 0
    assert lpt().returncode == 2
    assert lpt("diff", "only_one_arg").returncode == 2
    r = lpt("overlap", "x", "--top", "1.5")
    assert r.returncode == 2 and "--top" in r.stderr


def _one_line_error(r, *words):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs(chain, tmp_path):
    root, dirs = chain
    _one_line_error(lpt("diff", str(tmp_path / "nope"), dirs[1], "--out", str(tmp_path / "o")), "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(lpt("diff", str(empty), dirs[1], "--out", str(tmp_path / "o")), "empty")
    _one_line_error(lpt("overlap", str(tmp_path)), "not a profile")
    # a layout that does not fit: the spec names tensors the checkpoint lacks
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "bad", "layers": "encoder.layer.{layer}.",
                                "groups": {"mlp": [{"tensor": "encoder.layer.{layer}.ffn.weight", "axis": 0,
                                                    "block": 1}]}}))
    r = lpt("diff", *dirs[:2], "--out", str(tmp_path / "o"), "--layout", str(spec), "--groups", "mlp", "-q")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    # a truncated shard
    bad = tmp_path / "trunc"
    import shutil
    shutil.copytree(dirs[1], bad)
    shard = sorted(glob.glob(str(bad / "*.safetensors")))[-1]
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    _one_line_error(lpt("diff", dirs[0], str(bad), "--out", str(tmp_path / "o")), "trunc")
    assert not os.path.exists(tmp_path / "o" / "profile.json")


def test_mismatched_checkpoints_and_intersect(chain, tmp_path):
    root, dirs = chain
    other, _ = save_chain(str(tmp_path / "two"), n_domains=1,
                          config=__import__("ckpt_factory").tiny_qwen3_config(layers=2))
    r = lpt("diff", dirs[0], other[1], "--out", str(tmp_path / "o"), "-q")
    _one_line_error(r, "intersect")
    r = lpt("diff", dirs[0], other[1], "--out", str(tmp_path / "o"), "--intersect", "-q")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "o" / "profile.json"))["meta"]
    assert any("layers.2" in n for n in meta["skipped"])
