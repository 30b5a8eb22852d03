"""The `lpt` command: a thin shell over lpt_kernels.analysis (everything it does is callable from Python).

Exit codes: 0 success, 1 an error in the inputs or the run (one line on stderr), 2 a usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EPILOG = """examples:
  lpt diff ckpts/base ckpts/code ckpts/math ckpts/qa ckpts/cw --out prof/
  lpt overlap prof/ --top 0.10 --group mlp
  lpt report prof/            # PNGs and a self-contained prof/report/report.html
  lpt select --profile prof/ --acts acts/ --earlier math --later qa --budget 0.02 --out sel.json
  lpt rollback ckpts/qa --from ckpts/math --select sel.json --out ckpts/qa-rolled
  lpt sweep ckpts/qa --from ckpts/math --profile prof/ --acts acts/ --earlier math --later qa
        --eval my_evals:score --budgets 0.01,0.02,0.04 --out sweep/
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpt", description="Analyse and intervene on multi-domain RL checkpoints.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("diff", help="profile the updates between checkpoints (one streaming pass)",
                       description="Stream BASE and every CKPT once and write a per-unit update profile to --out.")
    d.add_argument("base", metavar="BASE", help="first checkpoint (HF directory or .safetensors file)")
    d.add_argument("ckpts", metavar="CKPT", nargs="+", help="later checkpoints, in training order")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory (profile.safetensors, profile.json)")
    d.add_argument("--mode", choices=("consecutive", "base"), default="consecutive",
                   help="deltas between consecutive checkpoints (default) or each minus BASE")
    d.add_argument("--groups", default=None,
                   help="unit groups to profile (default: every group of the layout; mlp,attn,kv when built in)")
    d.add_argument("--atol", type=float, default=0.0, help="near-zero: |d| <= atol + rtol*|w| (default 0)")
    d.add_argument("--rtol", type=float, default=0.0, help="see --atol (default 0)")
    d.add_argument("--layout", metavar="SPEC", help="layout spec JSON for architectures not detected, or a built-in family name "
                        "(qwen3, qwen2, llama, mistral); see docs/layouts.md")
    d.add_argument("--intersect", action="store_true", help="analyse the common tensors if the checkpoints differ")
    d.add_argument("--labels", help="comma-separated names of the checkpoints (default: directory names)")
    d.add_argument("--backend", choices=("auto", "reference", "cpu", "triton", "cuda"), default=None)
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    o = sub.add_parser("overlap", help="Jaccard overlap of top-changed units and shared-unit cosines",
                       description="Print the Jaccard matrix of the deltas' top units and the layer-averaged cosine "
                                   "of consecutive deltas on their shared top units.")
    o.add_argument("dir", metavar="DIR", help="a profile directory written by `lpt diff`")
    o.add_argument("--top", type=float, default=0.10, help="fraction of units taken as top-changed (default 0.10)")
    o.add_argument("--group", default=None, help="unit group (default: every group in the profile)")
    o.add_argument("--per-layer", action="store_true", help="take the top fraction within each layer")
    o.add_argument("--csv", metavar="FILE", help="also write the matrices as CSV")

    r = sub.add_parser("report", help="PNG plots and a self-contained HTML report of a profile")
    r.add_argument("dir", metavar="DIR", help="a profile directory written by `lpt diff`")
    r.add_argument("--top", type=float, default=0.10, help="fraction of units taken as top-changed (default 0.10)")
    r.add_argument("--out", metavar="DIR", help="where to write (default: DIR/report)")

    s = sub.add_parser("select", help="choose units to roll back with the A x M x C conflict selector",
                       description="Score the units of --later's displacement (A: activation on --earlier's data, "
                                   "M: displacement magnitude, C: conflict) and write a selection JSON.")
    _score_args(s)
    s.add_argument("--selector", default="AMC", help="AMC, AM, AC, MC, A, M, C or random (default AMC)")
    s.add_argument("--budget", type=float, default=0.02, help="fraction of the groups' units, in (0, 1] (default 0.02)")
    s.add_argument("--out", required=True, metavar="FILE", help="selection JSON to write")
    s.add_argument("--plot", metavar="PNG", help="also plot the per-layer budget profile")

    rb = sub.add_parser("rollback", help="write a checkpoint with the selected units rolled back",
                        description="Copy TARGET to --out with the units of --select moved toward --from "
                                    "(alpha=1: replaced). TARGET and SOURCE are never modified; --out appears only "
                                    "when complete.")
    rb.add_argument("target", metavar="TARGET", help="the damaged checkpoint (after the later domain)")
    rb.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="the checkpoint to roll back to")
    rb.add_argument("--select", required=True, metavar="SEL", help="selection JSON from `lpt select`")
    rb.add_argument("--out", required=True, metavar="DIR", help="new checkpoint directory (must not exist)")
    rb.add_argument("--alpha", type=float, default=1.0, help="interpolation toward SOURCE in [0, 1] (default 1)")
    rb.add_argument("--non-strict", dest="strict", action="store_false",
                    help="compare only the touched tensors of TARGET and SOURCE (e.g. a vocab-resized pair)")
    rb.add_argument("--quiet", "-q", action="store_true")

    w = sub.add_parser("sweep", help="recovery of the earlier domain over budgets and selectors",
                       description="Load TARGET with transformers, roll back each selection live, evaluate with "
                                   "--eval, undo; write sweep.csv and dose_response.png.")
    w.add_argument("target", metavar="TARGET", help="the damaged checkpoint directory (loadable by transformers)")
    w.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="the checkpoint before --later")
    _score_args(w)
    w.add_argument("--eval", required=True, metavar="MODULE:FUNC",
                   help="evaluator: FUNC(model) -> {domain: score} (higher is better)")
    w.add_argument("--before", metavar="JSON", help="scores at SOURCE ({domain: score}); default: evaluate SOURCE")
    w.add_argument("--budgets", default="0.01,0.02,0.04,0.08", help="comma-separated budgets")
    w.add_argument("--selectors", default="AMC,MC,random", help="comma-separated selectors")
    w.add_argument("--out", required=True, metavar="DIR", help="output directory")
    w.add_argument("--quiet", "-q", action="store_true")
    return p


def _score_args(s) -> None:
    s.add_argument("--profile", required=True, metavar="DIR", help="profile from `lpt diff` holding both deltas")
    s.add_argument("--earlier", required=True, help="delta name of the earlier domain E (e.g. math)")
    s.add_argument("--later", required=True, help="delta name of the later domain L (e.g. qa)")
    s.add_argument("--acts", metavar="DIR", help="activation statistics of E's data (ActivationResult.save)")
    s.add_argument("--act-name", help="which run of --acts (if it holds several)")
    s.add_argument("--groups", default="mlp", help="unit groups, e.g. mlp or mlp,attn (default mlp)")
    s.add_argument("--allocation", choices=("conflict", "uniform", "activation"), default="conflict",
                   help="per-layer budget: by conflict mass (default), uniform, or activation mass")
    s.add_argument("--norm", choices=("rank", "zscore"), default="rank", help="score scale across joint groups")
    s.add_argument("--seed", type=int, default=0, help="seed of the random selector")


def _scores(a):
    from lpt_kernels.analysis import Profile
    from lpt_kernels.analysis.select import conflict_scores
    from lpt_kernels.layout import layout_from_spec

    prof = Profile.load(a.profile)
    acts = None
    if a.acts:
        from lpt_kernels.hooks import ActivationResult
        acts = ActivationResult.load(a.acts)
    groups = tuple(g.strip() for g in a.groups.split(",") if g.strip())
    scores = conflict_scores(prof, a.earlier, a.later, acts, groups=groups, act_name=a.act_name)
    layout = layout_from_spec(prof.meta["layout"], list(prof.tensors), None)
    return scores, layout, groups


def _select(a) -> int:
    from lpt_kernels.analysis.select import select

    scores, layout, groups = _scores(a)
    if "A" in a.selector and not a.acts:
        raise ValueError(f"--acts: selector {a.selector} needs activation statistics of the earlier domain")
    sel = select(scores, layout, a.selector, a.budget, groups, a.allocation, a.norm, a.seed)
    sel.save(a.out)
    for g in groups:
        print(f"{g}: {sel.count(g)} units ({sel.fraction(g):.2%}); per layer: {sel.per_layer(g)}")
    m = sel.meta
    print(f"budget: asked {m['budget']:g} of {m['budget_total']} {m['budget_unit']} (target {m['budget_target']}), "
          f"spent {m['budget_spent']} ({m['budget_spent_fraction']:.2%})")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.4))
        for g in groups:
            ax.plot(sel.per_layer(g), marker="o", ms=3, label=g)
        ax.set_xlabel("layer")
        ax.set_ylabel("units selected")
        ax.set_title(f"{a.selector} selection, budget {a.budget:g} ({a.allocation} allocation)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
    return 0


def _rollback(a) -> int:
    from lpt_kernels.analysis.apply import rollback_checkpoint
    from lpt_kernels.analysis.selection import Selection

    from lpt_kernels import distributed

    rank, world = distributed.world()
    info = rollback_checkpoint(a.target, a.source, Selection.load(a.select), a.out, alpha=a.alpha,
                               progress=not a.quiet and rank == 0, strict=a.strict, distributed=world > 1)
    if not a.quiet and rank == 0:
        print(f"wrote {a.out}: " + ", ".join(f"{k} {v}" for k, v in info.items() if isinstance(v, (int, float))))
    return 0


def _sweep(a) -> int:
    import importlib
    import json

    from transformers import AutoModelForCausalLM

    from lpt_kernels.analysis.sweep import sweep

    mod, _, fn = a.eval.partition(":")
    try:
        evaluate = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--eval: cannot load {a.eval} ({e})") from None
    scores, layout, groups = _scores(a)
    budgets = [float(x) for x in a.budgets.split(",") if x]
    selectors = [x.strip() for x in a.selectors.split(",") if x.strip()]
    if a.before:
        with open(a.before) as f:
            before = json.load(f)
    else:
        before = evaluate(AutoModelForCausalLM.from_pretrained(a.source, dtype="auto"))
    model = AutoModelForCausalLM.from_pretrained(a.target, dtype="auto")
    rows = sweep(model, a.source, scores, layout, evaluate, a.earlier, before, budgets, selectors, groups,
                 a.allocation, a.seed, a.out, progress=not a.quiet)
    for r in rows:
        print(f"{r['selector']:>8} budget {r['budget']:<6g} units {r['units']:>6}  recovery {r['recovery']:+.1%}")
    return 0


def _diff(a) -> int:
    from lpt_kernels import distributed
    from lpt_kernels.analysis import diff

    labels = a.labels.split(",") if a.labels else None
    groups = None if a.groups is None else tuple(g.strip() for g in a.groups.split(",") if g.strip())
    prof = diff([a.base] + a.ckpts, mode=a.mode, groups=groups, atol=a.atol, rtol=a.rtol, layout=a.layout,
                intersect=a.intersect, labels=labels, progress=not a.quiet,
                backend=None if a.backend in (None, "auto") else a.backend,
                distributed=distributed.world()[1] > 1)
    if prof is None:  # under torchrun: rank 0 writes the profile
        return 0
    prof.save(a.out)
    if not a.quiet:
        exact, tol = prof.sparsity(), prof.sparsity(tolerance=True)
        print(f"profile of {len(prof.deltas)} deltas ({prof.meta['mode']}), layout {prof.meta['layout']['name']}, "
              f"{prof.meta['num_layers']} layers -> {a.out}")
        print("  groups: " + ", ".join(f"{g} ({len(ls)} layers)" for g, ls in prof.meta["group_layers"].items())
              + (f"; not analysed: {', '.join(prof.meta['groups_left_out'])}" if prof.meta["groups_left_out"] else ""))
        for d in prof.deltas:
            print(f"  {d:>16}: {exact[d]:7.2%} unchanged, {tol[d]:7.2%} within tolerance")
        if prof.meta["skipped"]:
            print(f"  skipped {len(prof.meta['skipped'])} tensors (listed in profile.json)")
        if prof.meta["mixed_dtypes"]:
            print(f"  {len(prof.meta['mixed_dtypes'])} tensors differ in dtype between checkpoints (allowed)")
    return 0


def _overlap(a) -> int:
    from lpt_kernels.analysis import Profile

    prof = Profile.load(a.dir)
    groups = [a.group] if a.group else prof.groups
    rows = []
    for g in groups:
        j = prof.jaccard(g, a.top, per_layer=False if not a.per_layer else True)
        if a.per_layer:
            j = j.mean(0)
        print(f"{g}: Jaccard of top-{a.top:.0%} units" + (" (per layer, averaged)" if a.per_layer else ""))
        width = max(len(d) for d in prof.deltas) + 2
        print(" " * width + "".join(f"{d:>{width}}" for d in prof.deltas))
        for i, d in enumerate(prof.deltas):
            print(f"{d:>{width}}" + "".join(f"{v:>{width}.3f}" for v in j[i].tolist()))
            rows += [[g, "jaccard", d, e, f"{v:.6f}"] for e, v in zip(prof.deltas, j[i].tolist())]
        for x, y in zip(prof.deltas[:-1], prof.deltas[1:]):
            c = prof.shared_cosine(x, y, g, a.top, per_layer_top=a.per_layer)
            ok = ~c["pooled"].isnan()
            mean = c["pooled"][ok].mean().item() if ok.any() else float("nan")
            print(f"  cosine {x} vs {y} on shared top units: {mean:+.4f} (mean over {int(ok.sum())} layers)")
            rows += [[g, "shared_cosine", x, y, f"{v:.6f}"] for v in c["pooled"].tolist()]
    if a.csv:
        import csv

        with open(a.csv, "w", newline="") as f:
            csv.writer(f).writerows([["group", "kind", "a", "b", "value"]] + rows)
    return 0


def _report(a) -> int:
    from lpt_kernels.analysis import Profile
    from lpt_kernels.analysis.report import write_report

    prof = Profile.load(a.dir)
    out = a.out or os.path.join(a.dir, "report")
    pics = write_report(prof, out, frac=a.top)
    print(f"wrote {len(pics) - 1} plots and {pics['html']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd in ("select", "sweep"):
        budgets = [args.budget] if args.cmd == "select" else args.budgets.split(",")
        try:
            bad = [b for b in budgets if not 0.0 < float(b) <= 1.0]
        except ValueError:
            bad = budgets
        if bad:
            print(f"lpt {args.cmd}: error: budgets must be in (0, 1], got {bad[0]}", file=sys.stderr)
            return 2
    if args.cmd == "rollback" and not 0.0 <= args.alpha <= 1.0:
        print(f"lpt rollback: error: --alpha must be in [0, 1], got {args.alpha}", file=sys.stderr)
        return 2
    if args.cmd == "overlap" or args.cmd == "report":
        if not 0.0 < args.top <= 1.0:
            print(f"lpt {args.cmd}: error: --top must be in (0, 1], got {args.top}", file=sys.stderr)
            return 2
    try:
        run = {"diff": _diff, "overlap": _overlap, "report": _report, "select": _select, "rollback": _rollback,
               "sweep": _sweep}[args.cmd]
        if args.cmd in ("diff", "rollback"):  # under torchrun: one process group for the ranks (docs/distributed.md)
            from lpt_kernels import distributed
            with distributed.from_env():
                return run(args)
        return run(args)
    except KeyboardInterrupt:
        print(f"lpt {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lpt {args.cmd}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
