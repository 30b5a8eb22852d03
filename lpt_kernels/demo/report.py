"""The demo's printed tables (laid out like the paper's), figures and self-contained report.html."""
from __future__ import annotations

import base64
import html
import math
import os
from typing import Dict, List, Optional

from lpt_kernels.demo.domains import CURRICULUM, DOMAINS
from lpt_kernels.demo.interventions import aggregate

# The paper's values the demo's stand beside (Qwen3-4B, GRPO, Code -> Math -> QA -> CW).
PAPER = {
    "sparsity_after_one": 0.776, "sparsity_after_four": 0.734,
    "recovery": {"AMC@0.02": 0.204, "MC@0.02": 0.183, "AMC/act-budget@0.02": 0.166, "AMC@0.04": 0.294,
                 "AMC+attn@0.32": 0.736},
    "remath_math": [57.66, 66.04],
}
LABEL = {"math": "Math", "code": "Code", "qa": "QA", "cw": "CW", "avg": "AVG"}
COLORS = {"math": "#d62728", "code": "#1f77b4", "qa": "#2ca02c", "cw": "#9467bd"}


def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def _paper_recovery(selector: str, groups: str, budget: float) -> Optional[float]:
    key = f"{selector}{'+attn' if groups != 'mlp' else ''}@{budget:g}"
    return PAPER["recovery"].get(key)


# ---- text ---------------------------------------------------------------------------------------------------------

def stage_rows(results: dict) -> List[List[str]]:
    rows = []
    for s in results["stages"]:
        name = "base" if s["name"] == "base" else f"+ {LABEL[s['name']]}"
        rows.append([name] + [f"{s['scores'][d]:.1f}" for d in DOMAINS + ("avg",)])
    last = results["refresh"][-1]
    rows.append([f"+ Re-Math ({last['step']} steps)"] + [f"{last['scores'][d]:.1f}" for d in DOMAINS + ("avg",)])
    return rows


def rollback_rows(results: dict, groups: str) -> List[List[str]]:
    rows_in = results["rollback"]
    selectors = list(dict.fromkeys(r["selector"] for r in rows_in if r["groups"] == groups))
    out = []
    for sel in selectors:
        for b in results["config"]["budgets"]:
            a = aggregate(rows_in, sel, groups, b)
            if a is None:
                continue
            rec = _pct(a["recovery"], True)
            if a["n"] > 1 and a["min"] is not None:
                rec += f" [{100 * a['min']:+.0f}, {100 * a['max']:+.0f}]"
            paper = _paper_recovery(sel, groups, b)
            out.append([sel if a["n"] == 1 else f"{sel} (x{a['n']} seeds)", f"{100 * b:g}%",
                        f"{a['scores']['math']:.1f}", rec] +
                       [f"{a['collateral'][d]:+.1f}" for d in DOMAINS if d != "math"] +
                       [_pct(paper) if paper is not None else ""])
    return out


def _fmt_table(head: List[str], rows: List[List[str]]) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w[i]) if i else str(x).ljust(w[i]) for i, x in enumerate(r))
    return "\n".join([line(head), line(["-" * n for n in w])] + [line(r) for r in rows])


def finding_rows(results: dict) -> List[List[str]]:
    a = results["analyses"]
    sp, summ = a["sparsity"], a["summary"]
    first, last = CURRICULUM[0], CURRICULUM[-1]
    ref = results["rollback_reference"]
    fl = results["floors"]
    rows = [
        ["update sparsity after one domain (exact / |dW|<=%g)" % sp["atol"],
         f"{_pct(sp['exact'][first])} / {_pct(sp['tolerance'][first])}", _pct(PAPER["sparsity_after_one"])],
        ["update sparsity after four domains (exact / tol)",
         f"{_pct(sp['exact'][last])} / {_pct(sp['tolerance'][last])}", _pct(PAPER["sparsity_after_four"])],
        ["Jaccard of top-10% changed MLP neurons (mean over pairs)", f"{summ['changed_jaccard_mean']:.2f}",
         "lower than active"],
        ["Jaccard of top-5% active MLP neurons (mean over pairs)", f"{summ['active_jaccard_mean']:.2f}",
         "higher than changed"],
        ["|gradient cosine| between domains, whole model (mean)", f"{summ['grad_cosine_mean_abs']:.3f}", "near 0"],
        ["Math: after Math -> after QA (rollback reference)", f"{ref['before']['math']:.1f} -> "
         f"{ref['damaged']['math']:.1f}", ""],
        ["Math: after Math -> after CW -> after Re-Math", f"{fl['math_after_math']:.1f} -> {fl['math_after_cw']:.1f}"
         f" -> {fl['math_after_refresh']:.1f}", f"-> {PAPER['remath_math'][0]} -> {PAPER['remath_math'][1]}"],
    ]
    return rows


def text(results: dict) -> str:
    """The printed summary: per-stage scores, rollback tables, findings beside the paper, floors, timing."""
    parts = ["", "Scores per stage (greedy, held-out sets, %)",
             _fmt_table(["stage"] + [LABEL[d] for d in DOMAINS] + ["AVG"], stage_rows(results))]
    ref = results["rollback_reference"]
    head = ["selector", "beta", "Math", "recovery"] + [f"d{LABEL[d]}" for d in DOMAINS if d != "math"] + ["paper"]
    for groups, title in (("mlp", "MLP neurons"), ("mlp,attn", "MLP neurons + attention heads (budget in parameters)")):
        parts += ["", f"Rollback of QA's displacement toward Math, {title}: Math {ref['before']['math']:.1f} before "
                      f"QA, {ref['damaged']['math']:.1f} after (recovery = share of that loss brought back; "
                      "dX = change of the other domains in points)",
                  _fmt_table(head, rollback_rows(results, groups))]
    parts += ["", "Findings beside the paper", _fmt_table(["quantity", "demo", "paper"], finding_rows(results))]
    fl = results["floors"]
    parts += ["", f"Interference: Math fell {fl['math_drop']:.1f} points after QA and CW "
                  f"({'meets' if fl['drop_ok'] else 'BELOW'} the 10-point floor); the Re-Math refresh brought back "
                  f"{_pct(fl['refresh_recovered'])} of it ({'meets' if fl['refresh_ok'] else 'BELOW'} the 50% floor)."]
    m = results["tracking"]["matches_diff"]
    parts += [f"DeltaTracker in the training loop ({len(results['tracking']['curves'])} tracked steps): its profile "
              + (f"equals lpt diff of the saved checkpoints ({m['arrays']} per-unit arrays)." if m["equal"] else
                 "DIFFERS from lpt diff of the saved checkpoints (a bug: please report it).")]
    if "timing" in results:
        t = results["timing"]["phases"]
        parts += ["", f"Time per phase (wall / CPU s, {results['timing']['threads']} thread(s)): " +
                  ", ".join(f"{k} {v['wall_s']:.1f}/{v['cpu_s']:.1f}" for k, v in t.items())]
    return "\n".join(parts)


# ---- figures ------------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def fig_stages(results: dict, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [s["name"] for s in results["stages"]] + ["re-math"]
    scores = [s["scores"] for s in results["stages"]] + [results["refresh"][-1]["scores"]]
    x = list(range(len(names)))
    for d in DOMAINS:
        ax.plot(x, [s[d] for s in scores], marker="o", color=COLORS[d], label=LABEL[d], lw=2.2 if d == "math" else 1.2)
    ax.set_xticks(x, ["base", "+code", "+math", "+qa", "+cw", "+re-math"])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-stage scores: Math rises with its stage, falls under QA and CW, returns with Re-Math")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, ncol=4)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def fig_dose(results: dict, path: str) -> str:
    plt = _plt()
    rows = results["rollback"]
    budgets = results["config"]["budgets"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, groups, title in ((axes[0], "mlp", "MLP neurons"), (axes[1], "mlp,attn", "MLP + attention (joint)")):
        xs = [100 * b for b in budgets]
        rand = [aggregate(rows, "random", groups, b) for b in budgets]
        if all(r is not None and r["min"] is not None for r in rand):
            ax.fill_between(xs, [100 * r["min"] for r in rand], [100 * r["max"] for r in rand], color="grey",
                            alpha=0.3, label=f"random (min-max of {rand[0]['n']})")
            ax.plot(xs, [100 * r["recovery"] for r in rand], color="grey", lw=1)
        for sel in dict.fromkeys(r["selector"] for r in rows if r["groups"] == groups and r["selector"] != "random"):
            pts = [aggregate(rows, sel, groups, b) for b in budgets]
            ax.plot(xs, [100 * p["recovery"] if p["recovery"] is not None else float("nan") for p in pts],
                    marker="o", ms=3, label=sel,
                    lw=2 if sel == "AMC" else 1)
        paper = [(100 * float(k.split("@")[1]), 100 * v) for k, v in PAPER["recovery"].items()
                 if ("+attn" in k) == (groups != "mlp")]
        if paper:
            ax.scatter(*zip(*paper), marker="*", s=90, color="k", zorder=5, label="paper (AMC etc.)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("budget beta (% of units / parameters)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Math recovery (%)")
    return _save(fig, path)


def fig_layer_budget(results: dict, path: str) -> str:
    plt = _plt()
    lb = results["layer_budget"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    n = len(next(iter(lb.values())))
    w = 0.8 / len(lb)
    for i, (alloc, counts) in enumerate(lb.items()):
        ax.bar([l + (i - (len(lb) - 1) / 2) * w for l in range(n)], counts, width=w, label=alloc)
    ax.set_xticks(range(n), [f"layer {l}" for l in range(n)])
    ax.set_ylabel("MLP neurons selected")
    ax.set_title("Per-layer budget of A x M x C at beta = 2%", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fig_jaccard(results: dict, path: str) -> str:
    plt = _plt()
    a = results["analyses"]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    for ax, key, title in ((axes[0], "changed_jaccard", "top-10% changed MLP neurons"),
                           (axes[1], "active_jaccard", "top-5% active MLP neurons")):
        m, names = a[key]["matrix"], a[key]["domains"]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), [LABEL[n] for n in names])
        ax.set_yticks(range(len(names)), [LABEL[n] for n in names])
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=8,
                        color="w" if m[i][j] < 0.6 else "k")
        ax.set_title(f"Jaccard: {title}", fontsize=9)
    fig.colorbar(im, ax=axes, fraction=0.03)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def fig_shared_cosine(results: dict, path: str) -> str:
    plt = _plt()
    sc = results["analyses"]["shared_cosine"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for pair, v in sc.items():
        a, b = pair.split("|")
        ax.plot(range(len(v["pooled"])), v["pooled"], marker="o", label=f"{LABEL[a]} vs {LABEL[b]}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine on shared top-10% neurons")
    ax.set_title("Consecutive updates on the neurons both changed most", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def fig_tracking(results: dict, path: str) -> str:
    """The DeltaTracker's curves over the GRPO stages: each domain's MLP update norm since its start, the Jaccard
    overlap of its top-10% changed neurons with each earlier domain's, and the cosine of the updates on the neurons
    both share. (Its sparsity is not drawn: the live weights are fp32, where nearly every weight moves.)"""
    plt = _plt()
    curves = results["tracking"]["curves"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    offset, starts = 0, {}
    for d in CURRICULUM:
        pts = [c for c in curves if c["domain"] == d]
        starts[d] = offset
        x = [offset + c["step"] for c in pts]
        axes[0].plot(x, [c["metrics"][f"lpt/{d}/mlp/update_norm"] for c in pts], color=COLORS[d], label=LABEL[d])
        for e in CURRICULUM[:CURRICULUM.index(d)]:
            ls = ("-", "--", ":")[CURRICULUM.index(e)]
            for ax, what in ((axes[1], "top10_jaccard"), (axes[2], "shared_cosine")):
                key = f"lpt/{d}/mlp/{what}/{e}"
                ax.plot(x, [c["metrics"].get(key, float("nan")) for c in pts], color=COLORS[d], ls=ls, lw=1.2,
                        label=f"{LABEL[d]} vs {LABEL[e]}")
        offset += max((c["step"] for c in pts), default=0)
    for ax, title, ylabel in ((axes[0], "update norm since the domain's start (MLP)", "||dW||"),
                              (axes[1], "overlap of top-10% changed neurons with earlier domains'", "Jaccard"),
                              (axes[2], "cosine with earlier domains' updates, shared top-10% neurons", "cosine")):
        ax.set_title(title, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("GRPO step (Code, Math, QA, CW in turn)")
        for d, x0 in starts.items():
            if x0:
                ax.axvline(x0 + 0.5, color="0.8", lw=0.8)
        ax.grid(alpha=0.3)
    axes[2].axhline(0, color="0.4", lw=0.8)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6, ncol=2)
    return _save(fig, path)


def _sign_sentence(shared: dict) -> str:
    vals = [c for pair in shared.values() for c in pair["pooled"] if c is not None]
    if not vals:
        return "Here no layer has shared top neurons."
    neg = sum(c < 0 for c in vals)
    return (f"Here {neg} of {len(vals)} layer-pair cosines are negative (range {min(vals):+.2f} to {max(vals):+.2f})"
            + (": the toy's damage does not come from anti-aligned updates on shared neurons." if neg == 0 else "."))


def _tracking_caption(results: dict) -> str:
    tr = results["tracking"]
    m = tr["matches_diff"]
    same = (f"equals <code>lpt diff</code> of the saved checkpoints ({m['arrays']} per-unit arrays, counts bit for bit, "
            f"sums within {m['max_rel_err']:.0e} relative)" if m["equal"] else
            "does <b>not</b> equal <code>lpt diff</code> of the saved checkpoints (a bug: please report it)")
    return ("What a training loop sees with <code>DeltaTracker</code> (one call after each optimizer step): each "
            "domain's update growing, how much its most-changed neurons overlap an earlier domain's, and, on those "
            "shared neurons, whether its update points with (above 0) or against (below 0) the earlier one's — "
            "look at QA against Math early in QA's stage, which a look at the checkpoints alone cannot show. Its "
            f"profile at the end {same}.")


def _contraction(results: dict) -> str:
    """The right panel in words: does the refresh contract the displacement from Math on the conflict units?"""
    dist = results.get("refresh_distance") or []
    if len(dist) < 2 or not dist[0]["math_conflict_units"] or not dist[0]["math_elsewhere"]:
        return ""
    on = dist[-1]["math_conflict_units"] / dist[0]["math_conflict_units"]
    off = dist[-1]["math_elsewhere"] / dist[0]["math_elsewhere"]
    verdict = ("does not contract it on the conflict units" if on >= 1.0 else
               "contracts it on the conflict units more than elsewhere" if on < off else
               "contracts it on the conflict units, though no more than elsewhere")
    return (f" Right: the distance to the Math checkpoint on the conflict units goes to {on:.2f}x its start and "
            f"elsewhere to {off:.2f}x: here the refresh {verdict} (the "
            "paper's contraction would show as the solid line falling below 1)"
            + ("; Math comes back by moving somewhere new rather than back to its old weights." if on >= 1.0 else "."))


def fig_refresh(results: dict, path: str) -> str:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = [r["step"] for r in results["refresh"]]
    for d in DOMAINS:
        ax.plot(steps, [r["scores"][d] for r in results["refresh"]], marker="o", color=COLORS[d], label=LABEL[d],
                lw=2.2 if d == "math" else 1.2)
    fl = results["floors"]
    ax.axhline(fl["math_after_math"], color=COLORS["math"], ls="--", lw=0.8, label="Math after its own stage")
    ax.set_xlabel("Re-Math GRPO step (from the CW checkpoint)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Scores during the refresh", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    dist = results.get("refresh_distance") or []
    if dist:
        st = [r["step"] for r in dist]
        for key, label, style in (("math_conflict_units", "to Math, on the conflict units (AMC 2%)", "-"),
                                  ("math_elsewhere", "to Math, everywhere else", "--")):
            base = dist[0][key] or 1.0
            ax2.plot(st, [r[key] / base for r in dist], ls=style, color=COLORS["math"], label=label)
        # the run starts at the CW checkpoint (distance 0 to it): the other checkpoints' lines are in units of
        # the distance from CW to Math, so every line is dimensionless
        cw_to_math = math.hypot(dist[0]["math_conflict_units"], dist[0]["math_elsewhere"]) or 1.0
        for key in ("qa", "cw"):
            ax2.plot(st, [r[key] / cw_to_math for r in dist], color=COLORS[key], lw=1,
                     label=f"to the {LABEL[key]} checkpoint (/ CW-Math distance)")
        ax2.set_xlabel("Re-Math GRPO step")
        ax2.set_ylabel("distance / distance at step 0")
        ax2.xaxis.get_major_locator().set_params(integer=True)
        ax2.set_title("Where the refresh moves the weights (RefreshMonitor)", fontsize=9)
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    return _save(fig, path)


# ---- html ---------------------------------------------------------------------------------------------------------

def _html_table(head: List[str], rows: List[List[str]]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _img(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(os.path.basename(path))}">'


CSS = """body{font-family:system-ui,sans-serif;max-width:1080px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
.cap{margin:4px 0 22px;font-size:14px}.ok{color:#1a7f37}.bad{color:#b42318}h2{margin-top:28px}"""


def write(out: str, results: dict, profiles: dict, routes: dict, grads: dict) -> Dict[str, str]:
    """Figures under ``out/figures`` and ``out/report.html`` (PNGs embedded, so the page stands alone)."""
    figdir = os.path.join(out, "figures")
    os.makedirs(figdir, exist_ok=True)
    f = lambda n: os.path.join(figdir, n)
    figs = {
        "stages": fig_stages(results, f("stages.png")),
        "refresh": fig_refresh(results, f("refresh.png")),
        "tracking": fig_tracking(results, f("tracking.png")),
        "dose": fig_dose(results, f("dose_response.png")),
        "layer_budget": fig_layer_budget(results, f("layer_budget.png")),
        "jaccard": fig_jaccard(results, f("jaccard.png")),
        "shared_cosine": fig_shared_cosine(results, f("shared_cosine.png")),
    }
    grads["result"].plot(f("grad_cosine.png"), title="gradient cosine between domains (at the Math checkpoint)")
    _plt().close("all")
    figs["grad_cosine"] = f("grad_cosine.png")

    fl, ref, a = results["floors"], results["rollback_reference"], results["analyses"]
    summ = a["summary"]
    amc2 = aggregate(results["rollback"], "AMC", "mlp", 0.02)
    rnd2 = aggregate(results["rollback"], "random", "mlp", 0.02)
    joint32 = aggregate(results["rollback"], "AMC", "mlp,attn", 0.32)
    ok = lambda b: f'<span class="{"ok" if b else "bad"}">{"meets" if b else "does not meet"}</span>'
    captions = {
        "stages": f"Look at the red line: Math goes from {fl['math_after_math']:.1f} after its own stage to "
                  f"{fl['math_after_cw']:.1f} after QA and CW ({fl['math_drop']:.1f} points, which {ok(fl['drop_ok'])} "
                  "the demo's 10-point floor), while each stage lifts its own domain.",
        "refresh": f"Look at how fast Math climbs back: {fl['math_after_cw']:.1f} -> {fl['math_after_refresh']:.1f} "
                   f"in {results['refresh'][-1]['step']} GRPO steps ({_pct(fl['refresh_recovered'])} of the loss; "
                   f"{ok(fl['refresh_ok'])} the 50% floor) while the other domains stay near where they were; the paper: "
                   f"Math {PAPER['remath_math'][0]} -> {PAPER['remath_math'][1]}." + _contraction(results),
        "tracking": _tracking_caption(results),
        "dose": f"Look at the coloured lines against the grey random band: at beta = 2% A x M x C brings back "
                f"{_pct(amc2['recovery'] if amc2 else None)} of QA's damage to Math (random: "
                f"{_pct(rnd2['recovery'] if rnd2 else None)}; the paper: 20.4%, random far lower); jointly with "
                f"attention at 32%: {_pct(joint32['recovery'] if joint32 else None)} (the paper: 73.6%). Stars are "
                "the paper's values.",
        "layer_budget": "Look at where the 2% budget goes: the conflict-weighted allocation (the paper's) puts it in "
                        "the layers where QA's update opposes Math's; the activation-only one follows Math's "
                        "activation mass (the paper: 16.6% recovery with it at 2%, vs 20.4%).",
        "jaccard": f"Compare the two heatmaps: active routes overlap with mean Jaccard {summ['active_jaccard_mean']:.2f}"
                   f", the domains' most-changed neurons with {summ['changed_jaccard_mean']:.2f} (the paper: domains "
                   "share active routes more than they share changed neurons).",
        "shared_cosine": "Look at the sign per layer: below zero, the later domain's update pushes back against the "
                         "earlier one on the neurons both changed most. " + _sign_sentence(a["shared_cosine"]),
        "grad_cosine": f"Look at the top row (whole model): mean |cosine| between domains "
                       f"{summ['grad_cosine_mean_abs']:.3f} (the paper: near zero globally), and at which layers and "
                       "projections the colours depart from white.",
    }
    titles = {"stages": "Per-stage scores", "refresh": "Re-Math refresh",
              "tracking": "Update curves during training (DeltaTracker)", "dose": "Rollback dose-response",
              "layer_budget": "Per-layer budget", "jaccard": "Changed vs active neurons",
              "shared_cosine": "Shared-neuron cosine per layer", "grad_cosine": "Gradient cosines"}
    body = [f"<h1>lpt demo: interference and recovery on a tiny Qwen3 (seed {results['seed']}"
            f"{', fast' if results['fast'] else ''})</h1>",
            "<p>A 4-layer Qwen3 trained on the CPU: a supervised warm-up, then GRPO on Code -> Math -> QA -> CW "
            "(no KL, one learning rate), a Re-Math refresh, the package's analyses of the saved checkpoints, and "
            "rollbacks of QA's displacement toward the Math checkpoint. Scores are greedy on held-out sets (%).</p>",
            "<h2>Scores per stage</h2>",
            _html_table(["stage"] + [LABEL[d] for d in DOMAINS] + ["AVG"], stage_rows(results))]
    for key in ("stages", "tracking", "refresh"):
        body += [f"<h2>{titles[key]}</h2>", _img(figs[key]), f'<p class="cap">{captions[key]}</p>']
    head = ["selector", "beta", "Math", "recovery"] + [f"Δ{LABEL[d]}" for d in DOMAINS if d != "math"] + ["paper"]
    body += ["<h2>Rollback of QA's displacement toward Math</h2>",
             f"<p>Math {ref['before']['math']:.1f} before QA, {ref['damaged']['math']:.1f} after. Recovery = share of "
             "that loss brought back; Δ = change of the other domains in points; random: mean [min, max] over "
             "seeds.</p>", "<h3>MLP neurons</h3>", _html_table(head, rollback_rows(results, "mlp")),
             "<h3>MLP neurons + attention heads (budget in parameters)</h3>",
             _html_table(head, rollback_rows(results, "mlp,attn"))]
    for key in ("dose", "layer_budget"):
        body += [f"<h2>{titles[key]}</h2>", _img(figs[key]), f'<p class="cap">{captions[key]}</p>']
    body += ["<h2>Findings beside the paper</h2>",
             _html_table(["quantity", "demo", "paper"], finding_rows(results))]
    for key in ("jaccard", "shared_cosine", "grad_cosine"):
        body += [f"<h2>{titles[key]}</h2>", _img(figs[key]), f'<p class="cap">{captions[key]}</p>']
    doc = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>lpt demo</title>"
           f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path = os.path.join(out, "report.html")
    with open(path, "w") as fh:
        fh.write(doc)
    figs["html"] = path
    return figs
