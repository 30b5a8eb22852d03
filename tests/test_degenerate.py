"""Degenerate tensors at the entry points above the ops (issue 11, item 1): zero-size dimensions in any position
and 0-d scalars in real checkpoints and models go through lpt diff, profile, select, both rollbacks and the hooks,
contributing 0 elements (a scalar: 1)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ckpt_factory import tiny_qwen3_config
from lpt_kernels.analysis import Profile, diff
from lpt_kernels.analysis.apply import rollback_checkpoint, rollback_model_
from lpt_kernels.analysis.select import conflict_scores, select
from lpt_kernels.checkpoint import Checkpoint
from lpt_kernels.cli import main

EXTRAS = {"extra.empty_rows": (3, 0), "extra.empty": (0,), "extra.empty_3d": (0, 4, 2), "extra.cols": (0, 5)}
SPEC = {  # the built-in Qwen3 groups plus groups whose members have a zero-size dimension
    "name": "qwen3_plus",
    "groups": {
        "mlp": [{"tensor": "model.layers.{layer}.mlp.gate_proj.weight", "axis": 0, "block": 1},
                {"tensor": "model.layers.{layer}.mlp.up_proj.weight", "axis": 0, "block": 1},
                {"tensor": "model.layers.{layer}.mlp.down_proj.weight", "axis": 1, "block": 1}],
        "hollow": {"0": [{"tensor": "extra.empty_rows", "axis": 0, "block": 1}]},   # 3 units of 0 elements
        "none": {"0": [{"tensor": "extra.cols", "axis": 1, "block": 1}]},           # 5 units of 0 elements
    },
}


def _save(root, name, model, scalar):
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for k, shape in EXTRAS.items():
        sd[k] = torch.zeros(shape, dtype=torch.bfloat16)
    sd["extra.scalar"] = torch.tensor(scalar, dtype=torch.float32)
    d = os.path.join(root, name)
    os.makedirs(d)
    save_file(sd, os.path.join(d, "model.safetensors"))
    model.config.to_json_file(os.path.join(d, "config.json"))
    return d


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    root = str(tmp_path_factory.mktemp("degenerate"))
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config()).to(torch.bfloat16)
    dirs = [_save(root, "base", model, 1.0)]
    gen = torch.Generator().manual_seed(1)
    for i, name in enumerate(("e", "l")):
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype))
        dirs.append(_save(root, name, model, 2.0 + i))
    spec = os.path.join(root, "spec.json")
    with open(spec, "w") as f:
        json.dump(SPEC, f)
    return root, dirs, spec


def test_lpt_diff_with_zero_size_and_scalar_tensors(ckpts, tmp_path):
    """Issue example: extra (3, 0) and (0,) tensors made `lpt diff` exit 1 with `log_hist input: null data pointer`."""
    root, dirs, spec = ckpts
    assert main(["diff", dirs[0], dirs[1], "--out", str(tmp_path / "p"), "-q"]) == 0
    prof = Profile.load(str(tmp_path / "p"))
    for k, shape in EXTRAS.items():
        t = prof.tensors[k]
        assert t["elements"] == 0 and t["shape"] == list(shape) and t["zeros"] == [0] and t["sq_norm"] == [0.0]
    s = prof.tensors["extra.scalar"]
    assert s["elements"] == 1 and s["shape"] == [] and s["sq_norm"] == [1.0] and s["zeros"] == [0]
    # the extras add 0 elements (the scalar 1) to the whole-model sparsity
    with Checkpoint(dirs[0]) as a, Checkpoint(dirs[1]) as b:
        total = sum(a.info(n).numel for n in a.names)
        zeros = sum(int((a.tensor(n).double() == b.tensor(n).double()).sum()) for n in a.names)
    assert prof.sparsity()["e"] == pytest.approx(zeros / total)


def test_groups_of_zero_size_units_profile_select_and_roll_back(ckpts, tmp_path):
    root, dirs, spec = ckpts
    prof = diff(dirs, layout=spec, progress=False)
    assert prof.stat("e", "hollow", "sq_norm").shape == (3, 3)  # [layers, units]; the group lives in layer 0
    assert prof.stat("l", "none", "zeros").shape == (3, 5) and prof.meta["group_layers"]["none"] == [0]
    assert float(prof.norm("l", "hollow").sum()) == 0.0
    s = conflict_scores(prof, "e", "l", None, groups=("mlp", "hollow", "none"))
    for g in ("hollow", "none"):  # nothing moved: nothing to choose, nothing spent
        with pytest.warns(RuntimeWarning, match=f"nothing selected: no unit of {g} is eligible"):
            sel = select(s, prof.layout, "M", 0.5, groups=(g,))
        assert sel.count() == 0 and sel.meta["budget_spent"] == 0
    joint = select(s, prof.layout, "MC", 0.1, groups=("mlp", "hollow", "none"))
    assert joint.count("mlp") > 0 and joint.count("hollow") == 0
    # a selection that names zero-size units is applied (nothing to move) by both rollbacks
    from lpt_kernels.analysis.selection import Selection

    sel = Selection(prof.layout, {"hollow": {0: [0, 2]}, "none": {0: [1, 4]}, "mlp": {1: [3]}})
    out = str(tmp_path / "rolled")
    stats = rollback_checkpoint(dirs[2], dirs[1], sel, out)
    assert stats["tensors"] == 5
    with Checkpoint(out) as r, Checkpoint(dirs[1]) as e, Checkpoint(dirs[2]) as l:
        g = "model.layers.1.mlp.gate_proj.weight"
        assert torch.equal(r.tensor(g)[3], e.tensor(g)[3]) and torch.equal(r.tensor(g)[4], l.tensor(g)[4])
        for k in EXTRAS:
            assert r.tensor(k).shape == l.tensor(k).shape
        assert float(r.tensor("extra.scalar")) == 3.0
    with Checkpoint(dirs[2]) as l:
        state = {n: l.tensor(n).clone() for n in l.names}
    live = rollback_model_(state, dirs[1], sel)
    assert live["tensors"] == 5 and state["extra.empty_rows"].shape == (3, 0)


def test_hooks_on_a_model_with_zero_size_parameters_and_activations():
    """ActivationStats on a forward with no tokens; GradientGram on a model whose parameters include (3, 0),
    (0, 4, 2) and 0-d tensors."""
    from lpt_kernels.hooks import ActivationStats, GradientGram

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({
                "up": torch.nn.Linear(6, 5, bias=False), "down": torch.nn.Linear(5, 6, bias=False)})])
            self.empty = torch.nn.Parameter(torch.zeros(3, 0))
            self.empty3 = torch.nn.Parameter(torch.zeros(0, 4, 2))
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            h = self.layers[0]["up"](x).relu()
            return self.layers[0]["down"](h) * self.scale + self.empty.sum() + self.empty3.sum()

    spec = {"groups": {"mlp": [{"tensor": "layers.{layer}.up.weight", "axis": 0, "block": 1},
                               {"tensor": "layers.{layer}.down.weight", "axis": 1, "block": 1}],
                       "hollow": {"0": [{"tensor": "empty", "axis": 0, "block": 1}]}}}
    model = Tiny()
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(0))
    with ActivationStats(model, layout=spec, groups=("mlp",)) as acts:
        model(x[:, :0])          # no token
        model(x[:0])             # no sequence
    assert acts.result().tokens() == 0
    with acts:
        model(x)
    assert acts.result().tokens() == 14
    gg = GradientGram(model, ["a", "b"], layout=spec, groups=("mlp", "hollow"))
    for d, xb in (("a", x[:1]), ("b", x[1:])):
        with gg.domain(d):
            model(xb).square().sum().backward()
        model.zero_grad()
    res = gg.result()
    assert res.param_gram["empty"].abs().sum() == 0 and res.param_gram["empty3"].abs().sum() == 0
    assert res.param_gram["scale"][0, 0] > 0
    assert res.unit_dot("a", "b", "hollow").shape == (1, 3) and float(res.unit_dot("a", "a", "hollow").sum()) == 0
