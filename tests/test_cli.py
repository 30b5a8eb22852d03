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
    assert "Jaccard" in r.stdout and "cosine d1 vs d2" in r.stdout and "chance (random unit sets" in r.stdout
    lines = r.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split() == ["d1", "d2", "d3"])
    for ln in lines[head + 1: head + 4]:  # a row: its label and three values, apart (short labels once ran together)
        label, *vals = ln.split()
        assert label in ("d1", "d2", "d3") and len(vals) == 3 and all(0.0 <= float(v) <= 1.0 for v in vals)
    ov = open(root / "ov.csv").read()
    assert ov.startswith("group,kind,a,b,layer,value") and "mlp,jaccard_chance,d1,d2" in ov

    # a reader that has gone away before the first line (`| true`): the command still writes its files, and ends
    # without an error message or a traceback, with stdout buffered (Python's default: it fails at the flush) or not
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for unbuffered in ("", "1"):
        csv = root / f"gone{unbuffered}.csv"
        for args in (["overlap", out, "--top", "0.1", "--csv", str(csv)], ["--version"]):
            gone = subprocess.Popen([sys.executable, "-m", "lpt_kernels.cli", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=dict(env, **({"PYTHONUNBUFFERED": "1"} if unbuffered
                                                                            else {})))
            gone.stdout.close()
            assert gone.wait() == 0 and gone.stderr.read() == b"", (args, unbuffered)
        assert open(csv).read().startswith("group,kind,a,b,layer,value")

    r = lpt("report", out)
    assert r.returncode == 0, r.stderr
    pngs = glob.glob(os.path.join(out, "report", "*.png"))
    assert {"sparsity.png", "jaccard_mlp.png", "shared_cosine_mlp.png", "hist_abs.png"} <= {os.path.basename(p) for p in pngs}
    html = open(os.path.join(out, "report", "report.html")).read()
    assert html.count("data:image/png;base64,") == len(pngs)  # self-contained
    assert "would overlap by 0." in html  # the Jaccard caption's chance level


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


# ---- issue 12: outputs are protected, arguments checked first, messages a new user can act on ----------------------
# These run `lpt` in this process (cli.main with its output captured): the same code as the command, without a torch
# import per call. The tests above run the installed command as a subprocess.

def lpt_in(*args, cwd=None):
    """cli.main(args) in this process: a CompletedProcess with its exit code, stdout and stderr."""
    import contextlib
    import io

    from lpt_kernels import cli

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_path = os.getcwd(), list(sys.path)
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main([str(a) for a in args])
            except SystemExit as e:  # argparse: usage errors and --version
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def _mlp_only_chain(root, layers=1):
    """base -> math -> qa where only MLP weights move (the kv and attn groups never change), fp32, sharded."""
    import torch
    from transformers import Qwen3ForCausalLM

    from ckpt_factory import tiny_qwen3_config

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(layers=layers)).float().eval()
    gen = torch.Generator().manual_seed(3)
    dirs = []
    for i, name in enumerate(("base", "math", "qa")):
        if i:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".mlp." in n:
                        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        d = os.path.join(root, name)
        model.save_pretrained(d, max_shard_size="60KB")
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def mlp_chain(tmp_path_factory):
    return _mlp_only_chain(str(tmp_path_factory.mktemp("mlp_chain")))


def _snapshot(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def _no_temps(parent):
    return not [e for e in os.listdir(parent) if ".tmp-" in e or ".old-" in e]


def test_outputs_are_refused_unless_force(chain, tmp_path):
    root, dirs = chain
    out = tmp_path / "prof"
    assert lpt_in("diff", *dirs[:3], "--out", str(out), "-q").returncode == 0
    assert lpt_in("report", str(out)).returncode == 0
    before = _snapshot(out)
    # the same command again: refused before any reading (the output is checked before the inputs)
    r = lpt_in("diff", str(tmp_path / "missing_ckpt"), dirs[1], "--out", str(out))
    _one_line_error(r, "--out", "already exists and is not empty", "--force")
    assert _snapshot(out) == before
    # --force replaces the whole directory: the report of the earlier profile goes with it
    r = lpt_in("diff", *dirs[:2], "--out", str(out), "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == [".lpt-output.json", "profile.json", "profile.safetensors"]
    assert json.load(open(out / "profile.json"))["meta"]["deltas"] == ["d1"]
    assert _no_temps(tmp_path)
    # --force never replaces a directory the package did not write, nor an output a user added files to
    mine = tmp_path / "mywork"
    mine.mkdir()
    (mine / "thesis.tex").write_text("my thesis")
    _one_line_error(lpt_in("diff", *dirs[:2], "--out", str(mine), "--force"), "not written by lpt_kernels",
                    "even with --force")
    (out / "sel.json").write_text("{}")
    _one_line_error(lpt_in("diff", *dirs[:2], "--out", str(out), "--force"), "did not write there (sel.json)")
    os.unlink(out / "sel.json")
    assert (mine / "thesis.tex").read_text() == "my thesis"
    # into a checkpoint directory, an input, a path inside an input, an existing file
    other = tmp_path / "other_ckpt"
    import shutil
    shutil.copytree(dirs[3], other)
    _one_line_error(lpt_in("diff", *dirs[:2], "--out", str(other)), "is a checkpoint directory")
    _one_line_error(lpt_in("diff", *dirs[:2], "--out", dirs[1], "--force"), "is the input")
    _one_line_error(lpt_in("diff", *dirs[:2], "--out", os.path.join(dirs[1], "prof")), "is inside the input")
    f = tmp_path / "a_file"
    f.write_text("x")
    _one_line_error(lpt_in("diff", *dirs[:2], "--out", str(f)), "is an existing file")
    assert f.read_text() == "x" and os.listdir(dirs[1]) == os.listdir(dirs[2])
    # the report: refused, then replaced with --force
    assert lpt_in("report", str(out)).returncode == 0
    _one_line_error(lpt_in("report", str(out)), "already exists", "--force")
    assert lpt_in("report", str(out), "--force").returncode == 0
    _one_line_error(lpt_in("report", str(out), "--out", str(out), "--force"), "contains the input")
    # overlap --csv
    csv_path = tmp_path / "o.csv"
    csv_path.write_text("mine")
    _one_line_error(lpt_in("overlap", str(out), "--csv", str(csv_path)), "--csv", "already exists")
    assert csv_path.read_text() == "mine"


def test_select_and_rollback_refuse_existing_outputs(chain, tmp_path):
    root, dirs = chain
    prof = tmp_path / "prof"
    assert lpt_in("diff", *dirs[:3], "--out", str(prof), "-q").returncode == 0
    sel = tmp_path / "sel.json"
    args = ["select", "--profile", str(prof), "--earlier", "d1", "--later", "d2", "--selector", "MC",
            "--budget", "0.05", "--out", str(sel)]
    r = lpt_in(*args)
    assert r.returncode == 0, r.stderr
    assert "units selected" in r.stdout
    first = sel.read_text()
    _one_line_error(lpt_in(*args), "--out", "already exists", "--force")
    assert sel.read_text() == first
    assert lpt_in(*args, "--force").returncode == 0
    # rollback: an existing non-empty output is refused; --force replaces it once complete; an input never
    out = tmp_path / "rolled"
    rb = ["rollback", dirs[2], "--from", dirs[1], "--select", str(sel), "--out", str(out)]
    r = lpt_in(*rb)
    assert r.returncode == 0 and "wrote" in r.stdout and "1 units" not in r.stdout, r.stderr
    (out / "marker").write_text("old")
    _one_line_error(lpt_in(*rb), "is a checkpoint directory", "--force")
    assert (out / "marker").exists()
    # a file the user put there: not replaced even with --force; without it, --force replaces the earlier output
    _one_line_error(lpt_in(*rb, "--force"), "did not write there (marker)", "even with --force")
    os.unlink(out / "marker")
    (out / "config.json").write_text("{}")  # an entry it wrote, changed: still its output
    assert lpt_in(*rb, "--force", "-q").returncode == 0
    assert json.load(open(out / "config.json")) != {} and os.path.isfile(out / "model.safetensors.index.json")
    _one_line_error(lpt_in("rollback", dirs[2], "--from", dirs[1], "--select", str(sel), "--out", dirs[2], "--force"),
                    "is the input")
    assert _no_temps(tmp_path)


def test_usage_errors_name_the_subcommand():
    r = lpt_in("diff", "a", "b", "--out", "o", "--atoll", "1e-8")
    assert r.returncode == 2
    assert "usage: lpt diff" in r.stderr and "unrecognized arguments: --atoll" in r.stderr
    r = lpt_in("select", "--profile", "p", "--earlier", "a", "--later", "b", "--out", "s.json", "--budget", "2")
    assert r.returncode == 2 and "usage: lpt select" in r.stderr and "--budget" in r.stderr
    r = lpt_in("--version")
    assert r.returncode == 0 and r.stdout.startswith("lpt_kernels ") and "backends here: reference" in r.stdout
    r = lpt_in("report", "--help")
    assert r.returncode == 0 and "self-contained report.html" in r.stdout and "--force" in r.stdout


def test_wide_labels_align(chain):
    """Labels in CJK take two terminal columns a character, combining marks none (macOS spells é as e + U+0301 in
    file names): the tables stay aligned. The report says when the plotting font lacks a label's characters."""
    import unicodedata
    import warnings

    root, dirs = chain
    out = str(root / "prof_cjk")
    labels = ["基座", "代码", "e\u0301te\u0301", "问答"]
    utf8 = dict(capture_output=True, encoding="utf-8", env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    r = subprocess.run([sys.executable, "-m", "lpt_kernels.cli", "diff", *dirs, "--out", out, "--labels",
                        ",".join(labels)], **utf8)
    assert r.returncode == 0, r.stderr

    def ends(ln):  # the terminal column where each word ends
        out, col = [], 0
        for i, c in enumerate(ln):
            col += 0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
            if c != " " and (i + 1 == len(ln) or ln[i + 1] == " "):
                out.append(col)
        return out
    summary = [ln for ln in r.stdout.splitlines() if "of parameters unchanged" in ln]
    assert len(summary) == 3 and len({ends(ln.split(":")[0])[0] for ln in summary}) == 1, summary
    r = subprocess.run([sys.executable, "-m", "lpt_kernels.cli", "overlap", out, "--group", "mlp", "--top", "0.0001"],
                       **utf8)
    assert r.returncode == 0, r.stderr
    assert "Jaccard of the top-0.01% changed units" in r.stdout
    lines = r.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split() == labels[1:])
    table = lines[head: head + 4]
    assert all(ends(ln)[-3:] == ends(table[0]) for ln in table), table  # labels end where the values end

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with warnings.catch_warnings(record=True) as caught:  # does this machine's plotting font draw 基?
        warnings.simplefilter("always")
        fig, ax = plt.subplots()
        ax.set_title("基")
        fig.savefig(os.devnull, format="png")
        plt.close(fig)
    lacks = any("missing from" in str(w.message) for w in caught)
    r = subprocess.run([sys.executable, "-m", "lpt_kernels.cli", "report", out], **utf8)
    assert r.returncode == 0, r.stderr
    assert ("lpt report: warning: the plotting font has no glyph for" in r.stderr) == lacks, r.stderr


def test_labels_plurals_unchanged_groups_and_no_bars(mlp_chain, tmp_path):
    base, math_dir, qa = mlp_chain
    out = tmp_path / "prof"
    # an index path is labelled by its directory
    r = lpt_in("diff", base, os.path.join(math_dir, "model.safetensors.index.json"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "profile of 1 delta (consecutive), layout qwen3, 1 layer" in r.stdout
    assert json.load(open(out / "profile.json"))["meta"]["deltas"] == ["math"]
    assert "%|" not in r.stderr and "lpt diff" not in r.stderr  # no progress bar when stderr is not a terminal
    r = lpt_in("diff", base, math_dir, qa, "--out", str(tmp_path / "p2"), "--progress")
    assert r.returncode == 0 and "%|" in r.stderr  # asked for
    # kv and attn never changed: said in words, no NaN, no empty matrices
    r = lpt_in("overlap", str(tmp_path / "p2"))
    assert r.returncode == 0, r.stderr
    assert "kv: no delta changed any kv unit" in r.stdout and "attn: no delta changed any attn unit" in r.stdout
    assert "nan" not in r.stdout.lower() and "mlp: Jaccard" in r.stdout
    r = lpt_in("report", str(tmp_path / "p2"))
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr  # no matplotlib warnings either
    pngs = {p for p in os.listdir(tmp_path / "p2" / "report") if p.endswith(".png")}
    assert "jaccard_mlp.png" in pngs and not any(p.endswith(("_kv.png", "_attn.png")) for p in pngs)
    html = open(tmp_path / "p2" / "report" / "report.html").read()
    assert html.count("No delta changed any unit of this group") == 2
    assert html.count("<figcaption>") == html.count("<img ") == len(pngs)
    assert "hist_abs" not in html.replace("hist_abs.png", "")  # sections are titled in words, not file stems
    assert "an MLP neuron j = row j of gate_proj + row j of up_proj + column j of down_proj" in html


def test_short_reprs(mlp_chain):
    import torch
    from transformers import AutoModelForCausalLM

    from lpt_kernels.analysis import diff
    from lpt_kernels.hooks import ActivationStats

    prof = diff(mlp_chain, progress=False)
    assert len(repr(prof)) < 300 and "math" in repr(prof)
    model = AutoModelForCausalLM.from_pretrained(mlp_chain[1]).eval()
    with torch.inference_mode(), ActivationStats(model, name="math") as acts:
        model(input_ids=torch.randint(0, 128, (2, 8)))
    res = acts.result()
    assert repr(res) == str(res) and len(repr(res)) < 300 and "math: 16 tokens" in repr(res)


EVALS = """
import os
import torch

def _mark():
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluated"), "a").write("x")

def score(model):
    _mark()
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    out = {}
    for i, d in enumerate(("math", "qa")):
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i))
        out[d] = -model(input_ids=ids, labels=ids).loss.item()
    return out

def distance(model):
    # math: minus the squared distance of the MLP weights to the Math checkpoint's (0 there, < 0 after QA: a real
    # loss, so recovery is defined); qa: minus a loss
    _mark()
    from transformers import AutoModelForCausalLM

    ref = dict(AutoModelForCausalLM.from_pretrained(os.environ["LPT_TEST_MATH_DIR"]).named_parameters())
    d = sum(((p.double() - ref[n].double()) ** 2).sum().item() for n, p in model.named_parameters() if ".mlp." in n)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"math": -d, "qa": -model(input_ids=ids, labels=ids).loss.item()}

def a_float(model):
    _mark()
    return 0.5

not_a_function = 3
"""


def test_sweep_checks_before_loading_and_writes_baselines(mlp_chain, tmp_path, monkeypatch):
    base, math_dir, qa = mlp_chain
    monkeypatch.setenv("LPT_TEST_MATH_DIR", math_dir)
    work = tmp_path / "work"
    work.mkdir()
    (work / "issue12_evals.py").write_text(EVALS)
    prof = str(tmp_path / "prof")
    assert lpt_in("diff", base, math_dir, qa, "--out", prof, "-q").returncode == 0
    common = ["sweep", qa, "--from", math_dir, "--profile", prof, "--earlier", "math", "--later", "qa"]

    def sweep(*extra):
        return lpt_in(*common, *extra, cwd=str(work))

    evaluated = work / "evaluated"
    # every bad argument is refused before a model is loaded or evaluated
    _one_line_error(sweep("--eval", "issue12_evals", "--out", "o"), "--eval", "MODULE:FUNC")
    _one_line_error(sweep("--eval", "nope_evals:score", "--out", "o"), "--eval", "nope_evals")
    _one_line_error(sweep("--eval", "issue12_evals:missing", "--out", "o"), "has no 'missing'")
    _one_line_error(sweep("--eval", "issue12_evals:not_a_function", "--out", "o"), "not a function")
    _one_line_error(sweep("--eval", "issue12_evals:score", "--selectors", "MC,XYZ", "--out", "o"), "XYZ")
    _one_line_error(sweep("--eval", "issue12_evals:score", "--selectors", "AMC", "--out", "o"), "--acts")
    _one_line_error(sweep("--eval", "issue12_evals:score", "--earlier", "code", "--out", "o"), "'code' is not a delta")
    _one_line_error(sweep("--eval", "issue12_evals:score", "--device", "cuda:7", "--out", "o"), "--device")
    r = sweep("--eval", "issue12_evals:score", "--dtype", "float8", "--out", "o")
    assert r.returncode == 2 and "usage: lpt sweep" in r.stderr
    (work / "full").mkdir()
    (work / "full" / "x").write_text("x")
    _one_line_error(sweep("--eval", "issue12_evals:score", "--out", "full"), "already exists")
    assert not evaluated.exists() and not (work / "o").exists()
    # an evaluator returning a float: one line naming it
    _one_line_error(sweep("--eval", "issue12_evals:a_float", "--selectors", "MC", "--out", "o"), "issue12_evals:a_float",
                    "returned a float",
                    "expected a dict")
    assert not (work / "o").exists()
    # the real thing, with the module found in the current directory
    r = sweep("--eval", "issue12_evals:distance", "--selectors", "M,random", "--budgets", "0.5,1", "--device", "cpu",
              "--dtype", "float32", "--out", "o")
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr and "%|" not in r.stderr
    import csv
    rows = list(csv.DictReader(open(work / "o" / "sweep.csv")))
    assert [r["selector"] for r in rows[:2]] == ["before", "damaged"]
    assert float(rows[0]["recovery"]) == 1.0 and float(rows[1]["recovery"]) == 0.0
    full = [r for r in rows if r["selector"] == "M" and float(r["budget"]) == 1.0]
    assert float(rows[1]["score/math"]) < float(rows[0]["score/math"]) == 0.0  # QA really moved away from Math
    assert abs(float(full[0]["recovery"]) - 1.0) < 1e-6  # every MLP unit rolled back: the Math model exactly
    assert abs(float(full[0]["score/math"]) - float(rows[0]["score/math"])) < 1e-6
    assert "collateral/qa" in rows[0] and os.path.isfile(work / "o" / "dose_response.png")
    sys.modules.pop("issue12_evals", None)


# ---- a new user's findings: every input protected, outputs checked before work, recovery only of a real loss ---------

def _acts_dir(model_dir, out):
    import torch
    from transformers import AutoModelForCausalLM

    from lpt_kernels.hooks import ActivationStats

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode(), ActivationStats(model, name="math") as acts:
        model(input_ids=torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0)))
    acts.result().save(str(out))
    return out


def test_outputs_never_touch_any_input(mlp_chain, tmp_path):
    base, math_dir, qa = mlp_chain
    prof = tmp_path / "prof"
    assert lpt_in("diff", base, math_dir, qa, "--out", prof, "-q").returncode == 0
    acts = _acts_dir(math_dir, tmp_path / "acts_math")
    prof_files, acts_files = _snapshot(prof), _snapshot(acts)
    sel = ["select", "--profile", prof, "--acts", acts, "--earlier", "math", "--later", "qa", "--budget", "0.1"]
    _one_line_error(lpt_in(*sel, "--out", acts / "activations.json", "--force"), "--out", "is inside the input")
    _one_line_error(lpt_in(*sel, "--out", prof / "sel.json"), "--out", "is inside the input")
    _one_line_error(lpt_in(*sel, "--out", tmp_path / "s.json", "--plot", prof / "profile.json", "--force"),
                    "--plot", "is inside the input")
    _one_line_error(lpt_in(*sel, "--out", tmp_path / "s.json", "--plot", acts), "--plot")
    _one_line_error(lpt_in(*sel, "--out", tmp_path / "s.json", "--plot", tmp_path / "s.json"), "--plot", "overlaps")
    assert not (tmp_path / "s.json").exists()
    # a --plot that cannot be written: refused before --out is written
    _one_line_error(lpt_in(*sel, "--out", tmp_path / "s.json", "--plot", "/proc/lpt-x.png"), "--plot", "cannot write")
    assert not (tmp_path / "s.json").exists()
    s = tmp_path / "sel" / "s.json"
    r = lpt_in(*sel, "--out", s, "--plot", tmp_path / "s.png")
    assert r.returncode == 0, r.stderr
    assert s.is_file() and (tmp_path / "s.png").is_file()
    # rollback: its --select file is an input too
    _one_line_error(lpt_in("rollback", qa, "--from", math_dir, "--select", s, "--out", tmp_path / "sel", "--force"),
                    "contains the input")
    # overlap --csv inside the profile
    _one_line_error(lpt_in("overlap", prof, "--csv", prof / "o.csv"), "--csv", "is inside the input")
    # sweep: the profile, --acts and --before are inputs, and --out is checked before anything is evaluated
    work = tmp_path / "work"
    work.mkdir()
    (work / "issue12_evals.py").write_text(EVALS)
    before = work / "before.json"
    before.write_text('{"math": 0.0, "qa": 0.0}')
    sw = ["sweep", qa, "--from", math_dir, "--profile", prof, "--acts", acts, "--earlier", "math", "--later", "qa",
          "--eval", "issue12_evals:score", "--selectors", "MC"]
    for out, words in ((prof / "sw", ["is inside the input"]), (acts / "sw", ["is inside the input"]),
                       (work, ["contains the input"]), ("/proc/lpt-x", ["cannot write"])):
        _one_line_error(lpt_in(*sw, "--before", before, "--out", out, "--force", cwd=work), "--out", *words)
    assert not (work / "evaluated").exists()
    assert _snapshot(prof) == prof_files and _snapshot(acts) == acts_files
    assert _no_temps(tmp_path) and not [e for e in os.listdir(tmp_path) if "probe" in e]
    sys.modules.pop("issue12_evals", None)


def test_sweep_recovery_undefined_when_nothing_was_lost(mlp_chain, tmp_path):
    import csv
    import math

    base, math_dir, qa = mlp_chain
    prof = tmp_path / "prof"
    assert lpt_in("diff", base, math_dir, qa, "--out", prof, "-q").returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    (work / "issue12_evals.py").write_text(EVALS)
    (work / "before.json").write_text('{"math": -1000.0, "qa": -1000.0}')  # far below any score at TARGET
    r = lpt_in("sweep", qa, "--from", math_dir, "--profile", prof, "--earlier", "math", "--later", "qa",
               "--eval", "issue12_evals:score", "--selectors", "MC", "--budgets", "0.5", "--before", "before.json",
               "--out", "o", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("lost nothing at TARGET") == 1 and "undefined" in r.stdout and "nan%" not in r.stdout
    rows = list(csv.DictReader(open(work / "o" / "sweep.csv")))
    point = [x for x in rows if x["selector"] == "MC"]
    assert len(point) == 1 and math.isnan(float(point[0]["recovery"]))
    sys.modules.pop("issue12_evals", None)


def test_sweep_without_transformers_is_one_line(mlp_chain, tmp_path, monkeypatch):
    base, math_dir, qa = mlp_chain
    prof = tmp_path / "prof"
    assert lpt_in("diff", base, math_dir, qa, "--out", prof, "-q").returncode == 0
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    r = lpt_in("sweep", qa, "--from", math_dir, "--profile", prof, "--earlier", "math", "--later", "qa",
               "--eval", "x:score", "--selectors", "MC", "--out", tmp_path / "o")
    _one_line_error(r, "needs transformers", "pip install transformers")
    assert not (tmp_path / "o").exists()


def test_select_order_and_missing_acts(mlp_chain, tmp_path):
    base, math_dir, qa = mlp_chain
    prof = tmp_path / "prof"
    assert lpt_in("diff", base, math_dir, qa, "--out", prof, "-q").returncode == 0
    sel = ["select", "--profile", prof, "--selector", "MC", "--out", tmp_path / "s.json"]
    _one_line_error(lpt_in(*sel, "--earlier", "qa", "--later", "math"), "--earlier qa comes after --later math",
                    "math, qa")
    _one_line_error(lpt_in(*sel, "--earlier", "math", "--later", "qa", "--acts", tmp_path / "nope"), "--acts",
                    "does not exist")
    (tmp_path / "f").write_text("x")
    _one_line_error(lpt_in(*sel, "--earlier", "math", "--later", "qa", "--acts", tmp_path / "f"), "--acts",
                    "not a directory")
    assert not (tmp_path / "s.json").exists()


def test_wrong_kind_of_result_message(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lpt_kernels.hooks import ActivationResult, HookError

    save_file({"x": torch.zeros(1)}, str(tmp_path / "activations.safetensors"))
    (tmp_path / "activations.json").write_text('{"meta": {"kind": "gradgram"}}')
    with pytest.raises(HookError, match="does not describe an activations result"):
        ActivationResult.load(str(tmp_path))


def test_help_examples_paste_as_written():
    from lpt_kernels.cli import EPILOG

    lines = EPILOG.splitlines()
    for prev, line in zip(lines, lines[1:]):
        if line.startswith("        "):  # a continuation of the command above: that line must end with a backslash
            assert prev.split("#")[0].rstrip().endswith("\\"), prev
    assert any(l.startswith("        --eval") for l in lines)


def test_diff_out_not_writable_is_refused_first(chain):
    root, dirs = chain
    _one_line_error(lpt_in("diff", *dirs[:2], "--out", "/proc/lpt-prof"), "--out", "cannot write")


def test_diff_of_a_checkpoint_with_itself_warns(chain, tmp_path):
    """`lpt diff A A` (or A and a link to it) is a zero update everywhere: it still runs, with a one-line warning that
    names the two arguments; distinct checkpoints give none."""
    root, dirs = chain
    link = tmp_path / "same_as_d1"
    link.symlink_to(dirs[1])
    r = lpt("diff", dirs[0], dirs[1], str(link), "--out", str(tmp_path / "p1"), "--quiet")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert lines == [f"lpt diff: warning: checkpoint 3 ({link}) is the same files as checkpoint 2 ({dirs[1]}): "
                     f"the update between them is zero everywhere"], r.stderr
    # base mode compares each checkpoint with the first only: d1 twice is two real (equal) updates, no warning
    r = lpt("diff", dirs[0], dirs[1], str(link), "--mode", "base", "--out", str(tmp_path / "p2"), "--quiet")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    r = lpt("diff", dirs[0], dirs[0], "--out", str(tmp_path / "p3"), "--quiet")
    assert r.returncode == 0 and "checkpoint 2" in r.stderr and "same files as checkpoint 1" in r.stderr
    r = lpt("diff", *dirs, "--out", str(tmp_path / "p4"), "--quiet")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    # warnings turned into errors (PYTHONWARNINGS=error): one line, exit 1, nothing written
    r = subprocess.run([sys.executable, "-m", "lpt_kernels.cli", "diff", dirs[0], dirs[0], "--out",
                        str(tmp_path / "p5"), "--quiet"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="error"))
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"lpt diff: error: checkpoint 2 ({dirs[0]}) is the same files as checkpoint 1 ({dirs[0]}): the update between "
        f"them is zero everywhere"] and not (tmp_path / "p5").exists(), r.stderr


def test_package_warnings_print_on_one_line(chain, tmp_path):
    """Every warning of the package (here the fallback to the reference backend, raised in ops.py) prints as one line
    'lpt diff: warning: ...' under the command, not Python's file:line form with the source line."""
    root, dirs = chain
    code = ("import sys; from lpt_kernels.backends import cpu; cpu.AVAILABLE = False; from lpt_kernels import cli; "
            f"sys.exit(cli.main(['diff', {dirs[0]!r}, {dirs[1]!r}, '--out', {str(tmp_path / 'p')!r}, '--quiet']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lpt diff: warning: backend 'cpu' is not available"), r.stderr
    assert lines[0].endswith("falling back to the reference backend (slow)"), r.stderr


def test_sigterm_landing_in_a_finalizer_is_not_lost(tmp_path):
    """Python drops an exception raised inside a __del__ (here, as in a tokenizer library's regex objects during
    `lpt demo`, the SIGTERM lands while one runs): the handler delivers the signal again instead, so the command
    still stops (before, one demo run in ~8 under load kept training)."""
    script = tmp_path / "fin.py"
    script.write_text(
        "import os, signal, time\n"
        "from lpt_kernels.cli import _terminate_as_interrupt\n"
        "signal.signal(signal.SIGTERM, _terminate_as_interrupt)\n"
        "class Slow:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.01)\n"
        "try:\n"
        "    Slow()\n"
        "    t0 = time.time()\n"
        "    while time.time() - t0 < 5:\n"
        "        time.sleep(0.01)\n"
        "    print('missed')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "interrupted", (r.stdout, r.stderr)
