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
    d.add_argument("--groups", default="mlp,attn,kv", help="unit groups to profile (default: mlp,attn,kv)")
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
    return p


def _diff(a) -> int:
    from lpt_kernels.analysis import diff

    labels = a.labels.split(",") if a.labels else None
    groups = tuple(g.strip() for g in a.groups.split(",") if g.strip())
    prof = diff([a.base] + a.ckpts, mode=a.mode, groups=groups, atol=a.atol, rtol=a.rtol, layout=a.layout,
                intersect=a.intersect, labels=labels, progress=not a.quiet,
                backend=None if a.backend in (None, "auto") else a.backend)
    prof.save(a.out)
    if not a.quiet:
        exact, tol = prof.sparsity(), prof.sparsity(tolerance=True)
        print(f"profile of {len(prof.deltas)} deltas ({prof.meta['mode']}), layout {prof.meta['layout']['name']}, "
              f"{prof.meta['num_layers']} layers -> {a.out}")
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
    if args.cmd == "overlap" or args.cmd == "report":
        if not 0.0 < args.top <= 1.0:
            print(f"lpt {args.cmd}: error: --top must be in (0, 1], got {args.top}", file=sys.stderr)
            return 2
    try:
        return {"diff": _diff, "overlap": _overlap, "report": _report}[args.cmd](args)
    except KeyboardInterrupt:
        print(f"lpt {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lpt {args.cmd}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
