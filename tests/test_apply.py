"""Rollback application (lpt_kernels.analysis.apply): live into a model, and into a new checkpoint directory.

Checked on real sharded checkpoints written by save_pretrained: exactly the selected coordinates change (bit-exact
with alpha=1, within one ulp of the float64 lerp with alpha<1), every other byte of every output file equals the
target's, target and source are never modified (by hash), bad inputs fail before anything is written, and the
output appears only when complete (errors, disk full, interrupts and SIGKILL leave no final directory).
"""
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_factory import save_chain, tiny_qwen3_config
from helpers import ulp
from lpt_kernels.analysis import apply as A
from lpt_kernels.analysis.apply import RollbackError, rollback_checkpoint, rollback_model_
from lpt_kernels.analysis.selection import Selection, SelectionError
from lpt_kernels.checkpoint import Checkpoint, CheckpointError
from lpt_kernels.checkpoint.writer import MARKER
from lpt_kernels.layout import Layout, Member, detect_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = {"tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b"{}", "extra/notes.txt": b"kept\n"}


# ---- fixtures and helpers ----------------------------------------------------------------------------------------

def tree_hash(path):
    """sha256 of every file under path (or of the file), keyed by relative path."""
    out = {}
    if os.path.isfile(path):
        return {".": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """base (the source) and d1 (the target) as sharded bf16 checkpoints, plus tokenizer/extra files in d1."""
    root = tmp_path_factory.mktemp("apply")
    dirs, states = save_chain(str(root), n_domains=1)
    for rel, data in SIDE.items():
        p = os.path.join(dirs[1], rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").write(data)
    hashes = {d: tree_hash(d) for d in dirs}
    yield root, dirs[0], dirs[1], states[0], states[1]
    for d in dirs:  # no test may modify a checkpoint it read
        assert tree_hash(d) == hashes[d], f"{d} was modified"


def layout_of(path, groups=("mlp", "attn", "kv")):
    with Checkpoint(path) as c:
        return detect_layout({n: c.info(n).shape for n in c.names}, c.config, groups)


def full_selection(path):
    """Units in every group, several layers; unit 0 and the last unit included (edges)."""
    lay = layout_of(path)
    return Selection(lay, {"mlp": {0: [0, 5, 6, 7, 40], 2: [95, 3]}, "attn": {1: [0, 3]}, "kv": {0: [1], 2: [0]}})


def masks(selection, shapes):
    """tensor name -> bool mask of the coordinates the selection touches, built straight from the layout's
    definition (unit u of a member covers [u*block, (u+1)*block) along its axis), independently of the code under
    test."""
    out = {}
    for group, layers in selection.units.items():
        for layer, ids in layers.items():
            for m in selection.layout.groups[group][layer]:
                mk = out.setdefault(m.tensor, torch.zeros(shapes[m.tensor], dtype=torch.bool))
                for u in ids:
                    if m.axis == 0:
                        mk[u * m.block:(u + 1) * m.block] = True
                    else:
                        mk[:, u * m.block:(u + 1) * m.block] = True
    return out


def sel_tensors(selection):
    return {m.tensor for g, layers in selection.units.items() for layer in layers
            for m in selection.layout.groups[g][layer]}


def bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def lerp_ok(got, before, src, alpha):
    """Every element within one ulp (of got's dtype) of the float64 lerp."""
    t64, s64 = before.double(), src.double()
    exact = t64 + alpha * (s64 - t64)
    err = (got.double() - exact).abs()
    return bool((err <= ulp(exact, got.dtype) + 1e-30).all())


def expected_files(target, source, selection):
    """The exact bytes every output file must have with alpha=1: the target's, with the touched coordinates of each
    tensor holding the source's values (rounded to the target's dtype)."""
    tc, sc = Checkpoint(target), Checkpoint(source)
    shapes = {n: tc.info(n).shape for n in tc.names}
    want = {}
    for rel, _ in tree_hash(target).items():
        want[rel] = bytearray(open(os.path.join(target, rel), "rb").read())
    for name, m in masks(selection, shapes).items():
        info = tc.info(name)
        rel = os.path.relpath(info.file, target)
        t = torch.frombuffer(want[rel], dtype=info.dtype, count=info.numel, offset=info.start).view(info.shape)
        t[m] = sc.tensor(name).to(info.dtype)[m]
    tc.close()
    sc.close()
    return {k: bytes(v) for k, v in want.items()}


def no_temp_left(parent):
    return [e for e in os.listdir(parent) if ".tmp-" in e]


# ---- file rollback -------------------------------------------------------------------------------------------------

def test_file_rollback_exact_and_nothing_else(chain, tmp_path):
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt)
    out = tmp_path / "out"
    st = rollback_checkpoint(tgt, src, sel, out)
    assert os.path.isdir(out) and not no_temp_left(tmp_path)
    want = expected_files(tgt, src, sel)
    got = tree_hash(str(out))
    assert got.pop(MARKER, None) is not None  # the writer's record of what it wrote (lets --force replace it)
    assert set(got) == set(want), "the output does not hold exactly the target's files"
    for rel, data in want.items():
        assert open(os.path.join(out, rel), "rb").read() == data, f"{rel}: bytes differ from the expected"
    # the selection really changed something, and only in the shards holding touched tensors
    changed = {rel for rel in want if tree_hash(tgt)[rel] != got[rel]}
    with Checkpoint(tgt) as tc:
        touched_files = {os.path.relpath(tc.info(n).file, tgt) for n in sel_tensors(sel)}
    assert changed and changed <= touched_files
    assert st["files_patched"] == len(touched_files) and st["files_copied"] == len(want)
    assert st["bytes_read"] == st["bytes_touched"] > 0
    assert st["tensors"] == len(sel_tensors(sel)) and st["units"] == sel.count()
    # copies, not links
    for rel in want:
        a, b = os.stat(os.path.join(tgt, rel)), os.stat(os.path.join(out, rel))
        assert b.st_nlink == 1 and (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino)
    # a loadable checkpoint: safetensors reads every shard, and the touched values are the source's
    sd = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(out, f)))
    m = masks(sel, {k: v.shape for k, v in sd.items()})
    assert st["bytes_touched"] == sum(int(mk.sum()) for mk in m.values()) * 2  # bf16
    for name, mk in m.items():
        assert torch.equal(bits(sd[name][mk]), bits(s_state[name][mk]))
        assert torch.equal(bits(sd[name][~mk]), bits(t_state[name][~mk]))


def test_file_rollback_alpha_half(chain, tmp_path):
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt)
    rollback_checkpoint(tgt, src, sel, tmp_path / "half", alpha=0.5)
    moved = 0
    with Checkpoint(str(tmp_path / "half")) as oc:
        m = masks(sel, {n: oc.info(n).shape for n in oc.names})
        for name in oc.names:
            got = oc.tensor(name)
            if name in m:
                mk = m[name]
                assert torch.equal(bits(got[~mk]), bits(t_state[name][~mk]))
                assert lerp_ok(got[mk], t_state[name][mk], s_state[name][mk], 0.5)
                moved += int((got[mk] != t_state[name][mk]).sum())
            else:
                assert torch.equal(bits(got), bits(t_state[name]))
    assert moved > 100


def test_rollback_onto_itself_warns(chain, tmp_path):
    """TARGET and SOURCE the same files (here: the directory and its index): a mistyped command, said so."""
    root, src, tgt, s_state, t_state = chain
    with pytest.warns(RuntimeWarning, match="are the same files: the rollback changes nothing"):
        rollback_checkpoint(tgt, os.path.join(tgt, "model.safetensors.index.json"), full_selection(tgt),
                            tmp_path / "same")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rollback_checkpoint(tgt, src, full_selection(tgt), tmp_path / "other")


def test_file_rollback_fp32_source_into_bf16_target(chain, tmp_path):
    """fp32 master weights as the source: alpha=1 gives the source rounded to the target's bf16."""
    root, src, tgt, s_state, t_state = chain
    src32 = tmp_path / "src32"
    src32.mkdir()
    shutil.copy(os.path.join(src, "config.json"), src32)
    master = {k: (v.float() + torch.randn(v.shape) * 1e-4) for k, v in s_state.items()}
    save_file(master, str(src32 / "model.safetensors"), metadata={"format": "pt"})
    sel = full_selection(tgt)
    rollback_checkpoint(tgt, str(src32), sel, tmp_path / "out")
    with Checkpoint(str(tmp_path / "out")) as oc:
        for name, mk in masks(sel, {n: oc.info(n).shape for n in oc.names}).items():
            got = oc.tensor(name)
            assert got.dtype == torch.bfloat16
            assert torch.equal(bits(got[mk]), bits(master[name].to(torch.bfloat16)[mk]))
            assert torch.equal(bits(got[~mk]), bits(t_state[name][~mk]))


def test_single_file_target_and_symlinked_shards(chain, tmp_path):
    """A single .safetensors target gets its config and tokenizer files beside it; symlinked shards (a Hugging Face
    cache snapshot) are copied as regular files."""
    root, src, tgt, s_state, t_state = chain
    single = tmp_path / "single"
    single.mkdir()
    save_file(t_state, str(single / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(tgt, f), single)
    (single / "unrelated.bin").write_bytes(b"x" * 10)
    sel = full_selection(tgt)
    rollback_checkpoint(str(single / "model.safetensors"), src, sel, tmp_path / "o1")
    assert sorted(os.listdir(tmp_path / "o1")) == [MARKER, "config.json", "model.safetensors", "tokenizer.json"]
    o1 = load_file(str(tmp_path / "o1" / "model.safetensors"))

    snap, blobs = tmp_path / "snap", tmp_path / "blobs"
    snap.mkdir()
    blobs.mkdir()
    for f in os.listdir(tgt):
        p = os.path.join(tgt, f)
        if os.path.isfile(p):
            shutil.copy(p, blobs / f)
            os.symlink(blobs / f, snap / f)
    out2 = tmp_path / "o2"
    rollback_checkpoint(str(snap), src, sel, out2)
    for f in os.listdir(out2):
        assert not os.path.islink(out2 / f) and os.path.isfile(out2 / f)
    assert tree_hash(str(blobs)) == {k: v for k, v in tree_hash(tgt).items() if "/" not in k}
    o2 = {}
    for f in os.listdir(out2):
        if f.endswith(".safetensors"):
            o2.update(load_file(str(out2 / f)))
    assert o2 and o2.keys() <= o1.keys() and all(torch.equal(bits(o1[k]), bits(o2[k])) for k in o2)


def test_cross_axis_tensor_is_lerped_once(chain, tmp_path):
    """A custom layout touching rows and columns of one tensor: each element is moved once, also where they
    cross, in the live and in the file path."""
    root, src, tgt, s_state, t_state = chain
    down = "model.layers.1.mlp.down_proj.weight"
    lay = Layout(name="custom", groups={"cols": {1: [Member(down, 1, 1)]}, "rows": {1: [Member(down, 0, 2)]}},
                 units={"cols": 96, "rows": 32}, num_layers=2)
    sel = Selection(lay, {"cols": {1: [1, 2, 50]}, "rows": {1: [0, 7, 31]}})
    mk = masks(sel, {down: t_state[down].shape})[down]
    assert mk.sum() == 3 * 64 + 6 * 96 - 3 * 6
    state = {k: v.clone() for k, v in t_state.items()}
    st = rollback_model_(state, s_state, sel, alpha=0.25)
    assert st["elements"] == int(mk.sum())
    assert lerp_ok(state[down][mk], t_state[down][mk], s_state[down][mk], 0.25)
    assert torch.equal(bits(state[down][~mk]), bits(t_state[down][~mk]))
    rollback_checkpoint(tgt, src, sel, tmp_path / "x", alpha=0.25)
    with Checkpoint(str(tmp_path / "x")) as oc:
        assert torch.equal(bits(oc.tensor(down)), bits(state[down]))


# ---- live rollback ---------------------------------------------------------------------------------------------

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def load_model(path, device="cpu", dtype=torch.bfloat16):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(path, dtype=dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dir", "checkpoint", "state_dict"])
def test_live_rollback_exact(chain, device, kind):
    root, src, tgt, s_state, t_state = chain
    model = load_model(tgt, device)
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    sel = full_selection(tgt)
    source = {"dir": src, "checkpoint": Checkpoint(src), "state_dict": s_state}[kind]
    st = rollback_model_(model, source, sel)
    assert st["bytes_read"] == st["bytes_touched"] > 0 and st["tensors"] == len(sel_tensors(sel))
    m = masks(sel, {n: p.shape for n, p in model.named_parameters()})
    assert m
    for n, p in model.named_parameters():
        p = p.detach().cpu()
        if n in m:
            assert torch.equal(bits(p[m[n]]), bits(s_state[n][m[n]])), n
            assert torch.equal(bits(p[~m[n]]), bits(before[n][~m[n]])), n
        else:
            assert torch.equal(bits(p), bits(before[n])), n


@pytest.mark.parametrize("device", DEVICES)
def test_live_rollback_alpha_half_and_prefix(chain, device):
    """alpha=0.5 within one ulp; a bare Qwen3Model (names without the 'model.' prefix) works too."""
    root, src, tgt, s_state, t_state = chain
    model = load_model(tgt, device).model
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    sel = full_selection(tgt)
    rollback_model_(model, src, sel, alpha=0.5)
    m = masks(sel, {n: s_state[n].shape for n in s_state})
    for n, p in model.named_parameters():
        p, full = p.detach().cpu(), "model." + n
        if full in m:
            mk = m[full]
            assert lerp_ok(p[mk], before[n][mk], s_state[full][mk], 0.5), n
            assert torch.equal(bits(p[~mk]), bits(before[n][~mk])), n
        else:
            assert torch.equal(bits(p), bits(before[n])), n


def test_live_reads_only_selected_coordinates(chain, tmp_path):
    """Every source coordinate outside the selection is NaN in a poisoned copy of the source: the result is the
    same as with the clean source, so nothing outside the selection is used."""
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt)
    m = masks(sel, {n: v.shape for n, v in s_state.items()})
    poisoned = {n: torch.where(m[n], v, torch.full_like(v, float("nan"))) if n in m else
                torch.full_like(v, float("nan")) for n, v in s_state.items()}
    d = tmp_path / "poison"
    d.mkdir()
    save_file(poisoned, str(d / "model.safetensors"), metadata={"format": "pt"})
    a = {k: v.clone() for k, v in t_state.items()}
    b = {k: v.clone() for k, v in t_state.items()}
    rollback_model_(a, src, sel)
    rollback_model_(b, str(d), sel)
    assert all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    assert not any(torch.isnan(v).any() for v in b.values())


def test_fp32_model_from_bf16_source(chain):
    root, src, tgt, s_state, t_state = chain
    state = {k: v.float() for k, v in t_state.items()}
    before = {k: v.clone() for k, v in state.items()}
    sel = full_selection(tgt)
    rollback_model_(state, src, sel)
    for n, mk in masks(sel, {k: v.shape for k, v in state.items()}).items():
        assert torch.equal(state[n][mk], s_state[n].float()[mk]) and torch.equal(state[n][~mk], before[n][~mk])


def test_tied_aliases_lerped_once(chain):
    """Two names of one tensor (tied weights) both selected: alpha applies once."""
    root, src, tgt, s_state, t_state = chain
    down = "model.layers.0.mlp.down_proj.weight"
    lay = Layout(name="tied", groups={"a": {0: [Member(down, 1, 1)]}, "b": {0: [Member("alias", 1, 1)]}},
                 units={"a": 96, "b": 96}, num_layers=1)
    sel = Selection(lay, {"a": {0: [3, 4]}, "b": {0: [4, 9]}})
    t = t_state[down].clone()
    st = rollback_model_({down: t, "alias": t}, {down: s_state[down], "alias": s_state[down]}, sel, alpha=0.5)
    assert st["tensors"] == 1
    mk = torch.zeros_like(t, dtype=torch.bool)
    mk[:, [3, 4, 9]] = True
    assert lerp_ok(t[mk], t_state[down][mk], s_state[down][mk], 0.5)
    assert torch.equal(bits(t[~mk]), bits(t_state[down][~mk]))


# ---- bad inputs: checked before anything is written ------------------------------------------------------------

@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Checkpoints of other shapes: 4 layers (same widths), and a wider MLP (intermediate 128)."""
    root = tmp_path_factory.mktemp("other")
    deep, _ = save_chain(str(root / "deep"), n_domains=0, config=tiny_qwen3_config(layers=4))
    cfg = tiny_qwen3_config()
    cfg.intermediate_size = 128
    wide, _ = save_chain(str(root / "wide"), n_domains=0, config=cfg)
    return deep[0], wide[0]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf"), "1", True, None])
def test_bad_alpha(chain, tmp_path, alpha):
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt)
    with pytest.raises(RollbackError, match="alpha"):
        rollback_checkpoint(tgt, src, sel, tmp_path / "out", alpha=alpha)
    assert not os.path.exists(tmp_path / "out") and not no_temp_left(tmp_path)
    state = {k: v.clone() for k, v in t_state.items()}
    with pytest.raises(RollbackError, match="alpha"):
        rollback_model_(state, src, sel, alpha=alpha)
    assert all(torch.equal(bits(state[k]), bits(t_state[k])) for k in state)


def _unchanged(state, ref):
    return all(torch.equal(bits(state[k]), bits(ref[k])) for k in ref)


def test_selection_names_missing_tensor(chain, other, tmp_path):
    """A selection made on a 4-layer model names layer 3, which the 3-layer checkpoints lack; its valid slices
    (layer 0) are not applied either."""
    root, src, tgt, s_state, t_state = chain
    deep, _ = other
    sel = Selection(layout_of(deep), {"mlp": {0: [1, 2], 3: [5]}})
    with pytest.raises(RollbackError, match=r"model\.layers\.3\.mlp\.(gate|up|down)_proj\.weight"):
        rollback_checkpoint(tgt, src, sel, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not no_temp_left(tmp_path)
    state = {k: v.clone() for k, v in t_state.items()}
    with pytest.raises(RollbackError, match=r"model\.layers\.3\."):
        rollback_model_(state, src, sel)
    assert _unchanged(state, t_state)
    model = load_model(tgt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RollbackError, match="the model has no tensor"):
        rollback_model_(model, s_state, sel)
    assert _unchanged({n: p.detach() for n, p in model.named_parameters()}, before)


def test_selection_units_out_of_range(chain, other, tmp_path):
    root, src, tgt, s_state, t_state = chain
    _, wide = other
    sel = Selection(layout_of(wide), {"mlp": {0: [1], 1: [100]}})  # 128 units there, 96 here
    for call in (lambda: rollback_checkpoint(tgt, src, sel, tmp_path / "out"),
                 lambda: rollback_model_({k: v.clone() for k, v in t_state.items()}, src, sel)):
        with pytest.raises(RollbackError, match=r"layers\.1\.mlp\..*index 100 .*has only 96"):
            call()
    assert not os.path.exists(tmp_path / "out") and not no_temp_left(tmp_path)
    state = {k: v.clone() for k, v in t_state.items()}
    with pytest.raises(RollbackError):
        rollback_model_(state, s_state, sel)
    assert _unchanged(state, t_state)


def test_selection_blocks_do_not_fit(chain, tmp_path):
    """Heads of 24 rows on a tensor of 64 rows (a selection made for another head_dim): refused, nothing written."""
    root, src, tgt, s_state, t_state = chain
    q = "model.layers.0.self_attn.q_proj.weight"
    lay = Layout(name="other", groups={"attn": {0: [Member(q, 0, 24)]}}, units={"attn": 2}, num_layers=1)
    sel = Selection(lay, {"attn": {0: [0]}})
    state = {k: v.clone() for k, v in t_state.items()}
    with pytest.raises(RollbackError, match="units of 24 along axis 0.*not a multiple"):
        rollback_model_(state, src, sel)
    assert _unchanged(state, t_state)
    with pytest.raises(RollbackError, match="not a multiple"):
        rollback_checkpoint(tgt, src, sel, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_mismatched_checkpoints(chain, other, tmp_path):
    root, src, tgt, s_state, t_state = chain
    deep, wide = other
    sel = full_selection(tgt)
    with pytest.raises(RollbackError, match="mismatched checkpoints.*model.layers.3"):
        rollback_checkpoint(tgt, deep, sel, tmp_path / "out")
    shape_msg = r"mismatched checkpoints.*shape \(\d+, \d+\) in TARGET but \(\d+, \d+\) in SOURCE"
    with pytest.raises(RollbackError, match=shape_msg):
        rollback_checkpoint(tgt, wide, sel, tmp_path / "out")
    # without strict only the touched tensors are compared: the deeper source holds them all
    rollback_checkpoint(tgt, deep, Selection(layout_of(tgt), {"mlp": {0: [1]}}), tmp_path / "ok", strict=False)
    with pytest.raises(RollbackError, match=r"mismatched checkpoints: tensor .* shape"):
        rollback_checkpoint(tgt, wide, sel, tmp_path / "out", strict=False)
    state = {k: v.clone() for k, v in t_state.items()}
    with pytest.raises(RollbackError, match="shape"):
        rollback_model_(state, wide, sel)
    assert _unchanged(state, t_state)
    assert not os.path.exists(tmp_path / "out") and not no_temp_left(tmp_path)


def test_bad_source_dtype_and_meta(chain, tmp_path):
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt)
    ints = {k: (v * 100).to(torch.int16) for k, v in s_state.items()}
    d = tmp_path / "ints"
    d.mkdir()
    save_file(ints, str(d / "model.safetensors"))
    state = {k: v.clone() for k, v in t_state.items()}
    with pytest.raises(RollbackError, match="dtype int16"):
        rollback_model_(state, str(d), sel)
    with pytest.raises(RollbackError, match="dtype torch.int16"):
        rollback_model_(state, ints, sel)
    assert _unchanged(state, t_state)
    with pytest.raises(RollbackError, match="dtype"):
        rollback_checkpoint(tgt, str(d), sel, tmp_path / "out", strict=False)
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in t_state.items()}
    with pytest.raises(RollbackError, match="meta"):
        rollback_model_(meta, src, sel)
    with pytest.raises(RollbackError, match="state dict"):
        rollback_model_([1, 2], src, sel)
    assert not os.path.exists(tmp_path / "out")


def test_bad_paths_and_out(chain, tmp_path):
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(RollbackError, match="already exists and is not empty"):
        rollback_checkpoint(tgt, src, sel, existing)
    assert os.listdir(existing) == ["keep.txt"]
    with pytest.raises(RollbackError, match="is the input"):
        rollback_checkpoint(tgt, src, sel, tgt, force=True)
    with pytest.raises(RollbackError, match="is inside the input"):
        rollback_checkpoint(tgt, src, sel, os.path.join(tgt, "sub", "out"))
    assert not os.path.exists(os.path.join(tgt, "sub"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        rollback_checkpoint(str(tmp_path / "nope"), src, sel, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        rollback_model_({}, str(tmp_path / "nope"), sel)
    with pytest.raises(SelectionError):
        rollback_checkpoint(tgt, src, str(tmp_path / "nosel.json"), tmp_path / "out")
    with pytest.raises(RollbackError, match="selection"):
        rollback_checkpoint(tgt, src, {"mlp": {}}, tmp_path / "out")
    with pytest.raises(ValueError, match="backend"):
        rollback_checkpoint(tgt, src, sel, tmp_path / "out", backend="nope")
    state = {k: v.clone() for k, v in t_state.items()}
    with pytest.raises(ValueError, match="backend"):
        rollback_model_(state, src, sel, backend="nope")
    assert _unchanged(state, t_state)
    assert not os.path.exists(tmp_path / "out") and not no_temp_left(tmp_path)


def test_selection_file_and_nested_out(chain, tmp_path):
    """A selection given as its JSON path; the out's parent is created."""
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt)
    p = sel.save(str(tmp_path / "sel.json"))
    out = tmp_path / "a" / "b" / "out"
    rollback_checkpoint(tgt, src, p, out)
    want = expected_files(tgt, src, sel)
    assert all(open(out / rel, "rb").read() == data for rel, data in want.items())


# ---- atomicity: failures, interrupts, disk full, SIGKILL ---------------------------------------------------------

def test_error_during_write_removes_temp(chain, tmp_path, monkeypatch):
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt)
    calls = []
    real = A._Copier._copy

    def full_disk(self, i, a, b):
        calls.append(a)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, i, a, b)

    monkeypatch.setattr(A._Copier, "_copy", full_disk)
    with pytest.raises(RollbackError, match="No space left on device .writing model-00001-of-00004.safetensors") as e:
        rollback_checkpoint(tgt, src, sel, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out") and not no_temp_left(tmp_path)
    monkeypatch.setattr(A._Copier, "_copy", real)

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "_patch_shard", interrupt)
    with pytest.raises(KeyboardInterrupt):
        rollback_checkpoint(tgt, src, sel, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not no_temp_left(tmp_path)


def test_page_spans_cover_exactly_the_touched_pages():
    """The (vectorised) page spans used for read-ahead and pre-faulting cover the pages holding touched elements,
    and no other page."""
    P = A._PAGE
    gen = torch.Generator().manual_seed(3)

    def rint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    for _ in range(50):
        rows_n, cols_n = rint(1, 300), rint(1, 3000)
        start = rint(0, 5 * P) * 2
        rows = torch.unique(torch.randint(0, rows_n, (rint(1, 40),), generator=gen))
        spans = A._page_spans(start, (rows_n, cols_n), 2, {0: rows})
        got = {p for a, b in spans for p in range(a // P, (b - 1) // P + 1)}
        row = cols_n * 2
        want = {p for r in rows.tolist() for p in range((start + r * row) // P, (start + (r + 1) * row - 1) // P + 1)}
        assert got == want
        assert all(a % P == 0 and a < b for a, b in spans) and all(x[1] < y[0] for x, y in zip(spans, spans[1:]))
    assert A._page_spans(P + 6, (4, 8), 2, {1: torch.tensor([3])}) == [(P, P + 6 + 64)]
    assert A._page_spans(0, (4, 8), 2, {0: torch.empty(0, dtype=torch.int64)}) == []


def _run_py(code, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=e, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


ROLLBACK_CODE = """
    import sys
    from lpt_kernels.analysis.apply import rollback_checkpoint, RollbackError
    from lpt_kernels.analysis.selection import Selection
    sel = Selection.load({sel!r})
    {pre}
    try:
        rollback_checkpoint({tgt!r}, {src!r}, sel, {out!r})
    except RollbackError as e:
        print(f"error: {{e}}", file=sys.stderr)
        sys.exit(1)
"""


def rollback_code(tgt, src, sel, out, pre="pass"):
    return ROLLBACK_CODE.format(tgt=tgt, src=src, sel=sel, out=out, pre=pre)


def wait_for_pause(p, stage):
    """Read the subprocess's stderr up to the test hook's line saying it paused at `stage`."""
    line = p.stderr.readline()
    assert line.strip() == f"lpt-test-pause {stage}", line + p.stderr.read()


def test_disk_full_rlimit_fsize(chain, tmp_path):
    """RLIMIT_FSIZE below a shard's size: the copy fails with EFBIG (SIGXFSZ is not left to kill the process),
    the error is one line, no output or temp dir remains."""
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt).save(str(tmp_path / "sel.json"))
    out = str(tmp_path / "out")
    p = _run_py(rollback_code(tgt, src, sel, out, pre="import resource; "
                              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))"),
                env={"PYTHONDONTWRITEBYTECODE": "1"})
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and out in lines[0], err
    assert not os.path.exists(out) and not no_temp_left(tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_small_tmpfs(chain, small_tmpfs):
    """A filesystem too small for the checkpoint: ENOSPC mid-copy, one-line error, the filesystem left empty."""
    root, src, tgt, s_state, t_state = chain
    assert sum(os.path.getsize(os.path.join(tgt, f)) for f in os.listdir(tgt)
               if os.path.isfile(os.path.join(tgt, f))) > 160 * 1024
    with pytest.raises(RollbackError, match="No space left on device") as e:
        rollback_checkpoint(tgt, src, full_selection(tgt), small_tmpfs / "out")
    assert "\n" not in str(e.value)
    assert os.listdir(small_tmpfs) == []


def _wait_for_temp(parent, p, min_files=1, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        tmps = [os.path.join(parent, e) for e in no_temp_left(parent)]
        if tmps and sum(len(f) for _, _, f in os.walk(tmps[0])) >= min_files:
            return tmps[0]
        if p.poll() is not None:
            raise AssertionError(f"the rollback ended before it could be killed: {p.communicate()}")
        time.sleep(0.002)
    raise AssertionError("no temp dir appeared")


@pytest.mark.parametrize("stage", ["copied", "patched"])
def test_sigkill_mid_write_leaves_no_output(chain, tmp_path, stage):
    """SIGKILL while the output is half written ("copied": some files in the temp dir; "patched": a shard's shared
    writable mapping open with unflushed writes): no output directory, target and source intact; the next run to
    the same output removes the dead run's temp dir and completes."""
    root, src, tgt, s_state, t_state = chain
    sel_obj = full_selection(tgt)
    sel = sel_obj.save(str(tmp_path / "sel.json"))
    out = str(tmp_path / "out")
    hashes = {d: tree_hash(d) for d in (src, tgt)}
    p = _run_py(rollback_code(tgt, src, sel, out), env={"LPT_APPLY_TEST_PAUSE": f"{stage}:60"})
    wait_for_pause(p, stage)
    tmp = _wait_for_temp(str(tmp_path), p, min_files=1)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    assert os.path.isdir(tmp) and os.path.basename(tmp).startswith(".out.tmp-")
    assert {d: tree_hash(d) for d in (src, tgt)} == hashes
    st = rollback_checkpoint(tgt, src, sel, out)
    assert st["stale_removed"] == [tmp] and not no_temp_left(str(tmp_path))
    want = expected_files(tgt, src, sel_obj)
    assert all(open(os.path.join(out, rel), "rb").read() == data for rel, data in want.items())


def test_sigkill_unpaused_large_checkpoint(tmp_path):
    """No test hook: a ~100 MB checkpoint, SIGKILLed as soon as its temp dir appears (mid-copy)."""
    gen = torch.Generator().manual_seed(0)
    big = {f"model.layers.{i}.mlp.{p}.weight": torch.randn(2048 if p != "down_proj" else 1024,
                                                          1024 if p != "down_proj" else 2048, generator=gen
                                                          ).to(torch.bfloat16)
           for i in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    dirs = {}
    for k, name in enumerate(("src", "tgt")):
        d = tmp_path / name
        d.mkdir()
        save_file({n: v + k for n, v in big.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs[name] = str(d)
    hashes = {d: tree_hash(d) for d in dirs.values()}
    lay = detect_layout({n: v.shape for n, v in big.items()}, None, ("mlp",))
    sel = Selection(lay, {"mlp": {i: list(range(0, 2048, 50)) for i in range(8)}}).save(str(tmp_path / "s.json"))
    work = tmp_path / "w"
    work.mkdir()
    out = str(work / "out")
    p = _run_py(rollback_code(dirs["tgt"], dirs["src"], sel, out))
    _wait_for_temp(str(work), p, min_files=1)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL and not os.path.exists(out)
    assert {d: tree_hash(d) for d in dirs.values()} == hashes


def test_sigterm_cleans_up(chain, tmp_path):
    root, src, tgt, s_state, t_state = chain
    sel = full_selection(tgt).save(str(tmp_path / "sel.json"))
    out = str(tmp_path / "out")
    p = _run_py(rollback_code(tgt, src, sel, out), env={"LPT_APPLY_TEST_PAUSE": "copied:60"})
    wait_for_pause(p, "copied")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "KeyboardInterrupt" in err
    assert not os.path.exists(out) and not no_temp_left(str(tmp_path))


def test_stale_temp_of_live_process_is_kept(chain, tmp_path):
    """Only leftovers whose process is gone are removed (a concurrent run's temp dir is not)."""
    root, src, tgt, s_state, t_state = chain
    live = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"
    live.mkdir()
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = tmp_path / f".out.tmp-{dead_pid}-deadbeef"
    dead.mkdir()
    (dead / "junk").write_bytes(b"x")
    st = rollback_checkpoint(tgt, src, full_selection(tgt), tmp_path / "out")
    assert st["stale_removed"] == [str(dead)] and live.exists() and not dead.exists()


def test_copier_publishes_a_file_only_once_it_has_its_full_length(tmp_path, monkeypatch):
    """A patcher waits for offset 0 of a file before mapping it: that must mean the file exists at full length
    (regression: the first file counted as published before the copy thread had created it)."""
    src, dst = tmp_path / "a.bin", tmp_path / "b.bin"
    src.write_bytes(os.urandom(1 << 20))

    def slow_reflink(src_fd, dst_fd):
        time.sleep(0.3)  # the window between creating the file and sizing it
        return False
    monkeypatch.setattr(A, "_try_reflink", slow_reflink)
    copier = A._Copier([(str(src), str(dst))])
    copier.start()
    copier.wait_for(0, 0)
    assert os.path.getsize(dst) == 1 << 20
    copier.wait_for(0, None)
    copier.join()
    assert dst.read_bytes() == src.read_bytes()
