"""Recovery sweeps on a real tiny transformers model: full rollback recovers exactly, the model is restored."""
import os

import pytest
import torch

from ckpt_factory import tiny_qwen3_config
from lpt_kernels.analysis import diff
from lpt_kernels.analysis.select import conflict_scores
from lpt_kernels.analysis.sweep import sweep
from lpt_kernels.layout import load_layout


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(layers=2)).float().eval()
    dirs = []
    gen = torch.Generator().manual_seed(5)
    for name in ("code", "math", "qa"):
        if name != "code":  # each domain moves only MLP weights, so an all-MLP rollback is a full rollback
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".mlp." in n:
                        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        d = str(root / name)
        model.save_pretrained(d)
        dirs.append(d)
    return dirs


def _evaluator(math_dir=None):
    """-loss on random tokens per domain; with ``math_dir``, math is instead minus the squared distance of the MLP
    weights to that checkpoint's (0 at theta_E, < 0 after L: a real loss, so recovery is defined)."""
    gen = torch.Generator().manual_seed(9)
    data = {d: torch.randint(0, 128, (2, 12), generator=gen) for d in ("math", "qa")}
    ref = None
    if math_dir is not None:
        from transformers import Qwen3ForCausalLM
        ref = {n: p.detach().double() for n, p in Qwen3ForCausalLM.from_pretrained(math_dir).named_parameters()}

    def evaluate(model):
        with torch.no_grad():
            out = {d: -model(input_ids=x, labels=x).loss.item() for d, x in data.items()}
            if ref is not None:
                out["math"] = -sum(((p.double() - ref[n]) ** 2).sum().item() for n, p in model.named_parameters()
                                   if ".mlp." in n)
            return out
    return evaluate


def test_full_rollback_recovers_exactly_and_model_is_restored(models, tmp_path):
    from transformers import Qwen3ForCausalLM

    code, math_dir, qa = models
    prof = diff([code, math_dir, qa], progress=False)
    model = Qwen3ForCausalLM.from_pretrained(qa).eval()
    layout = load_layout(None, {n: p.shape for n, p in model.named_parameters()}, model.config.to_dict())
    scores = conflict_scores(prof, "math", "qa", None, groups=("mlp",))
    evaluate = _evaluator(math_dir)
    before = evaluate(Qwen3ForCausalLM.from_pretrained(math_dir).eval())
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    # M and random choose among the units that moved (every MLP unit here); MC only among conflicting ones
    rows = sweep(model, math_dir, scores, layout, evaluate, "math", before, budgets=(0.05, 1.0),
                 selectors=("M", "random"), out_dir=str(tmp_path / "out"))
    full = [r for r in rows if r["budget"] == 1.0]
    damaged = full[0]["score/math"] - full[0]["collateral/math"]
    assert damaged < before["math"] == 0.0  # Math really lost score under QA
    for r in full:
        assert r["recovery"] == pytest.approx(1.0, abs=1e-6)  # every MLP unit rolled back = theta_E exactly
        assert r["score/math"] == pytest.approx(before["math"], abs=1e-6)
    assert {r["selector"] for r in rows} == {"M", "random"} and len(rows) == 4
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), f"{n} not restored"
    assert os.path.isfile(tmp_path / "out" / "sweep.csv") and os.path.isfile(tmp_path / "out" / "dose_response.png")
