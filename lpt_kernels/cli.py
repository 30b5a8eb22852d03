"""The `lpt` command: a thin shell over lpt_kernels.analysis (everything it does is callable from Python).

Exit codes: 0 success, 1 an error in the inputs or the run (one line on stderr), 2 a usage error (the
subcommand's usage and one line), 130 interrupted.

Every argument is checked before any heavy work (loading models, streaming checkpoints); every command that writes
refuses an existing non-empty output, or a checkpoint directory, unless --force, and writes through the atomic writer
(lpt_kernels/checkpoint/writer.py): the output appears complete or not at all.

A new subcommand adds a ``_add_<name>(sub)`` parser function and a ``_<name>(args)`` handler and lists both in
``COMMANDS`` (see the end of the file).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import threading
import unicodedata
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

_python_format_warning = warnings.formatwarning
_OWN_PREFIX = re.compile(r"lpt(_kernels| [a-z]+): ")  # how the package's messages begin ("lpt diff: ...")

EPILOG = """examples:
  lpt demo                    # train a tiny Qwen3 on the CPU and run everything below on it (lpt-demo/)
  lpt diff ckpts/base ckpts/code ckpts/math ckpts/qa ckpts/cw --out prof/
  lpt overlap prof/ --top 0.10 --group mlp
  lpt report prof/            # PNGs and a self-contained prof/report/report.html
  lpt select --profile prof/ --acts acts_math/ --earlier math --later qa --budget 0.02 --out sel.json
  lpt rollback ckpts/qa --from ckpts/math --select sel.json --out ckpts/qa-rolled
  lpt sweep ckpts/qa --from ckpts/math --profile prof/ --acts acts_math/ --earlier math --later qa \\
        --eval my_evals:score --budgets 0.01,0.02,0.04 --out sweep/

Outputs are never overwritten unless --force; see docs/ for every command."""

DTYPES = ("auto", "bfloat16", "float16", "float32")


class CliError(ValueError):
    """A bad argument found by the command's own checks (one line, exit code 1)."""


def _cols(s: str) -> int:
    """Terminal columns of s: East Asian wide and fullwidth characters take two (labels such as 代码), combining
    marks and format characters none (e + U+0301, as macOS spells é in file names)."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf") else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def _rjust(s: str, width: int) -> str:
    """s right-aligned in `width` terminal columns (str.rjust counts characters)."""
    return " " * max(0, width - _cols(s)) + s


def plural(n: int, word: str, words: Optional[str] = None) -> str:
    """'1 layer', '2 layers' (``words`` for irregular plurals)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


class _VersionAction(argparse.Action):
    """``lpt --version``: the package version, torch's, and the backends that can run here."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        import lpt_kernels
        from lpt_kernels import ops

        names = list(dict.fromkeys(["reference"] + ops.available_backends()))
        try:
            from lpt_kernels.backends import cpu
            if cpu.AVAILABLE:
                names = [f"cpu ({cpu.isa()})" if n == "cpu" else n for n in names]
        except ImportError:
            pass
        print(f"lpt_kernels {lpt_kernels.__version__} (torch {torch.__version__}; backends here: {', '.join(names)})")
        parser.exit()


_Formatter = argparse.RawDescriptionHelpFormatter


def _add_progress(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    g.add_argument("--progress", action="store_true",
                   help="show a progress bar even when stderr is not a terminal (default: only on a terminal)")


def _add_force(p, what: str = "the output") -> None:
    p.add_argument("--force", action="store_true",
                   help=f"replace {what} if it exists (never an input); it is replaced only once the new one is "
                        "complete")


# ---- parsers ------------------------------------------------------------------------------------------------------

def _add_demo(sub):
    d = sub.add_parser("demo", help="train a tiny Qwen3 Code -> Math -> QA -> CW on the CPU; show the interference, "
                                    "the analyses and both recoveries",
                       description="Train a tiny Qwen3 (a supervised warm-up, then GRPO on Code -> Math -> QA -> CW), "
                                   "analyse its checkpoints with this package, and recover Math by rollback and by a "
                                   "Re-Math refresh. Writes DIR/ckpts/{base,code,math,qa,cw,remath}, "
                                   "DIR/results.json, DIR/figures/ and DIR/report.html (docs/demo.md).")
    d.add_argument("--out", default="lpt-demo", metavar="DIR", help="output directory (default lpt-demo/)")
    d.add_argument("--fast", action="store_true", help="the short version (about 80 s on 2 cores)")
    d.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    d.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the model is too small to gain from more)")
    _add_progress(d)
    _add_force(d, "an earlier demo's output at --out")


def _add_diff(sub):
    d = sub.add_parser("diff", help="profile the updates between checkpoints (one streaming pass)",
                       formatter_class=_Formatter,
                       description="Stream BASE and every CKPT once and write a per-unit update profile "
                                   "(profile.safetensors, profile.json) to a new directory --out. Deltas are named "
                                   "after the later checkpoint's directory (ckpts/math -> 'math').")
    d.add_argument("base", metavar="BASE", help="first checkpoint (HF directory, index or .safetensors file)")
    d.add_argument("ckpts", metavar="CKPT", nargs="+", help="later checkpoints, in training order")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty, see --force)")
    _add_force(d, "an existing --out directory")
    d.add_argument("--mode", choices=("consecutive", "base"), default="consecutive",
                   help="deltas between consecutive checkpoints (default) or each minus BASE")
    d.add_argument("--groups", default=None,
                   help="unit groups to profile (default: every group of the layout; mlp,attn,kv when built in)")
    d.add_argument("--atol", type=float, default=0.0,
                   help="near-zero change: |d| <= atol + rtol*|w|, w the earlier checkpoint's weight (default 0)")
    d.add_argument("--rtol", type=float, default=0.0, help="see --atol (default 0)")
    d.add_argument("--layout", metavar="SPEC", help="layout spec JSON for architectures not detected, or a built-in "
                   "family name (qwen3, qwen2, llama, mistral); see docs/layouts.md")
    d.add_argument("--intersect", action="store_true", help="analyse the common tensors if the checkpoints differ")
    d.add_argument("--labels", help="comma-separated names of the checkpoints (default: their directory names)")
    d.add_argument("--backend", choices=("auto", "reference", "cpu", "triton", "cuda"), default=None)
    _add_progress(d)


def _add_overlap(sub):
    o = sub.add_parser("overlap", help="Jaccard overlap of top-changed units and shared-unit cosines",
                       formatter_class=_Formatter,
                       description="Print the Jaccard matrix of the deltas' top units and the layer-averaged cosine "
                                   "of consecutive deltas on their shared top units.")
    o.add_argument("dir", metavar="DIR", help="a profile directory written by `lpt diff`")
    o.add_argument("--top", type=float, default=0.10, help="fraction of units taken as top-changed (default 0.10)")
    o.add_argument("--group", default=None, help="unit group (default: every group in the profile)")
    o.add_argument("--per-layer", action="store_true", help="take the top fraction within each layer")
    o.add_argument("--csv", metavar="FILE", help="also write the matrices as CSV")
    _add_force(o, "an existing --csv file")


def _add_report(sub):
    r = sub.add_parser("report", help="PNG plots and a self-contained HTML report of a profile",
                       formatter_class=_Formatter,
                       description="Draw the profile's pictures (update sparsity, change histograms, overlap of "
                                   "top-changed units, shared-unit cosines, per-layer update norms) as PNG files "
                                   "and one self-contained report.html with captions, in DIR/report (or --out).")
    r.add_argument("dir", metavar="DIR", help="a profile directory written by `lpt diff`")
    r.add_argument("--top", type=float, default=0.10, help="fraction of units taken as top-changed (default 0.10)")
    r.add_argument("--out", metavar="DIR", help="where to write (default: DIR/report)")
    _add_force(r, "an existing report directory")


def _score_args(s) -> None:
    s.add_argument("--profile", required=True, metavar="DIR", help="profile from `lpt diff` holding both deltas")
    s.add_argument("--earlier", required=True, help="delta name of the earlier domain E (e.g. math)")
    s.add_argument("--later", required=True, help="delta name of the later domain L (e.g. qa)")
    s.add_argument("--acts", metavar="DIR", help="activation statistics of E's data on E's model "
                                                 "(ActivationResult.save); needed by selectors with A")
    s.add_argument("--act-name", help="which run of --acts (if it holds several)")
    s.add_argument("--groups", default="mlp", help="unit groups, e.g. mlp or mlp,attn (default mlp)")
    s.add_argument("--allocation", choices=("conflict", "uniform", "activation"), default="conflict",
                   help="per-layer budget: by conflict mass (default), uniform, or activation mass")
    s.add_argument("--norm", choices=("rank", "zscore"), default="rank", help="score scale across joint groups")
    s.add_argument("--seed", type=int, default=0, help="seed of the random selector")


def _add_select(sub):
    s = sub.add_parser("select", help="choose units to roll back with the A x M x C conflict selector",
                       formatter_class=_Formatter,
                       description="Score the units of --later's displacement (A: activation on --earlier's data, "
                                   "M: displacement magnitude, C: conflict) and write a selection JSON.")
    _score_args(s)
    s.add_argument("--selector", default="AMC", help="AMC, AM, AC, MC, A, M, C or random (default AMC)")
    s.add_argument("--budget", type=float, default=0.02, help="fraction of the groups' units, in (0, 1] (default 0.02)")
    s.add_argument("--out", required=True, metavar="FILE", help="selection JSON to write")
    s.add_argument("--plot", metavar="PNG", help="also plot the per-layer budget profile")
    _add_force(s, "existing --out and --plot files")


def _add_rollback(sub):
    rb = sub.add_parser("rollback", help="write a checkpoint with the selected units rolled back",
                        formatter_class=_Formatter,
                        description="Copy TARGET to --out with the units of --select moved toward --from "
                                    "(alpha=1: replaced). TARGET and SOURCE are never modified; --out appears only "
                                    "when complete.")
    rb.add_argument("target", metavar="TARGET", help="the damaged checkpoint (after the later domain)")
    rb.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="the checkpoint to roll back to")
    rb.add_argument("--select", required=True, metavar="SEL", help="selection JSON from `lpt select`")
    rb.add_argument("--out", required=True, metavar="DIR", help="new checkpoint directory")
    _add_force(rb, "an existing --out directory")
    rb.add_argument("--alpha", type=float, default=1.0, help="interpolation toward SOURCE in [0, 1] (default 1)")
    rb.add_argument("--non-strict", dest="strict", action="store_false",
                    help="compare only the touched tensors of TARGET and SOURCE (e.g. a vocab-resized pair)")
    _add_progress(rb)


def _add_sweep(sub):
    w = sub.add_parser("sweep", help="recovery of the earlier domain over budgets and selectors",
                       formatter_class=_Formatter,
                       description="Load TARGET with transformers, roll back each selection live, evaluate with "
                                   "--eval, undo; write sweep.csv (with the before/damaged baselines) and "
                                   "dose_response.png. The evaluator contract is in docs/sweep.md: FUNC(model) "
                                   "gets the model on --device in --dtype, in eval mode, and returns "
                                   "{domain: score} (higher is better); recovery is of --earlier's score.")
    w.add_argument("target", metavar="TARGET", help="the damaged checkpoint directory (loadable by transformers)")
    w.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="the checkpoint before --later")
    _score_args(w)
    w.add_argument("--eval", required=True, metavar="MODULE:FUNC",
                   help="evaluator: FUNC(model) -> {domain: score}; MODULE is imported with the current "
                        "directory on the path (as python -m does)")
    w.add_argument("--before", metavar="JSON", help="scores at SOURCE ({domain: score}); default: evaluate SOURCE")
    w.add_argument("--budgets", default="0.01,0.02,0.04,0.08", help="comma-separated budgets in (0, 1]")
    w.add_argument("--selectors", default="AMC,MC,random", help="comma-separated selectors")
    w.add_argument("--device", default="cpu", help="device of the models: cpu, cuda, cuda:1, ... (default cpu)")
    w.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of the models (default auto: the checkpoint's own)")
    w.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty, see --force)")
    _add_force(w, "an existing --out directory")
    _add_progress(w)


def _parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="lpt", description="Analyse and intervene on multi-domain RL checkpoints.",
                                epilog=EPILOG, formatter_class=_Formatter)
    p.add_argument("--version", action=_VersionAction, help="print the version and the backends that run here")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return p, dict(sub.choices)


# ---- shared checks ------------------------------------------------------------------------------------------------

def _progress(a) -> bool:
    """A bar when asked (--progress), else only on a terminal, never with --quiet."""
    if getattr(a, "progress", False):
        return True
    return not getattr(a, "quiet", False) and sys.stderr.isatty()


def _csv_list(text: str, what: str) -> List[str]:
    items = [x.strip() for x in text.split(",")]
    if not items or any(not x for x in items):
        raise CliError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def _budgets(text: str, what: str = "--budgets") -> List[float]:
    out = []
    for x in _csv_list(text, what):
        try:
            b = float(x)
        except ValueError:
            raise CliError(f"{what}: {x!r} is not a number") from None
        if not 0.0 < b <= 1.0:
            raise CliError(f"{what}: budgets must be in (0, 1], got {x}")
        out.append(b)
    return out


def _selectors(names: Sequence[str], what: str) -> List[str]:
    from lpt_kernels.analysis.select import SELECTORS

    for s in names:
        if s not in SELECTORS:
            raise CliError(f"{what}: unknown selector {s!r} (expected one of {', '.join(SELECTORS)})")
    return list(names)


def _finite_nonneg(x: float, what: str) -> None:
    if not math.isfinite(x) or x < 0:
        raise CliError(f"{what}: must be a finite number >= 0, got {x}")


def _profile_inputs(prof_dir: str) -> List[str]:
    return [os.path.join(prof_dir, "profile.json"), os.path.join(prof_dir, "profile.safetensors")]


def _check_outputs(outputs: Sequence[Tuple[Optional[str], str, str]], force: bool, inputs: Sequence[Optional[str]]):
    """Check every output ``(path, kind, what)`` before anything is written or loaded: none may be, be inside, or
    contain an input (check_output), and each must be writable where it goes (a temp directory is made and removed
    in its nearest existing parent, so /proc/x fails now, not after the evaluations)."""
    import tempfile

    from lpt_kernels.checkpoint.writer import check_output

    inputs = [i for i in inputs if i]
    checked = []
    for path, kind, what in outputs:
        if path is None:
            continue
        p = check_output(path, kind=kind, force=force, inputs=inputs, what=what)
        for q, w in checked:  # two outputs of one command must not overlap either
            if q == p or q.startswith(p + os.sep) or p.startswith(q + os.sep):
                raise CliError(f"{what}: {path} overlaps {w}; choose another path")
        checked.append((p, what))
        parent = os.path.dirname(p)
        while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".lpt-probe-", dir=parent))
        except OSError as e:
            raise CliError(f"{what}: cannot write {path} (in {parent}: {e.strerror})") from None


def _load_scoring(a, selectors: Sequence[str]):
    """Load and check everything `select` and `sweep` score with (cheap: no model); returns (profile, acts,
    groups)."""
    from lpt_kernels.analysis import Profile

    prof = Profile.load(a.profile)
    for what, d in (("--earlier", a.earlier), ("--later", a.later)):
        if d not in prof.deltas:
            raise CliError(f"{what}: {d!r} is not a delta of {a.profile} (has {', '.join(prof.deltas)})")
    if a.earlier == a.later:
        raise CliError("--earlier and --later name the same delta")
    if prof.deltas.index(a.earlier) > prof.deltas.index(a.later):
        raise CliError(f"--earlier {a.earlier} comes after --later {a.later} in {a.profile} (training order: "
                       f"{', '.join(prof.deltas)}); the earlier domain must be trained first")
    groups = _csv_list(a.groups, "--groups")
    for g in groups:
        if g not in prof.groups:
            raise CliError(f"--groups: {g!r} is not in {a.profile} (has {', '.join(prof.groups)})")
    needs_a = next((f"selector {s}" for s in selectors if "A" in s), None)
    if needs_a is None and a.allocation == "activation":
        needs_a = "--allocation activation"
    acts = None
    if a.acts:
        from lpt_kernels.hooks import ActivationResult

        if not os.path.isdir(a.acts):
            raise CliError(f"--acts: {a.acts} " + ("is a file, not a directory (ActivationResult.save writes a "
                                                   "directory)" if os.path.exists(a.acts) else
                                                   "does not exist (no such directory)"))

        acts = ActivationResult.load(a.acts)
        if a.act_name is not None and a.act_name not in acts.names:
            raise CliError(f"--act-name: {a.act_name!r} is not a run of {a.acts} (has {', '.join(acts.names)})")
        if a.act_name is None and len(acts.names) > 1:
            raise CliError(f"--act-name: {a.acts} holds several runs ({', '.join(acts.names)}); say which is "
                           f"{a.earlier}'s data")
        for g in groups:
            if g not in acts.groups:
                raise CliError(f"--acts: {a.acts} has no {g!r} units (has {', '.join(acts.groups)})")
    elif needs_a:
        raise CliError(f"--acts: {needs_a} needs activation statistics of {a.earlier}'s data on {a.earlier}'s "
                       f"model (ActivationResult.save; see docs/hooks.md)")
    return prof, acts, groups


def _scores(a, prof, acts, groups):
    from lpt_kernels.analysis.select import conflict_scores

    scores = conflict_scores(prof, a.earlier, a.later, acts, groups=tuple(groups), act_name=a.act_name)
    return scores, prof.layout


def _plt():
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", module="matplotlib")
    return plt


# ---- commands -----------------------------------------------------------------------------------------------------

def _demo(a) -> int:
    from lpt_kernels.demo import run_demo

    run_demo(a.out, fast=a.fast, seed=a.seed, device=a.device, force=a.force, quiet=a.quiet, threads=a.threads,
             progress=_progress(a))
    if not a.quiet:
        print(f"wrote {os.path.join(a.out, 'report.html')}, {os.path.join(a.out, 'results.json')} and "
              f"{os.path.join(a.out, 'ckpts')}/")
    return 0


def _diff(a) -> int:
    from lpt_kernels import distributed
    from lpt_kernels.checkpoint.writer import AtomicDir

    paths = [a.base] + a.ckpts
    _check_outputs([(a.out, "dir", "--out")], a.force, paths)  # also writable: refused before the pass, not after
    out = AtomicDir(a.out, force=a.force, inputs=paths)
    labels = _csv_list(a.labels, "--labels") if a.labels else None
    if labels is not None and len(labels) != len(paths):
        raise CliError(f"--labels: {plural(len(labels), 'label')} for {plural(len(paths), 'checkpoint')}")
    groups = None if a.groups is None else _csv_list(a.groups, "--groups")
    _finite_nonneg(a.atol, "--atol")
    _finite_nonneg(a.rtol, "--rtol")
    for p in paths:
        if not os.path.exists(p):
            raise CliError(f"no such checkpoint: {p}")

    from lpt_kernels.analysis import diff

    prof = diff(paths, mode=a.mode, groups=None if groups is None else tuple(groups), atol=a.atol, rtol=a.rtol,
                layout=a.layout, intersect=a.intersect, labels=labels, progress=_progress(a),
                backend=None if a.backend in (None, "auto") else a.backend,
                distributed=distributed.world()[1] > 1)
    if prof is None:  # under torchrun: the other ranks' partials went to rank 0, which writes the profile
        return 0
    with out as tmp:
        prof.save(tmp)
    if not a.quiet:
        exact, tol = prof.sparsity(), prof.sparsity(tolerance=True)
        print(f"profile of {plural(len(prof.deltas), 'delta')} ({prof.meta['mode']}), layout "
              f"{prof.meta['layout'].get('name', '?')}, {plural(prof.meta['num_layers'], 'layer')} -> {a.out}")
        left_out = prof.meta.get("groups_left_out") or []
        print("  groups: " + ", ".join(f"{g} ({plural(len(ls), 'layer')})" for g, ls in
                                       prof.meta.get("group_layers", {}).items())
              + (f"; not analysed: {', '.join(left_out)}" if left_out else ""))
        width = max(_cols(d) for d in prof.deltas)
        for d in prof.deltas:
            line = f"  {_rjust(d, width)}: {exact[d]:7.2%} of parameters unchanged"
            if prof.meta["atol"] or prof.meta["rtol"]:
                line += f", {tol[d]:7.2%} within tolerance"
            print(line)
        if prof.meta["skipped"]:
            print(f"  skipped {plural(len(prof.meta['skipped']), 'tensor')} (listed in profile.json)")
        if prof.meta["mixed_dtypes"]:
            print(f"  {plural(len(prof.meta['mixed_dtypes']), 'tensor')} differ in dtype between checkpoints "
                  f"(allowed)")
    return 0


def _overlap(a) -> int:
    from lpt_kernels.analysis import Profile
    from lpt_kernels.analysis.report import changed_deltas

    if a.csv:
        _check_outputs([(a.csv, "file", "--csv")], a.force, [a.dir])
    prof = Profile.load(a.dir)
    if a.group and a.group not in prof.groups:
        raise CliError(f"--group: {a.group!r} is not in {a.dir} (has {', '.join(prof.groups)})")
    groups = [a.group] if a.group else prof.groups
    rows = []
    for g in groups:
        moved = changed_deltas(prof, g)
        if not moved:
            print(f"{g}: no delta changed any {g} unit; nothing to overlap")
            continue
        j = prof.jaccard(g, a.top, per_layer=a.per_layer)
        layers = prof.group_layers(g)  # per layer: the mean over the layers where the group has units
        if a.per_layer:
            j = j[layers].mean(0)
        print(f"{g}: Jaccard of the top-{a.top * 100:.3g}% changed units" + (" (within each layer, averaged over layers)"
                                                                      if a.per_layer else ""))
        width = max(_cols(d) for d in prof.deltas + ["0.000"]) + 2  # short labels: the values set the width
        print(" " * width + "".join(_rjust(d, width) for d in prof.deltas))
        for i, d in enumerate(prof.deltas):
            cells = []
            for k, e in enumerate(prof.deltas):
                ok = d in moved and e in moved
                v = j[i, k].item()
                cells.append(f"{v:>{width}.3f}" if ok else f"{'-':>{width}}")
                rows.append([g, "jaccard", d, e, "", f"{v:.6f}" if ok else ""])
            print(_rjust(d, width) + "".join(cells))
        still = [d for d in prof.deltas if d not in moved]
        if still:
            print(f"  - : {', '.join(still)} did not change any {g} unit")
        chance = prof.jaccard_chance(g, a.top, per_layer=a.per_layer)
        if a.per_layer:
            chance = chance[layers].mean(0)
        pairs = [(i, k) for i, d in enumerate(prof.deltas) for k, e in enumerate(prof.deltas)
                 if i < k and d in moved and e in moved]
        if pairs:
            levels = sorted({f"{chance[i, k].item():.3f}" for i, k in pairs}, key=float)
            print("  chance (random unit sets of the same sizes): "
                  + (levels[0] if len(levels) == 1 else f"{levels[0]} to {levels[-1]}"))
            rows += [[g, "jaccard_chance", prof.deltas[i], prof.deltas[k], "", f"{chance[i, k].item():.6f}"]
                     for i, k in pairs]
        for x, y in zip(prof.deltas[:-1], prof.deltas[1:]):
            if x not in moved or y not in moved:
                print(f"  cosine {x} vs {y}: undefined ({x if x not in moved else y} did not change {g})")
                continue
            c = prof.shared_cosine(x, y, g, a.top, per_layer_top=a.per_layer)
            ok = ~c["pooled"].isnan()
            if not ok.any():
                print(f"  cosine {x} vs {y}: " + ("no layer has units in both top sets" if not c["shared"].any() else
                                                  "not finite in any layer (non-finite weights in shared units)"))
            else:
                mean = c["pooled"][ok].mean().item()
                print(f"  cosine {x} vs {y} on shared top units: {mean:+.4f} (mean over "
                      f"{plural(int(ok.sum()), 'layer')} of {len(layers)} with shared units)")
            rows += [[g, "shared_cosine", x, y, str(layer), "" if math.isnan(v) else f"{v:.6f}"]
                     for layer, v in enumerate(c["pooled"].tolist()) if layer in layers]
    if a.csv:
        import csv

        from lpt_kernels.checkpoint.writer import atomic_file

        with atomic_file(a.csv, force=a.force, what="--csv") as tmp:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["group", "kind", "a", "b", "layer", "value"]] + rows)
    return 0


def _report(a) -> int:
    from lpt_kernels.analysis import Profile
    from lpt_kernels.analysis.report import write_report
    out = a.out or os.path.join(a.dir, "report")
    # its default output is DIR/report, inside the profile: the inputs are the profile's files, not DIR itself
    _check_outputs([(out, "dir", "--out")], a.force, _profile_inputs(a.dir))
    prof = Profile.load(a.dir)
    pics = write_report(prof, out, frac=a.top, force=a.force)
    print(f"wrote {plural(len(pics) - 1, 'plot')} and {pics['html']}")
    return 0


def _select(a) -> int:
    from lpt_kernels.checkpoint.writer import atomic_file

    # both outputs are checked (and refused if either is bad) before either is written
    _check_outputs([(a.out, "file", "--out"), (a.plot, "file", "--plot")], a.force, [a.profile, a.acts])
    _selectors([a.selector], "--selector")
    prof, acts, groups = _load_scoring(a, [a.selector])

    from lpt_kernels.analysis.select import select

    scores, layout = _scores(a, prof, acts, groups)
    sel = select(scores, layout, a.selector, a.budget, groups, a.allocation, a.norm, a.seed)
    with atomic_file(a.out, force=a.force) as tmp:
        sel.save(tmp)
    for g in groups:
        per = sel.per_layer(g)
        print(f"{g}: {plural(sel.count(g), 'unit')} selected ({sel.fraction(g):.2%} of {g}); per layer: {per}")
    m = sel.meta
    print(f"budget: asked {m['budget']:g} of {m['budget_total']} {m['budget_unit']} (target {m['budget_target']}), "
          f"spent {m['budget_spent']} ({m['budget_spent_fraction']:.2%})")
    print(f"wrote {a.out}")
    if a.plot:
        plt = _plt()
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(8, 3.4))
        for g in groups:
            ax.plot(range(len(sel.per_layer(g))), sel.per_layer(g), marker="o", ms=3, label=g)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, max(max(sel.per_layer(g)) for g in groups) * 1.15 + 1)
        ax.set_xlim(-0.5, layout.num_layers - 0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("units selected")
        ax.set_title(f"{a.selector} selection, budget {a.budget * 100:g}% of the {'+'.join(groups)} "
                     f"{'units' if len(groups) == 1 else 'parameters'} ({a.allocation} allocation)")
        if len(groups) > 1:
            ax.legend()
        fig.tight_layout()
        with atomic_file(a.plot, force=a.force, what="--plot") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
    return 0


def _rollback(a) -> int:
    if not 0.0 <= a.alpha <= 1.0:
        raise CliError(f"--alpha: must be in [0, 1], got {a.alpha}")
    from lpt_kernels import distributed
    from lpt_kernels.analysis.apply import rollback_checkpoint
    from lpt_kernels.analysis.selection import Selection

    _check_outputs([(a.out, "dir", "--out")], a.force, [a.target, a.source, a.select])
    rank, world = distributed.world()
    info = rollback_checkpoint(a.target, a.source, Selection.load(a.select), a.out, alpha=a.alpha,
                               progress=_progress(a) and rank == 0, strict=a.strict, force=a.force,
                               distributed=world > 1)
    if not a.quiet and rank == 0:
        mb = info["bytes_touched"] / 2**20
        print(f"wrote {a.out}: {plural(info['units'], 'unit')} in {plural(info['tensors'], 'tensor')} rolled back "
              f"({mb:.2f} MiB rewritten, {plural(info['files_copied'], 'file')} copied, "
              f"{info['seconds']:.2f} s)")
        if info.get("world_size", 1) > 1:
            print(f"  world_size {info['world_size']}: files per rank "
                  + ", ".join(str(r["files"]) for r in info["ranks"]) + "; MiB copied per rank "
                  + ", ".join(f"{r['bytes_copied'] / 2**20:.2f}" for r in info["ranks"]))
    return 0


def load_evaluator(spec: str, what: str = "--eval") -> Callable:
    """Import ``MODULE:FUNC`` with the current directory first on sys.path (as ``python -m`` does)."""
    import importlib

    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise CliError(f"{what}: expected MODULE:FUNC (e.g. my_evals:score), got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise CliError(f"{what}: cannot import {mod!r} ({e}; looked in {cwd} and the installed packages)") from None
    except Exception as e:  # noqa: BLE001 -- the user's module failed while importing
        raise CliError(f"{what}: importing {mod!r} failed: {type(e).__name__}: {e}") from None
    obj = module
    for part in fn.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{what}: module {mod!r} ({getattr(module, '__file__', '?')}) has no {fn!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{what}: {spec} is a {type(obj).__name__}, not a function")
    return obj


def _device_dtype(a):
    import torch

    try:
        device = torch.device(a.device)
    except (RuntimeError, ValueError):
        raise CliError(f"--device: {a.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device: {a.device} requested but no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device: {a.device}: only {plural(torch.cuda.device_count(), 'CUDA device')}")
    dtype = "auto" if a.dtype == "auto" else getattr(torch, a.dtype)
    return device, dtype


def _before_scores(a) -> Optional[dict]:
    if not a.before:
        return None
    import json

    try:
        with open(a.before) as f:
            before = json.load(f)
    except OSError as e:
        raise CliError(f"--before: cannot read {a.before} ({e.strerror})") from None
    except ValueError as e:
        raise CliError(f"--before: {a.before} is not valid JSON ({e})") from None
    from lpt_kernels.analysis.sweep import check_scores

    return check_scores(before, f"--before {a.before}", a.earlier)


def _sweep(a) -> int:
    _check_outputs([(a.out, "dir", "--out")], a.force, [a.target, a.source, a.profile, a.acts, a.before])
    try:
        import transformers  # noqa: F401 -- needed to load the models; said now, not after the checks
    except ImportError as e:
        raise CliError(f"lpt sweep needs transformers ({e}); pip install transformers") from None
    evaluate = load_evaluator(a.eval)
    budgets = _budgets(a.budgets)
    selectors = _selectors(_csv_list(a.selectors, "--selectors"), "--selectors")
    device, dtype = _device_dtype(a)
    before = _before_scores(a)
    for what, p in (("TARGET", a.target), ("--from", a.source)):
        if not os.path.isdir(p):
            raise CliError(f"{what}: {p} is not a checkpoint directory (transformers loads directories)")
    prof, acts, groups = _load_scoring(a, selectors)
    scores, layout = _scores(a, prof, acts, groups)

    # the heavy part: models
    from transformers import AutoModelForCausalLM

    from lpt_kernels.analysis.sweep import call_evaluator, sweep

    if not _progress(a):  # transformers' own loading bars follow ours: only on a terminal, or when asked
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    if before is None:  # the scores at SOURCE, then SOURCE's model is dropped before TARGET's is loaded
        src = load(a.source)
        before = call_evaluator(evaluate, src, a.earlier, a.eval)
        del src
    model = load(a.target)
    rows = sweep(model, a.source, scores, layout, evaluate, a.earlier, before, budgets, selectors, groups,
                 a.allocation, a.seed, a.out, progress=_progress(a), force=a.force, evaluator_name=a.eval)
    if not a.quiet:
        e = a.earlier
        if rows and before[e] - (rows[0][f"score/{e}"] - rows[0][f"collateral/{e}"]) <= 0:
            damaged = rows[0][f"score/{e}"] - rows[0][f"collateral/{e}"]
            print(f"note: {e} lost nothing at TARGET (score {before[e]:.4g} at --from, {damaged:.4g} at TARGET; "
                  f"higher is better), so its recovery is undefined (NaN in sweep.csv); see the collateral columns")
        for r in rows:
            rec = "undefined" if math.isnan(r["recovery"]) else f"{r['recovery']:+.1%}"
            print(f"{r['selector']:>8} budget {r['budget']:>6.2%} {plural(r['units'], 'unit'):>12}  recovery of "
                  f"{e} {rec}")
        print(f"wrote {os.path.join(a.out, 'sweep.csv')} and {os.path.join(a.out, 'dose_response.png')}")
    return 0


# ---- dispatch -----------------------------------------------------------------------------------------------------

# name -> (add the subparser, run it), in the order `lpt --help` lists them.
COMMANDS: Dict[str, Tuple[Callable, Callable]] = {
    "demo": (_add_demo, _demo),
    "diff": (_add_diff, _diff),
    "overlap": (_add_overlap, _overlap),
    "report": (_add_report, _report),
    "select": (_add_select, _select),
    "rollback": (_add_rollback, _rollback),
    "sweep": (_add_sweep, _sweep),
}


def _usage_checks(a, subs) -> None:
    """Range checks argparse cannot express: usage errors (exit 2) with the subcommand's usage."""
    p = subs[a.cmd]
    if a.cmd == "select" and not 0.0 < a.budget <= 1.0:
        p.error(f"argument --budget: must be in (0, 1], got {a.budget}")
    if a.cmd == "sweep":
        try:
            _budgets(a.budgets)
        except CliError as e:
            p.error(f"argument {e}")
    if a.cmd == "rollback" and not 0.0 <= a.alpha <= 1.0:
        p.error(f"argument --alpha: must be in [0, 1], got {a.alpha}")
    if a.cmd in ("overlap", "report") and not 0.0 < a.top <= 1.0:
        p.error(f"argument --top: must be in (0, 1], got {a.top}")


def _terminate_as_interrupt(signum, frame):
    """SIGTERM (kill, timeout, a job scheduler) cleans up like Ctrl-C: no temp left behind. Python prints and drops
    an exception raised inside a finalizer (a library's __del__ running when the signal lands), so there the signal
    is delivered again a moment later instead of being lost."""
    f = frame
    while f is not None:
        if f.f_code.co_name == "__del__":
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        f = f.f_back
    raise KeyboardInterrupt


def _one_line_warnings(cmd: str):
    """A warnings.formatwarning that prints the package's own warnings as "lpt CMD: warning: ..." on one line,
    without the file:line and source line Python shows by default; other warnings unchanged."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def fmt(message, category, filename, lineno, line=None) -> str:
        text = str(message)
        if _OWN_PREFIX.match(text) or os.path.abspath(filename).startswith(here):
            return f"lpt {cmd}: warning: {_OWN_PREFIX.sub('', text, count=1)}\n"
        return _python_format_warning(message, category, filename, lineno, line)
    return fmt


class _StdoutReaderMayLeave:
    """sys.stdout for the duration of a command: once its reader has gone away (`lpt overlap DIR --csv o.csv |
    head -1`), further output is dropped, so the command still finishes the files it was asked to write, and ends
    without an error message (nor one from Python's last flush at exit)."""

    def __init__(self, stream):
        self._stream, self.gone = stream, False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._leave()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._leave()

    def _leave(self) -> None:
        self.gone = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):  # not a file descriptor (an in-process caller's stream)
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: Optional[List[str]] = None) -> int:
    saved_format, saved_stdout = warnings.formatwarning, sys.stdout
    sys.stdout = out = _StdoutReaderMayLeave(sys.stdout)
    try:
        return _main(argv)
    finally:
        out.flush()  # also after --version / --help (SystemExit): a reader that went away shows here, quietly
        sys.stdout, warnings.formatwarning = saved_stdout, saved_format  # main() may be called in-process


def _main(argv: Optional[List[str]]) -> int:
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    parser, subs = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # a mistyped flag: the subcommand's usage, not the top-level one
        subs[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    _usage_checks(args, subs)
    warnings.formatwarning = _one_line_warnings(args.cmd)
    try:
        run = COMMANDS[args.cmd][1]
        if args.cmd in ("diff", "rollback"):  # under torchrun: one process group for the ranks (docs/distributed.md)
            from lpt_kernels import distributed

            with distributed.from_env():
                return run(args)
        return run(args)
    except KeyboardInterrupt:
        print(f"lpt {args.cmd}: interrupted", file=sys.stderr)
        # CPython (3.11 here) marks a KeyboardInterrupt raised inside exec() of a string (dataclasses and transformers
        # build classes that way while importing) as unhandled even once it is caught, and `python -m` then ends
        # the process by SIGINT (exit -2) instead of with this code; an exec that completes clears the mark.
        exec("")
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, Warning) as e:  # Warning: under PYTHONWARNINGS=error
        if os.environ.get("LPT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = _OWN_PREFIX.sub("", msg, count=1)
        print(f"lpt {args.cmd}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
