"""Pictures and a self-contained HTML report of a Profile: PNG files, and report.html that embeds them with a caption
for each (what it shows, how to read it, what the paper found), tables of the same numbers, and a line saying what a
unit of each group is. Written atomically (lpt_kernels/checkpoint/writer.py).

Read by researchers who know the paper and by colleagues who do not: every section is titled in words, every axis
labelled in the quantity's own units, and a group that no delta changed gets a sentence, not empty plots.
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from lpt_kernels.analysis.profile import Profile

GROUP_TITLES = {"mlp": "MLP neurons", "attn": "Attention heads (query heads)", "kv": "Key/value heads"}
GROUP_UNIT = {"mlp": "an MLP neuron", "attn": "an attention (query) head", "kv": "a key/value head"}
PAIR_STYLE = {"marker": "o", "ms": 4}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_missing_glyphs: set = set()  # characters of labels the plotting font lacks (drawn as boxes), said once a report


def _save(fig, path: str) -> str:
    with warnings.catch_warnings(record=True) as caught:  # layout engines warn about tight boxes on tiny figures:
        warnings.simplefilter("always")                   # never to the terminal
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    for w in caught:
        m = re.match(r"Glyph (\d+) .*missing from", str(w.message))
        if m:
            _missing_glyphs.add(chr(int(m.group(1))))
    _plt().close(fig)
    return path


def _layer_axis(ax, n_layers: int) -> None:
    """Integer layer ticks over every layer, whatever holds data."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(-0.5, max(n_layers, 1) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(max(n_layers, 1), 12)))
    ax.set_xlabel("layer")


def _short(tensor: str) -> str:
    parts = tensor.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else tensor


def unit_description(p: Profile, group: str) -> str:
    """One line: what a unit of `group` is, from the profile's layout (e.g. 'an MLP neuron j = row j of gate_proj
    + row j of up_proj + column j of down_proj; 96 per layer')."""
    try:
        lay = p.layout
        members = lay.groups[group][sorted(lay.groups[group])[0]]
    except Exception:  # noqa: BLE001 -- a description is not worth failing the report for
        return f"a unit of group {group}"
    parts = []
    for m in members:
        what = "row" if m.axis == 0 else "column"
        if m.block == 1:
            parts.append(f"{what} j of {_short(m.tensor)}")
        else:
            parts.append(f"the {m.block} {what}s {m.block}j to {m.block}j+{m.block - 1} of {_short(m.tensor)}")
    n = p.meta.get("units", {}).get(group)
    head = GROUP_UNIT.get(group, f"a unit of group <code>{html.escape(group)}</code>")
    return f"{head} j = " + " + ".join(parts) + (f"; {n} per layer" if n else "")


def changed_deltas(p: Profile, group: str) -> List[str]:
    """The deltas that moved at least one unit of `group`."""
    return [d for d in p.deltas if bool((p.stat(d, group, "sq_norm") > 0).any())]


def _num(x: float) -> str:
    """1e-08 -> 1e-8, 0.001 -> 0.001."""
    s = f"{x:g}"
    if "e" in s:
        m, e = s.split("e")
        s = f"{m}e{int(e)}"
    return s


def _tol_label(p: Profile) -> str:
    atol, rtol = p.meta.get("atol", 0.0), p.meta.get("rtol", 0.0)
    if atol and rtol:
        return f"|Δw| ≤ {_num(atol)} + {_num(rtol)}·|w|"
    if rtol:
        return f"|Δw| ≤ {_num(rtol)}·|w|"
    return f"|Δw| ≤ {_num(atol)}"


def _has_tol(p: Profile) -> bool:
    return bool(p.meta.get("atol", 0.0) or p.meta.get("rtol", 0.0))


# ---- plots ----------------------------------------------------------------------------------------------------------

def plot_sparsity(p: Profile, path: str) -> str:
    """Bars of the share of unchanged parameters per delta, numbers written on the bars, legend above the axes."""
    plt = _plt()
    exact, tol = p.sparsity(), p.sparsity(tolerance=True)
    series = [("exactly unchanged (Δw = 0)", exact)]
    if _has_tol(p):
        series.append((f"within tolerance ({_tol_label(p)})", tol))
    n = len(p.deltas)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * n + 2.5), 3.8))
    for k, (label, vals) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(n)]
        ys = [vals[d] * 100 for d in p.deltas]
        bars = ax.bar(xs, ys, width * 0.95, label=label, color=f"C{k}")
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y + 1.5, f"{y:.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(n), p.deltas)
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20), [f"{v}%" for v in range(0, 101, 20)])
    ax.set_ylabel("parameters unchanged")
    ax.set_xlabel("delta (named after the later checkpoint)")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series), frameon=False)
    return _save(fig, path)


def _hist_centers(p: Profile) -> Tuple[torch.Tensor, float, float, int]:
    lo, hi, n = p.meta["hist_edges_log10"]
    n = int(n)
    centers = torch.linspace(lo, hi, n + 1)[:-1] + (hi - lo) / n / 2
    return centers, lo, hi, n


def plot_hist(p: Profile, kind: str, path: str) -> str:
    """Distribution of |Δw| (kind 'abs') or |Δw|/|w| ('rel') over the histogram sample, one line per delta, on a
    log10 axis in the quantity's own units; the top bin (everything from 10^hi up) is marked as capped."""
    plt = _plt()
    centers, lo, hi, n = _hist_centers(p)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    used = torch.zeros(n, dtype=torch.bool)
    top_used = False
    for i, d in enumerate(p.deltas):
        h = p.hist.get(f"{d}/{kind}")
        if h is None or h.sum() <= 0:
            continue
        share = (h / h.sum() * 100).numpy()
        x = (10.0 ** centers).numpy()
        ax.plot(x[:-1], share[:-1], label=d, color=f"C{i}")
        if h[-1] > 0:
            top_used = True
            ax.plot([x[-1]], [share[-1]], marker="^", color=f"C{i}", ls="none")
        used |= h > 0
    ax.set_xscale("log")
    if used.any():  # show the decades that hold data, not the whole 1e-12..1e2 range
        nz = used.nonzero().flatten()
        ax.set_xlim(10 ** (centers[nz[0]].item() - 0.5), 10 ** (centers[nz[-1]].item() + 0.5))
    if top_used:
        ax.annotate(f"▲ top bin: all values ≥ {10 ** hi:g}", xy=(0.99, 0.97), xycoords="axes fraction", ha="right",
                    va="top", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("|Δw| (log scale)" if kind == "abs" else "|Δw| / |w| (log scale; w = the earlier weight)")
    ax.set_ylabel("% of sampled non-zero changes")
    ax.grid(alpha=0.3)
    if len(p.deltas) > 1:
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(6, len(p.deltas)),
                  frameon=False)
    return _save(fig, path)


def plot_jaccard(p: Profile, group: str, frac: float, path: str) -> str:
    """Heatmap of the Jaccard overlap of the deltas' top units; entries of deltas that did not change the group are
    left blank."""
    plt = _plt()
    moved = set(changed_deltas(p, group))
    j = p.jaccard(group, frac).numpy().copy()
    n = len(p.deltas)
    for a, da in enumerate(p.deltas):
        for b, db in enumerate(p.deltas):
            if da not in moved or db not in moved:
                j[a, b] = math.nan
    fig, ax = plt.subplots(figsize=(0.75 * n + 2.6, 0.65 * n + 1.5))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#e8e8e8")
    im = ax.imshow(j, vmin=0, vmax=1, cmap=cmap)
    ax.set_xticks(range(n), p.deltas, rotation=30, ha="right")
    ax.set_yticks(range(n), p.deltas)
    for a in range(n):
        for b in range(n):
            v = j[a, b]
            ax.text(b, a, "–" if math.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    color="k" if math.isnan(v) or v >= 0.6 else "w", fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.046)
    cb.set_label("Jaccard overlap")
    return _save(fig, path)


def plot_shared_cosine(p: Profile, group: str, frac: float, path: str) -> Optional[str]:
    """Per layer, the cosine of each pair of consecutive deltas over their shared top units; layers without a
    shared unit are gaps (a layer between two gaps is a lone marker, not joined to anything)."""
    plt = _plt()
    curves = []
    for a, b in zip(p.deltas[:-1], p.deltas[1:]):
        c = p.shared_cosine(a, b, group, frac)["pooled"]
        if (~c.isnan()).any():
            curves.append((a, b, c))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.8))
    top = 0.0
    for k, (a, b, c) in enumerate(curves):
        top = max(top, c[~c.isnan()].abs().max().item())
        ax.plot(range(len(c)), c.numpy(), color=f"C{k}", label=f"{a} vs {b}", **PAIR_STYLE)
    ax.axhline(0, color="grey", lw=0.8)
    lim = min(1.0, max(0.1, math.ceil(top * 1.2 / 0.05) * 0.05))  # symmetric about 0, so the sign reads at once
    ax.set_ylim(-lim, lim)
    _layer_axis(ax, p.meta["num_layers"])
    ax.set_ylabel("cosine on shared top units")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, len(curves)), frameon=False)
    return _save(fig, path)


def plot_layer_norms(p: Profile, group: str, path: str) -> str:
    """Per layer, each delta's L2 norm over the group's units: a linear axis from 0 (a log axis only when the norms
    span more than two orders of magnitude). Layers without units of the group (a MoE layout's) are gaps, not 0."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    vals = []
    absent = torch.ones(p.meta["num_layers"], dtype=torch.bool)
    absent[p.group_layers(group)] = False
    for i, d in enumerate(p.deltas):
        v = p.norm(d, group).pow(2).sum(1).sqrt().masked_fill(absent, float("nan"))
        vals.append(v[~absent])
        ax.plot(range(len(v)), v.numpy(), color=f"C{i}", label=d, **PAIR_STYLE)
    allv = torch.cat(vals)
    pos = allv[allv > 0]
    if pos.numel() and pos.max() / pos.min() > 100:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, (allv.max().item() or 1.0) * 1.1)
    _layer_axis(ax, p.meta["num_layers"])
    ax.set_ylabel(f"update norm ‖Δw‖ of the {group} units")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="delta", title_fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=min(5, len(p.deltas)), frameon=False)
    return _save(fig, path)


# ---- HTML -----------------------------------------------------------------------------------------------------------

def _table(rows: List[List[str]], head: List[str], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _figure(path: str, alt: str, caption: str) -> str:
    with open(path, "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
    return (f"<figure><img alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def _signed(x: float) -> str:
    """+0.051; small values keep their sign and size (-2.1e-04, not -0.000)."""
    return f"{x:+.3f}" if abs(x) >= 0.0005 or x == 0 else f"{x:+.1e}"


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2%}"


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
     color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:3px 9px;text-align:right} th{background:#f4f4f4}
td:first-child{text-align:left;font-weight:600}
figure{margin:1em 0 1.6em 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:.3em}
.meta{color:#555;font-size:.92em} .unit{background:#f7f7f2;padding:.4em .7em;border-left:3px solid #cc9}
.warn{color:#b00} .note{color:#555;font-style:italic} code{font-size:.95em}
"""


def _chance(p: Profile, group: str, frac: float) -> str:
    """The caption's sentence on the chance level of the overlap (Profile.jaccard_chance) of the changed deltas."""
    moved = [i for i, d in enumerate(p.deltas) if d in changed_deltas(p, group)]
    ch = p.jaccard_chance(group, frac)
    vals = sorted({round(ch[a, b].item(), 3) for a in moved for b in moved if a < b})
    if not vals:
        return ""
    level = f"{vals[0]:.3f}" if len(vals) == 1 else f"{vals[0]:.3f} to {vals[-1]:.3f}"
    return f" Two sets of units drawn at random with the same sizes would overlap by {level} (chance)."


def write_report(p: Profile, out_dir: str, frac: float = 0.10, *, force: bool = False) -> Dict[str, str]:
    """Write the PNGs and report.html into `out_dir` (a new or empty directory; an existing non-empty one only with
    ``force``, replaced when the new report is complete); returns ``{name: final path}`` with ``html`` last."""
    from lpt_kernels.checkpoint.writer import AtomicDir

    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac: must be in (0, 1], got {frac}")
    writer = AtomicDir(out_dir, force=force)
    _missing_glyphs.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing from matplotlib reaches the terminal
        with writer as tmp:
            pics = _write(p, tmp, frac)
    if _missing_glyphs:
        warnings.warn(f"lpt report: the plotting font has no glyph for {''.join(sorted(_missing_glyphs)[:8])}"
                      f"{'...' if len(_missing_glyphs) > 8 else ''}: the PNGs show boxes there (report.html's text "
                      f"is fine); install a font that has them and list it in matplotlibrc (font.family: DejaVu Sans, "
                      f"Noto Sans CJK JP)",
                      RuntimeWarning, stacklevel=2)
    return {k: os.path.join(writer.out, os.path.basename(v)) for k, v in pics.items()}


def _write(p: Profile, out: str, frac: float) -> Dict[str, str]:
    pics: Dict[str, str] = {}
    top = f"top-{frac * 100:.3g}%"
    mode = p.meta.get("mode", "consecutive")
    labels = p.meta.get("labels", [])
    parts = [f"<h1>Update profile: {html.escape(' → '.join(labels))}</h1>"]
    how = ("each delta is a checkpoint minus the one before it" if mode == "consecutive" else
           f"each delta is a checkpoint minus the first ({html.escape(labels[0]) if labels else 'base'})")
    parts.append(f"<p class=meta>{len(p.deltas)} delta{'s' if len(p.deltas) != 1 else ''} "
                 f"({html.escape(', '.join(p.deltas))}; {how}; a delta is named after its later checkpoint), "
                 f"layout {html.escape(str(p.meta['layout'].get('name', '?')))}, "
                 f"{p.meta['num_layers']} layer{'s' if p.meta['num_layers'] != 1 else ''}, "
                 f"lpt_kernels {html.escape(str(p.meta.get('version', '?')))}. Checkpoints: "
                 + ", ".join(f"<code>{html.escape(c)}</code>" for c in p.meta.get("checkpoints", [])) + ".</p>")
    parts.append("<p class=meta>This report follows the analyses of “A Local Perturbation Theory for Cross-Domain "
                 "Interference and Recovery in Multi-Domain RL” (Qwen3-4B trained with GRPO on Code → Math → QA → "
                 "CW): how sparse the updates are, how small, which units each domain changes most and whether "
                 "domains overlap there, and whether a later domain's update opposes an earlier one's on the units "
                 "both changed.</p>")
    if p.meta.get("nonfinite"):
        parts.append(f"<p class=warn>Non-finite weights in {len(p.meta['nonfinite'])} tensors (their statistics are "
                     f"NaN or infinite): {html.escape(', '.join(list(p.meta['nonfinite'])[:5]))}</p>")
    if p.meta.get("skipped"):
        parts.append(f"<p class=note>{len(p.meta['skipped'])} tensors were left out (listed with the reason in "
                     f"profile.json).</p>")

    # -- sparsity
    exact, tol = p.sparsity(), p.sparsity(tolerance=True)
    parts.append("<h2>How sparse the updates are</h2>")
    head = ["delta", "exactly unchanged"] + ([f"within tolerance ({_tol_label(p)})"] if _has_tol(p) else [])
    rows = [[html.escape(d), _pct(exact[d])] + ([_pct(tol[d])] if _has_tol(p) else []) for d in p.deltas]
    parts.append(_table(rows, head))
    pics["sparsity"] = plot_sparsity(p, os.path.join(out, "sparsity.png"))
    tol_text = (f"and the share within the tolerance {html.escape(_tol_label(p))} (w: the weight in the earlier "
                f"checkpoint{' of the pair' if mode == 'consecutive' else ', the first one'})" if _has_tol(p) else
                "(no tolerance was set: <code>lpt diff --atol/--rtol</code> adds a second bar)")
    parts.append(_figure(pics["sparsity"], "update sparsity per delta",
                         f"Share of all parameters that each delta left exactly unchanged {tol_text}, counted over "
                         f"every tensor (a tied output embedding once). Taller bars: sparser updates. The paper "
                         f"found RL updates sparse: 77.6% of Qwen3-4B's parameters unchanged after one domain and "
                         f"73.4% after four."))

    # -- histograms
    kinds = [k for k in ("abs", "rel") if any(key == f"{d}/{k}" and p.hist[key].sum() > 0
                                             for d in p.deltas for key in p.hist)]
    if kinds:
        parts.append("<h2>How large the changes are</h2>")
        stride = p.meta.get("hist_stride", 64)
        lo, hi = p.meta["hist_edges_log10"][0], p.meta["hist_edges_log10"][1]
        sample = (f"From a sample of every {stride}th row of each tensor (sparser for large tensors: about 8k "
                  f"values a tensor; 1-D tensors whole; a tied copy left out). Bins are a tenth of a decade wide "
                  f"from 10<sup>{lo:g}</sup> to 10<sup>{hi:g}</sup>; exact zeros and values below "
                  f"10<sup>{lo:g}</sup> are not plotted, and every value from 10<sup>{hi:g}</sup> up falls in the "
                  f"top bin (marked ▲).")
        for kind in kinds:
            pics[f"hist_{kind}"] = plot_hist(p, kind, os.path.join(out, f"hist_{kind}.png"))
            if kind == "abs":
                cap = (f"Distribution of the absolute change |Δw| of each parameter, as a share of the sampled "
                       f"non-zero changes of each delta. {sample} The paper found RL edits tiny as well as sparse.")
                title = "Absolute changes"
            else:
                cap = (f"Distribution of the relative change |Δw|/|w| (w: the weight in the earlier checkpoint"
                       f"{' of the pair' if mode == 'consecutive' else ', the first one'}). A change of a weight that "
                       f"was exactly zero has no relative size and is counted with the zeros, not plotted. "
                       f"{sample}")
                title = "Relative changes"
            parts.append(f"<h3>{title}</h3>" + _figure(pics[f"hist_{kind}"], title.lower(), cap))

    # -- per group
    for g in p.groups:
        title = GROUP_TITLES.get(g, f"Units of group {g}")
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(f"<p class=unit>A unit here is {unit_description(p, g)}. Statistics of a unit are summed over "
                     f"these slices.</p>")
        moved = changed_deltas(p, g)
        if not moved:
            parts.append("<p class=note>No delta changed any unit of this group (every update norm is 0), so there "
                         "is no overlap, cosine or norm to show.</p>")
            continue
        still = [d for d in p.deltas if d not in moved]
        if still:
            parts.append(f"<p class=note>{html.escape(', '.join(still))} did not change any unit of this group: "
                         f"their entries are left blank (–).</p>")
        # overlap
        j = p.jaccard(g, frac)
        parts.append(f"<h3>Which units change most: overlap of the {top} changed units</h3>")
        rows = [[html.escape(d)] + [f"{v:.3f}" if d in moved and e in moved else "–"
                                    for e, v in zip(p.deltas, j[i].tolist())] for i, d in enumerate(p.deltas)]
        parts.append(_table(rows, [""] + p.deltas))
        pics[f"jaccard_{g}"] = plot_jaccard(p, g, frac, os.path.join(out, f"jaccard_{g}.png"))
        parts.append(_figure(pics[f"jaccard_{g}"], f"Jaccard overlap of top changed {g} units",
                             f"For each pair of deltas, the Jaccard overlap |A ∩ B| / |A ∪ B| of their {top} units "
                             f"by update norm, ranked over the whole model (0: disjoint, 1: the same units; the "
                             f"diagonal is 1). High overlap means the domains edit the same units.{_chance(p, g, frac)}"
                             f" The paper found that domains share active routes: their most-changed and most-active "
                             f"neurons overlap well above chance."))
        # shared cosine
        pairs = [(a, b) for a, b in zip(p.deltas[:-1], p.deltas[1:]) if a in moved and b in moved]
        if pairs:
            parts.append(f"<h3>Do consecutive updates agree: cosine on the shared {top} units</h3>")
            cs = {(a, b): p.shared_cosine(a, b, g, frac) for a, b in pairs}
            n_layers = len(next(iter(cs.values()))["pooled"])
            rows = []
            for layer in range(n_layers):
                r = [str(layer)]
                for pair in pairs:
                    v, k = cs[pair]["pooled"][layer].item(), int(cs[pair]["shared"][layer])
                    r.append("–" if math.isnan(v) else f"{_signed(v)} ({k})")
                rows.append(r)
            means = []
            for pair in pairs:
                v = cs[pair]["pooled"]
                ok = ~v.isnan()
                means.append(_signed(v[ok].mean().item()) if ok.any() else "–")
            rows.append(["mean"] + means)
            empty = [f"{a} vs {b}" for a, b in pairs if bool(cs[(a, b)]["pooled"].isnan().all())]
            if len(empty) < len(pairs):
                parts.append(_table(rows, ["layer"] + [f"{a} vs {b} (shared units)" for a, b in pairs], "cos"))
            if empty:
                parts.append(f"<p class=note>{html.escape(', '.join(empty))}: no layer has a unit in both top "
                             f"sets, so there is no cosine to show{' (not drawn)' if len(empty) < len(pairs) else ''}."
                             f"</p>")
            path = plot_shared_cosine(p, g, frac, os.path.join(out, f"shared_cosine_{g}.png"))
            if path:
                pics[f"shared_cosine_{g}"] = path
                parts.append(_figure(path, f"layer-wise cosine on shared top {g} units",
                                     f"For each layer, the cosine between two consecutive deltas restricted to the "
                                     f"units that are in both deltas' {top} sets (pooled over those units; the "
                                     f"table gives how many). Positive: the later domain moves the shared units "
                                     f"the same way; negative: it pushes them back against the earlier update — "
                                     f"the interference the paper traces to a low-dimensional shared conflict "
                                     f"subspace. A gap is a layer where no unit is in both sets, so there is "
                                     f"no cosine to compute; a layer with shared units between two gaps shows as a "
                                     f"lone marker."))
        # norms
        parts.append("<h3>Where the updates are: update norm per layer</h3>")
        pics[f"layer_norms_{g}"] = plot_layer_norms(p, g, os.path.join(out, f"layer_norms_{g}.png"))
        parts.append(_figure(pics[f"layer_norms_{g}"], f"per-layer update norm of {g} units",
                             "For each layer and delta, the L2 norm of the update over all the layer's units of "
                             "this group (the square root of the summed squared changes of their slices). It "
                             "shows which layers a domain's training moved most."))

    doc = (f"<!doctype html><html lang=en><head><meta charset='utf-8'><title>lpt report: "
           f"{html.escape(' → '.join(labels))}</title><style>{STYLE}</style></head><body>{''.join(parts)}"
           f"</body></html>")
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(doc)
    pics["html"] = os.path.join(out, "report.html")
    return pics
