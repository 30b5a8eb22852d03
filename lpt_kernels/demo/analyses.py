"""The paper's analyses of the demo's checkpoints, with the package's public API only (what a user would call on
their own checkpoints):

- :func:`update_profiles` — ``lpt_kernels.analysis.diff`` over base -> code -> math -> qa -> cw: update sparsity
  (exact and within a tolerance, each checkpoint against base, as the paper counts it), top-10% changed-neuron
  Jaccard of the domains' own updates, and the layer-wise cosine of consecutive updates on their shared top units;
- :func:`activation_routes` — ``lpt_kernels.hooks.ActivationStats`` per domain on its evaluation prompts (left-padded
  batches; the attention mask keeps padding out), top-5% active-neuron Jaccard;
- :func:`gradient_alignment` — ``lpt_kernels.hooks.GradientGram`` of the four domains' losses: whole-model and
  per-module cosines.
"""
from __future__ import annotations

import random
from typing import Dict, List

import torch

from lpt_kernels.demo.domains import CURRICULUM, DOMAINS, Example, encode, reference_answer
from lpt_kernels.demo.model import collate

STAGES = ("base",) + CURRICULUM
SPARSITY_ATOL = 1e-5   # "near zero": |dW| <= 1e-5 (bf16 checkpoints; the paper reports both counts)
TOP_CHANGED = 0.10     # the paper's top-10% changed neurons
TOP_ACTIVE = 0.05      # the paper's top-5% active neurons


def update_profiles(ckpt_dirs: Dict[str, str], progress: bool) -> dict:
    """Profiles of the curriculum's checkpoints: consecutive (each domain's own update) and against base."""
    from lpt_kernels.analysis import diff

    paths = [ckpt_dirs[s] for s in STAGES]
    consecutive = diff(paths, labels=list(STAGES), atol=SPARSITY_ATOL, progress=progress)
    cumulative = diff(paths, mode="base", labels=list(STAGES), atol=SPARSITY_ATOL, progress=progress)
    deltas = consecutive.deltas  # code, math, qa, cw
    jac = consecutive.jaccard("mlp", TOP_CHANGED)
    shared = {}
    for a, b in zip(deltas[:-1], deltas[1:]):
        c = consecutive.shared_cosine(a, b, "mlp", TOP_CHANGED)
        shared[f"{a}|{b}"] = {"pooled": _list(c["pooled"]), "shared_units": c["shared"].tolist()}
    return {
        "profile": consecutive,
        "sparsity_exact": cumulative.sparsity(),                     # share of weights unchanged since base
        "sparsity_tol": cumulative.sparsity(tolerance=True),
        "step_sparsity_exact": consecutive.sparsity(),                # ... since the previous checkpoint
        "step_sparsity_tol": consecutive.sparsity(tolerance=True),
        "changed_jaccard": {"domains": deltas, "matrix": jac.tolist()},
        "shared_cosine": shared,
    }


def _list(t: torch.Tensor) -> List[float]:
    return [float(x) for x in t.tolist()]


def _mean_offdiag(m: torch.Tensor) -> float:
    n = m.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool)
    return float(m[mask].mean())


def activation_routes(model, eval_sets: Dict[str, List[Example]], batch: int = 256) -> dict:
    """``ActivationStats`` of each domain's evaluation prompts on ``model``; returns the merged result (for the
    selector's A factor) and the top-5% active-neuron Jaccard matrix."""
    from lpt_kernels.hooks import ActivationResult, jaccard
    from lpt_kernels.hooks import ActivationStats

    device = next(model.parameters()).device
    results = []
    with torch.inference_mode():
        for d in CURRICULUM:  # the order of the profile's deltas, so the two Jaccard matrices line up
            exs = eval_sets[d]
            with ActivationStats(model, name=d, groups=("mlp", "attn")) as acts:
                for i in range(0, len(exs), batch):
                    b = collate([encode(ex.prompt) for ex in exs[i:i + batch]], device)
                    model(**b)  # the attention mask is picked up: padding is not counted
            results.append(acts.result())
    merged = ActivationResult.merge(*results)
    mat = torch.zeros(len(results), len(results), dtype=torch.float64)
    for i, a in enumerate(results):
        for j, b in enumerate(results):
            mat[i, j] = float(jaccard(a, b, "mlp", frac=TOP_ACTIVE))
    tokens = {d: r.tokens() for d, r in zip(CURRICULUM, results)}
    return {"result": merged, "active_jaccard": {"domains": list(CURRICULUM), "matrix": mat.tolist()},
            "tokens": tokens}


def answer_loss(model, examples: List[Example], rng: random.Random) -> torch.Tensor:
    """Mean negative log-likelihood of a correct answer (the direction a binary reward pulls toward)."""
    device = next(model.parameters()).device
    seqs, lens = [], []
    for ex in examples:
        ans = [encode([str(a)])[0] for a in reference_answer(ex, rng)]
        seqs.append(encode(ex.prompt) + ans)
        lens.append(len(ans))
    b = collate(seqs, device)
    logits = model(**b).logits[:, :-1].float()
    target = b["input_ids"][:, 1:]
    keep = torch.zeros_like(target, dtype=torch.bool)
    for i, k in enumerate(lens):
        keep[i, target.shape[1] - k:] = True
    return torch.nn.functional.cross_entropy(logits[keep], target[keep])


def gradient_alignment(model, eval_sets: Dict[str, List[Example]], seed: int, batch: int = 128) -> dict:
    """``GradientGram`` of the four domains' answer losses on ``model``: whole-model cosine matrix and the
    per-module table (every projection of every layer)."""
    from lpt_kernels.hooks import GradientGram

    rng = random.Random(f"grad-{seed}")
    gg = GradientGram(model, domains=list(DOMAINS))
    model.train()
    for d in DOMAINS:
        exs = eval_sets[d]
        for i in range(0, len(exs), batch):
            with gg.domain(d):
                answer_loss(model, exs[i:i + batch], rng).backward()
            model.zero_grad(set_to_none=True)
    model.eval()
    res = gg.result()
    rows, pairs, vals = res.table()
    whole = res.cosine()
    per_module = {r: _list(vals[k]) for k, r in enumerate(rows)}
    return {"result": res, "cosine": {"domains": list(DOMAINS), "matrix": whole.tolist()},
            "pairs": pairs, "per_module": per_module,
            "mean_abs_offdiag": float(whole[~torch.eye(len(DOMAINS), dtype=torch.bool)].abs().mean())}


def summary(profiles: dict, routes: dict, grads: dict) -> dict:
    """The headline numbers of the three analyses."""
    cj = torch.tensor(profiles["changed_jaccard"]["matrix"])
    aj = torch.tensor(routes["active_jaccard"]["matrix"])
    return {"changed_jaccard_mean": _mean_offdiag(cj), "active_jaccard_mean": _mean_offdiag(aj),
            "grad_cosine_mean_abs": grads["mean_abs_offdiag"]}


def same_profile(live, saved) -> dict:
    """The training loop's DeltaTracker profile against ``diff`` of the saved checkpoints: the same exact-zero
    counts (sparsity) per domain, and the per-unit arrays they share (counts bit for bit, sums within fp32
    rounding). The demo's diff counts near-zeros with a tolerance the tracker does not use, so those are left out."""
    keys = sorted(k for k in set(live.arrays) & set(saved.arrays) if "near" not in k)
    worst = 0.0
    exact = live.deltas == saved.deltas and live.sparsity() == saved.sparsity()
    for k in keys:
        a, b = live.arrays[k].double(), saved.arrays[k].double()
        if a.shape != b.shape:
            exact = False
            continue
        if live.arrays[k].dtype == torch.int64:
            exact &= bool(torch.equal(a, b))
        else:
            scale = float(b.abs().max()) or 1.0
            worst = max(worst, float((a - b).abs().max()) / scale)
    return {"equal": bool(exact and worst <= 1e-5), "arrays": len(keys), "max_rel_err": worst}
