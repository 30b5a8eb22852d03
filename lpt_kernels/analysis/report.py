"""Pictures and a self-contained HTML report of a Profile (PNG files plus report.html embedding them)."""
from __future__ import annotations

import base64
import html
import os
from typing import Dict, List

import torch

from lpt_kernels.analysis.profile import Profile


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_jaccard(p: Profile, group: str, frac: float, path: str) -> str:
    plt = _plt()
    j = p.jaccard(group, frac).numpy()
    fig, ax = plt.subplots(figsize=(1.2 * len(p.deltas) + 2.5, 1.0 * len(p.deltas) + 2))
    im = ax.imshow(j, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(p.deltas)), p.deltas, rotation=30, ha="right")
    ax.set_yticks(range(len(p.deltas)), p.deltas)
    for a in range(len(p.deltas)):
        for b in range(len(p.deltas)):
            ax.text(b, a, f"{j[a, b]:.2f}", ha="center", va="center", color="w" if j[a, b] < 0.6 else "k")
    ax.set_title(f"Jaccard of top-{frac:.0%} changed {group} units")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_shared_cosine(p: Profile, group: str, frac: float, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for a, b in zip(p.deltas[:-1], p.deltas[1:]):
        c = p.shared_cosine(a, b, group, frac)
        ax.plot(range(len(c["pooled"])), c["pooled"].numpy(), marker="o", ms=3, label=f"{a} vs {b}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine over shared top units")
    ax.set_title(f"Layer-wise cosine of consecutive updates on shared top-{frac:.0%} {group} units")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layer_norms(p: Profile, group: str, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for d in p.deltas:
        ax.plot(p.norm(d, group).pow(2).sum(1).sqrt().numpy(), marker="o", ms=3, label=d)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("update norm")
    ax.set_title(f"Per-layer update norm ({group} units)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sparsity(p: Profile, path: str) -> str:
    plt = _plt()
    exact, tol = p.sparsity(), p.sparsity(tolerance=True)
    x = torch.arange(len(p.deltas)).numpy()
    fig, ax = plt.subplots(figsize=(1.1 * len(p.deltas) + 3, 3.6))
    ax.bar(x - 0.2, [exact[d] for d in p.deltas], 0.4, label="exactly zero")
    ax.bar(x + 0.2, [tol[d] for d in p.deltas], 0.4,
           label=f"|d| <= {p.meta['atol']:g} + {p.meta['rtol']:g}|w|")
    ax.set_xticks(x, p.deltas)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of parameters unchanged")
    ax.set_title("Update sparsity")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_hist(p: Profile, kind: str, path: str) -> str:
    plt = _plt()
    lo, hi, n = p.meta["hist_edges_log10"]
    centers = torch.linspace(lo, hi, int(n) + 1)[:-1] + (hi - lo) / n / 2
    fig, ax = plt.subplots(figsize=(8, 3.6))
    used = torch.zeros(int(n), dtype=torch.bool)
    for d in p.deltas:
        h = p.hist.get(f"{d}/{kind}")
        if h is not None and h.sum() > 0:
            ax.plot(centers.numpy(), (h / h.sum()).numpy(), label=d)
            used |= h > 0
    if used.any():  # show the decades that hold data, not the whole -12..2 range
        nz = used.nonzero().flatten()
        ax.set_xlim(centers[nz[0]].item() - 0.5, centers[nz[-1]].item() + 0.5)
    ax.set_xlabel("log10 |dW|" if kind == "abs" else "log10 |dW| / |W|")
    ax.set_ylabel("share of non-zero changes")
    kind_name = "Absolute" if kind == "abs" else "Relative"
    ax.set_title(f"{kind_name} changes (row sample, 1/{p.meta['hist_stride']} or sparser)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _table(rows: List[List[str]], head: List[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def write_report(p: Profile, out_dir: str, frac: float = 0.10) -> Dict[str, str]:
    """Write the PNGs and report.html into out_dir; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    pics: Dict[str, str] = {}
    pics["sparsity"] = plot_sparsity(p, os.path.join(out_dir, "sparsity.png"))
    for kind in ("abs", "rel"):
        if any(k.endswith(f"/{kind}") for k in p.hist):
            pics[f"hist_{kind}"] = plot_hist(p, kind, os.path.join(out_dir, f"hist_{kind}.png"))
    for g in p.groups:
        pics[f"jaccard_{g}"] = plot_jaccard(p, g, frac, os.path.join(out_dir, f"jaccard_{g}.png"))
        if len(p.deltas) > 1:
            pics[f"shared_cosine_{g}"] = plot_shared_cosine(p, g, frac, os.path.join(out_dir, f"shared_cosine_{g}.png"))
        pics[f"layer_norms_{g}"] = plot_layer_norms(p, g, os.path.join(out_dir, f"layer_norms_{g}.png"))

    exact, tol = p.sparsity(), p.sparsity(tolerance=True)
    sp = _table([[d, f"{exact[d]:.2%}", f"{tol[d]:.2%}"] for d in p.deltas], ["delta", "exact zeros", "near zeros"])
    parts = [f"<h1>lpt report</h1><p>{html.escape(' -> '.join(p.meta['labels']))} ({p.meta['mode']} deltas), "
             f"layout {html.escape(p.meta['layout'].get('name', '?'))}, {p.meta['num_layers']} layers, "
             f"lpt_kernels {html.escape(p.meta['version'])}</p>", "<h2>Update sparsity</h2>", sp]
    if p.meta.get("nonfinite"):
        parts.append(f"<p class=warn>Non-finite weights in {len(p.meta['nonfinite'])} tensors: "
                     f"{html.escape(', '.join(list(p.meta['nonfinite'])[:5]))}</p>")
    if p.meta.get("skipped"):
        parts.append(f"<p>Skipped tensors: {len(p.meta['skipped'])} (see profile.json)</p>")
    for g in p.groups:
        j = p.jaccard(g, frac)
        parts.append(f"<h2>{html.escape(g)} units: top-{frac:.0%} overlap</h2>")
        parts.append(_table([[d] + [f"{v:.3f}" for v in j[i].tolist()] for i, d in enumerate(p.deltas)],
                            [""] + p.deltas))
    for name, path in pics.items():
        with open(path, "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
        parts.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>")
    style = ("body{font-family:sans-serif;max-width:980px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.warn{color:#b00}img{max-width:100%}")
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>lpt report</title><style>{style}</style></head>" \
          f"<body>{''.join(parts)}</body></html>"
    tmp = os.path.join(out_dir, ".report.html.tmp")
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, os.path.join(out_dir, "report.html"))
    pics["html"] = os.path.join(out_dir, "report.html")
    return pics
