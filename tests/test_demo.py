"""`lpt demo`: the fast demo runs end to end through the real CLI, once, and its outputs are checked for what they
must show (results.json's shape and values, the checkpoints, the report); a tiny configuration checks determinism
and --force through the Python API; a non-empty --out is refused without --force."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest

STAGES = ["base", "code", "math", "qa", "cw"]
DOMAINS = {"math", "code", "qa", "cw"}
BUDGETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32]


def _env():
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    return env


def _lpt(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lpt_kernels.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    r = _lpt("demo", "--fast", "--out", str(out))
    assert r.returncode == 0, f"lpt demo --fast failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    with open(out / "results.json") as f:
        res = json.load(f)
    return out, res, r.stdout


def _scores_ok(scores):
    assert DOMAINS <= set(scores), scores
    for d in DOMAINS:
        assert 0.0 <= scores[d] <= 100.0, (d, scores[d])


def test_results_shape(fast_demo):
    _, res, _ = fast_demo
    assert isinstance(res["seed"], int) and res["seed"] == 0 and res["fast"] is True
    assert [s["name"] for s in res["stages"]] == STAGES
    for s in res["stages"]:
        _scores_ok(s["scores"])
    steps = [p["step"] for p in res["refresh"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 3
    assert res["refresh"][0]["scores"]["math"] == res["stages"][-1]["scores"]["math"]  # starts from the CW model
    for p in res["refresh"]:
        _scores_ok(p["scores"])
    rows = res["rollback"]
    for r in rows:
        assert {"selector", "groups", "budget", "seed", "scores", "recovery"} <= set(r)
        assert r["groups"] in ("mlp", "mlp,attn")
        assert 0.0 < r["budget"] <= 1.0
        assert r["seed"] is None or isinstance(r["seed"], int)
        _scores_ok(r["scores"])
        assert r["units"] > 0
    cells = {(r["selector"], r["groups"]) for r in rows}
    for sel in ("AMC", "MC", "AM", "AC", "AMC/act-budget", "random"):
        assert (sel, "mlp") in cells, sel
    assert ("AMC", "mlp,attn") in cells and ("random", "mlp,attn") in cells
    for key in cells:
        assert sorted(r["budget"] for r in rows if (r["selector"], r["groups"]) == key and r["seed"] in (None, 0)) \
            == BUDGETS, key
    assert {r["seed"] for r in rows if r["selector"] == "random"} >= {0, 1, 2}  # random over >= 3 seeds
    assert "timing" in res and res["timing"]["phases"]["total"]["wall_s"] > 0


def test_tracker_in_the_loop(fast_demo):
    """The GRPO stages run with a DeltaTracker (every=1): one metrics dict per optimizer step, per domain, and its
    profile at the end equals diff of the saved checkpoints."""
    _, res, stdout = fast_demo
    tr = res["tracking"]
    assert tr["matches_diff"]["equal"] is True and tr["matches_diff"]["arrays"] > 0
    steps = res["config"]["stage_steps"]
    for d in ("code", "math", "qa", "cw"):
        pts = [c for c in tr["curves"] if c["domain"] == d]
        assert [c["step"] for c in pts] == list(range(1, steps[d] + 1)), d
        m = pts[-1]["metrics"]
        assert m[f"lpt/{d}/mlp/update_norm"] > 0 and 0.0 <= m[f"lpt/{d}/sparsity"] < 1.0
    assert "lpt/cw/mlp/shared_cosine/qa" in tr["curves"][-1]["metrics"]
    assert "its profile equals lpt diff" in stdout


def test_recovery_is_what_the_scores_say(fast_demo):
    _, res, _ = fast_demo
    before = res["rollback_reference"]["before"]["math"]
    damaged = res["rollback_reference"]["damaged"]["math"]
    assert before == res["stages"][2]["scores"]["math"]          # the Math checkpoint
    assert damaged == res["stages"][3]["scores"]["math"]         # the QA checkpoint, evaluated again after loading
    for r in res["rollback"]:
        if before <= damaged:  # Math lost nothing: recovery is undefined
            assert r["recovery"] is None
        else:
            assert math.isclose(r["recovery"], (r["scores"]["math"] - damaged) / (before - damaged), rel_tol=1e-4,
                                abs_tol=1e-6)
        for d in ("code", "qa", "cw"):
            assert math.isclose(r["collateral"][d], r["scores"][d] - res["rollback_reference"]["damaged"][d],
                                abs_tol=1e-3)
    # more budget rolls back more: at 100% of the MLP neurons AMC would copy them all; at 32% the units are many
    amc = {r["budget"]: r["units"] for r in res["rollback"] if r["selector"] == "AMC" and r["groups"] == "mlp"}
    assert [amc[b] for b in BUDGETS] == sorted(amc[b] for b in BUDGETS)


def test_the_toy_shows_interference_and_refresh(fast_demo):
    """The floors of issue #10, read from the per-stage scores (not from the demo's own verdict)."""
    _, res, _ = fast_demo
    by = {s["name"]: s["scores"] for s in res["stages"]}
    for d in ("code", "math", "qa", "cw"):  # each RL stage lifts its own domain
        prev = STAGES[STAGES.index(d) - 1]
        assert by[d][d] > by[prev][d], (d, by[prev][d], by[d][d])
    drop = by["math"]["math"] - by["cw"]["math"]
    assert drop >= 10.0, f"Math fell only {drop:.1f} points after QA and CW"
    regained = res["refresh"][-1]["scores"]["math"] - by["cw"]["math"]
    assert regained >= 0.5 * drop, f"the refresh brought back {regained:.1f} of {drop:.1f} points"
    assert res["floors"]["drop_ok"] and res["floors"]["refresh_ok"]


def test_analyses_are_filled(fast_demo):
    _, res, _ = fast_demo
    a = res["analyses"]
    for key in ("exact", "tolerance"):
        assert set(a["sparsity"][key]) == {"code", "math", "qa", "cw"}
        assert all(0.0 <= v <= 1.0 for v in a["sparsity"][key].values())
    for d in a["sparsity"]["exact"]:
        assert a["sparsity"]["tolerance"][d] >= a["sparsity"]["exact"][d]
    for key in ("changed_jaccard", "active_jaccard"):
        m = a[key]["matrix"]
        assert len(m) == 4 and all(len(r) == 4 for r in m)
        assert all(math.isclose(m[i][i], 1.0) for i in range(4))
        assert all(0.0 <= x <= 1.0 for r in m for x in r)
    g = a["grad_cosine"]["matrix"]
    assert all(math.isclose(g[i][i], 1.0, rel_tol=1e-6) for i in range(4))
    assert all(-1.0 <= x <= 1.0 + 1e-9 for r in g for x in r)
    assert len(a["shared_cosine"]) == 3
    lb = res["layer_budget"]
    assert set(lb) >= {"conflict", "activation"} and sum(lb["conflict"]) == sum(lb["activation"]) > 0
    assert all(n > 0 for n in a["activation_tokens"].values())


def test_checkpoints_load_like_a_users(fast_demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, res, _ = fast_demo
    for s in STAGES:
        d = out / "ckpts" / s
        with open(d / "model.safetensors.index.json") as f:
            shards = set(json.load(f)["weight_map"].values())
        assert len(shards) >= 2 and all((d / x).is_file() for x in shards)
    tok = AutoTokenizer.from_pretrained(str(out / "ckpts" / "math"))
    model = AutoModelForCausalLM.from_pretrained(str(out / "ckpts" / "math"), dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    # the saved Math checkpoint, evaluated again, gives the score the demo reported for it
    from lpt_kernels.demo.domains import Domains
    from lpt_kernels.demo.model import evaluate

    cfg = res["config"]
    domains = Domains(res["seed"], cfg["eval_size"])
    scores = evaluate(model, domains.eval)
    for dom in DOMAINS:
        assert scores[dom] == pytest.approx(res["stages"][2]["scores"][dom], abs=1e-3)
    ids = tok("add 4 7 + 5 =")["input_ids"]
    assert tok.decode(ids) == "add 4 7 + 5 ="


def test_report_is_self_contained(fast_demo):
    out, res, stdout = fast_demo
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 7
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for needle in ("20.4%", "73.6%", "57.66", "66.04", "77.6%", "Rollback of QA", "Per-stage scores"):
        assert needle in page, needle
    by = {s["name"]: s["scores"] for s in res["stages"]}
    assert f"{by['cw']['math']:.1f}" in page and f"{by['math']['math']:.1f}" in page
    assert page.count('class="cap"') >= 8  # one sentence per figure
    # the printed tables: per-stage scores with AVG, and the rollback table beside the paper's values
    assert "AVG" in stdout and "Rollback of QA's displacement toward Math" in stdout and "20.4%" in stdout
    assert "Time per phase" in stdout
    # the first line comes at once and says what the minutes of silence before the first scores are
    assert stdout.splitlines()[0].startswith("lpt demo: training a tiny Qwen3 (warm-up, then GRPO")


def test_refuses_non_empty_out_without_force(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _lpt("demo", "--fast", "--out", str(out), timeout=120)
    assert r.returncode == 1
    assert "not empty" in r.stderr and str(out) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_deterministic_and_force(tmp_path):
    """Two runs with one seed give the same results.json apart from its timing; --force replaces an earlier output,
    and refuses a directory the package did not write or one holding files of the user's. A tiny configuration keeps this affordable."""
    from lpt_kernels.demo import FAST, run_demo

    cfg = replace(FAST, warmup_steps=6, eval_size=24, stage_steps={"code": 2, "math": 2, "qa": 2, "cw": 2},
                  refresh_steps=2, refresh_every=1, budgets=(0.02, 0.32), random_seeds=1)
    out = tmp_path / "d"
    first = run_demo(str(out), seed=3, quiet=True, config=cfg)
    with open(out / "results.json") as f:
        saved = json.load(f)
    with pytest.raises(ValueError, match="not empty"):
        run_demo(str(out), seed=3, quiet=True, config=cfg)
    second = run_demo(str(out), seed=3, quiet=True, config=cfg, force=True)
    with open(out / "results.json") as f:
        again = json.load(f)
    for doc in (first, second, saved, again):
        doc.pop("timing")
    assert saved == again
    assert not [p for p in os.listdir(tmp_path) if p != "d"]  # no temp directory left beside it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by lpt_kernels"):
        run_demo(str(mine), seed=3, quiet=True, config=cfg, force=True)
    assert os.listdir(mine) == ["notes.txt"]
    (out / "prof").mkdir()  # the user's work inside the demo's directory survives --force too
    with pytest.raises(ValueError, match=r"did not write there \(prof\)"):
        run_demo(str(out), seed=3, quiet=True, config=cfg, force=True)
    os.rmdir(out / "prof")
    assert sorted(os.listdir(out / "ckpts")) == sorted(STAGES + ["remath"])


def test_sigterm_leaves_nothing(tmp_path):
    """A killed run (SIGTERM: kill, timeout, a scheduler) cleans up like Ctrl-C: exit 130, no temp directory."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "lpt_kernels.cli", "demo", "--fast", "--out", str(tmp_path / "d")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not [e for e in os.listdir(tmp_path) if ".tmp-" in e]:
        time.sleep(0.2)
    assert [e for e in os.listdir(tmp_path) if ".tmp-" in e], "the run never started writing"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "lpt demo: interrupted" in err
    assert os.listdir(tmp_path) == []
