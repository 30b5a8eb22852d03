"""The A x M x C selector against brute-force scoring on a real sharded checkpoint chain."""
import math
import warnings

import pytest
import torch

from ckpt_factory import save_chain
from lpt_kernels.analysis import diff
from lpt_kernels.analysis.select import SelectError, conflict_scores, gradient_conflict, recovery, select
from lpt_kernels.analysis.selection import Selection, SelectionError
from lpt_kernels.checkpoint import Checkpoint
from lpt_kernels.layout import load_layout


class FakeActivations:
    """Stands in for an ActivationResult: the selector only reads .stat(group, stat, name)."""

    def __init__(self, arrays):
        self.arrays = arrays

    def stat(self, group, stat="mean_abs", name=None):
        return self.arrays[group]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    dirs, states = save_chain(str(tmp_path_factory.mktemp("sel")), n_domains=2, frac=0.5)
    prof = diff(dirs, progress=False)  # deltas d1 (E's own update), d2 (L's)
    ck = Checkpoint(dirs[0])
    layout = load_layout(None, {n: ck.info(n).shape for n in ck.names}, ck.config)
    gen = torch.Generator().manual_seed(0)
    acts = FakeActivations({g: torch.rand(3, layout.units[g], generator=gen, dtype=torch.float64)
                            for g in ("mlp", "attn")})
    return dirs, states, prof, layout, acts


def _brute(states, layer, group="mlp"):
    """Per-unit update vectors of E (d1) and L (d2) in layer `layer` (MLP neurons), float64."""
    p = f"model.layers.{layer}.mlp."
    def upd(a, b):
        return torch.cat([states[a][p + "gate_proj.weight"].double() - states[b][p + "gate_proj.weight"].double(),
                          states[a][p + "up_proj.weight"].double() - states[b][p + "up_proj.weight"].double(),
                          (states[a][p + "down_proj.weight"].double() - states[b][p + "down_proj.weight"].double()).t()], 1)
    return upd(1, 0), upd(2, 1)


def test_factors_match_brute_force(setup):
    dirs, states, prof, layout, acts = setup
    s = conflict_scores(prof, "d1", "d2", acts, groups=("mlp",))
    for layer in range(3):
        de, dl = _brute(states, layer)
        assert torch.allclose(s.M["mlp"][layer], dl.norm(dim=1), rtol=1e-5)
        den = de.norm(dim=1) * dl.norm(dim=1)
        cos = torch.where(den > 0, (de * dl).sum(1) / den.clamp_min(1e-300), 0.0)
        assert torch.allclose(s.C["mlp"][layer], (-cos).clamp_min(0), atol=1e-5)
    assert torch.equal(s.A["mlp"], acts.arrays["mlp"])
    assert s.unit_params["mlp"] == 3 * 64


@pytest.mark.parametrize("selector", ["AMC", "MC", "AM", "C"])
@pytest.mark.parametrize("allocation", ["conflict", "uniform", "activation"])
def test_budget_allocation_and_top_units(setup, selector, allocation):
    dirs, states, prof, layout, acts = setup
    s = conflict_scores(prof, "d1", "d2", acts, groups=("mlp",))
    sel = select(s, layout, selector, 0.1, allocation=allocation)
    per = sel.per_layer("mlp")
    total = round(0.1 * 3 * 96)
    assert sum(per) == total
    src = {"conflict": s.C["mlp"], "activation": s.A["mlp"], "uniform": torch.ones(3, 96)}[allocation]
    mass = src.double().clamp_min(0).sum(1)
    want = total * mass / mass.sum()
    assert all(abs(per[l] - want[l].item()) < 1 for l in range(3))  # proportional, largest remainders
    score = torch.ones(3, 96, dtype=torch.float64)
    for f in selector:
        score = score * getattr(s, f)["mlp"]
    for layer, ids in sel.units["mlp"].items():
        top = set(torch.topk(score[layer], len(ids)).indices.tolist())
        assert set(ids) == top


def test_random_is_seeded_with_same_allocation(setup):
    dirs, states, prof, layout, acts = setup
    s = conflict_scores(prof, "d1", "d2", acts, groups=("mlp",))
    a, b = select(s, layout, "random", 0.1, seed=3), select(s, layout, "random", 0.1, seed=3)
    c = select(s, layout, "random", 0.1, seed=4)
    amc = select(s, layout, "AMC", 0.1)
    assert a.units == b.units and a.units != c.units
    assert a.per_layer("mlp") == amc.per_layer("mlp")


def test_joint_groups_budget_in_parameters(setup):
    dirs, states, prof, layout, acts = setup
    s = conflict_scores(prof, "d1", "d2", acts, groups=("mlp", "attn"))
    sel = select(s, layout, "AMC", 0.2, groups=("mlp", "attn"))
    params = sel.count("mlp") * s.unit_params["mlp"] + sel.count("attn") * s.unit_params["attn"]
    total = 3 * (96 * s.unit_params["mlp"] + 4 * s.unit_params["attn"])
    assert abs(params - 0.2 * total) <= 3 * s.unit_params["attn"]  # within one head per layer
    assert sel.meta["budget_unit"] == "parameters"


def test_selection_file_roundtrip_and_bad_budget(setup, tmp_path):
    dirs, states, prof, layout, acts = setup
    s = conflict_scores(prof, "d1", "d2", acts, groups=("mlp",))
    sel = select(s, layout, "AMC", 0.05)
    sel.save(str(tmp_path / "sel.json"))
    back = Selection.load(str(tmp_path / "sel.json"))
    assert back.units == sel.units and back.meta["selector"] == "AMC" and back.meta["earlier"] == "d1"
    for beta in (0.0, 1.5, -0.1):
        with pytest.raises(SelectError, match="budget"):
            select(s, layout, "AMC", beta)
    with pytest.raises(SelectError, match="selector"):
        select(s, layout, "XYZ", 0.1)
    with pytest.raises(SelectionError, match="out of range"):
        Selection(layout, {"mlp": {0: [96]}})
    for units, err in (({"mlp": {"0": "12"}}, "must be a list of ids"), ({"mlp": {"0": [1.5]}}, "not an integer"),
                       ({"mlp": {"0": [True]}}, "not an integer"), ({"mlp": {"x": [1]}}, "not a layer number"),
                       ({"mlp": [1]}, "must map layers")):
        with pytest.raises(SelectionError, match=err):
            Selection(layout, units)
    assert Selection(layout, {"mlp": {"1": [3, torch.tensor(1), 3]}}).units == {"mlp": {1: [1, 3]}}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(SelectionError, match="JSON"):
        Selection.load(str(tmp_path / "bad.json"))


def test_empty_selection_says_why(setup):
    """A budget that rounds to no unit, scores that are all 0, or a target below every unit's cost: an empty
    selection (it rolls nothing back) with a warning naming the reason."""
    dirs, states, prof, layout, acts = setup
    s = conflict_scores(prof, "d1", "d2", acts, groups=("mlp", "attn"))
    with pytest.warns(RuntimeWarning, match=r"nothing selected: budget 0.02 of 12 units rounds to 0"):
        sel = select(s, layout, "AMC", 0.02, groups=("attn",))  # 4 heads x 3 layers
    assert sel.count("attn") == 0 and sel.meta["budget_target"] == 0
    total = 3 * (96 * s.unit_params["mlp"] + 4 * s.unit_params["attn"])
    with pytest.warns(RuntimeWarning, match="cheapest eligible unit costs more than the target of 1 parameter$"):
        sel = select(s, layout, "AMC", 1.0 / total, groups=("mlp", "attn"))
    assert sel.count("mlp") == sel.count("attn") == 0
    zero = conflict_scores(prof, "d1", "d2", FakeActivations({g: torch.zeros_like(a) for g, a in acts.arrays.items()}),
                           groups=("mlp",))
    with pytest.warns(RuntimeWarning, match="no unit of mlp is eligible"):
        select(zero, layout, "AMC", 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select(s, layout, "AMC", 0.1, groups=("attn",)).count("attn") > 0


def test_gradient_conflict_matches_dense(setup):
    dirs, states, prof, layout, acts = setup
    gen = torch.Generator().manual_seed(1)
    grads = {m.tensor: torch.randn(states[0][m.tensor].shape, generator=gen)
             for ms in layout.groups["mlp"].values() for m in ms}
    gc = gradient_conflict(grads, states[1], states[2], layout, groups=("mlp",))
    for layer in range(3):
        p = f"model.layers.{layer}.mlp."
        want = torch.zeros(96, dtype=torch.float64)
        for n, ax in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
            d = states[2][p + n + ".weight"].double() - states[1][p + n + ".weight"].double()
            want += (grads[p + n + ".weight"].double() * d).sum(ax)
        assert torch.allclose(gc["mlp"][layer], want, rtol=1e-4, atol=1e-6)
    s = conflict_scores(prof, "d1", "d2", acts, groups=("mlp",), conflict="gradient", gradient=gc)
    assert torch.equal(s.C["mlp"], gc["mlp"].clamp_min(0))


def test_recovery_formula():
    assert recovery(66.0, 57.0, 60.0) == pytest.approx(1 / 3)
    assert recovery(1.0, 0.0, 1.0) == 1.0
    assert math.isnan(recovery(1.0, 1.0, 1.0))
    # E not damaged (it improved under L: higher is better): nothing lost, so no recovery, whatever the rollback does
    assert math.isnan(recovery(-6.950, -6.758, -6.9))
    assert math.isnan(recovery(-6.950, -6.758, -6.5))
    assert math.isnan(recovery(1.0, 0.5, float("nan")))
