"""lpt_kernels.analysis.diff against a brute-force float64 computation on a real sharded transformers checkpoint."""
import math
from fractions import Fraction

import types

import pytest
import torch

from ckpt_factory import save_chain, save_moe_chain
from lpt_kernels.analysis import Profile, ProfileError, diff


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    dirs, states = save_chain(str(root), n_domains=3)
    return dirs, states


@pytest.fixture(params=["cpu", "torch"])
def helpers(request, monkeypatch):
    """diff's bookkeeping by the C++ helpers (cpu.fold_unit_gram, cpu.log_hist) or by the torch ops used where the
    extension is missing."""
    import lpt_kernels.analysis.profile as profile_mod
    if request.param == "torch":
        monkeypatch.setattr(profile_mod, "cpu", types.SimpleNamespace(AVAILABLE=False))
    elif not profile_mod.cpu.AVAILABLE:
        pytest.skip("the CPU extension is not built")
    return request.param


def _brute_mlp(states, layer, mode="consecutive"):
    """[M, units] squared update norm of every MLP neuron (gate row + up row + down column), float64."""
    out = []
    for m in range(1, len(states)):
        a, b = states[m], states[m - 1] if mode == "consecutive" else states[0]
        p = f"model.layers.{layer}.mlp."
        d = {k: a[p + k].double() - b[p + k].double() for k in ("gate_proj.weight", "up_proj.weight",
                                                                "down_proj.weight")}
        out.append((d["gate_proj.weight"] ** 2).sum(1) + (d["up_proj.weight"] ** 2).sum(1)
                   + (d["down_proj.weight"] ** 2).sum(0))
    return torch.stack(out)


def _brute_heads(states, layer, names, axes, head_dim, m):
    a, b = states[m + 1], states[m]
    tot = 0
    for n, ax in zip(names, axes):
        d = a[f"model.layers.{layer}.self_attn.{n}.weight"].double() - b[f"model.layers.{layer}.self_attn.{n}.weight"].double()
        d = d if ax == 0 else d.t()
        tot = tot + (d.reshape(-1, head_dim, d.shape[1]) ** 2).sum((1, 2))
    return tot


@pytest.mark.parametrize("mode", ["consecutive", "base"])
def test_unit_norms_and_gram_match_brute_force(chain, mode, helpers):
    dirs, states = chain
    prof = diff(dirs, mode=mode, progress=False)
    assert prof.deltas == ["d1", "d2", "d3"] and prof.meta["num_layers"] == 3
    for layer in range(3):
        want = _brute_mlp(states, layer, mode)
        for m, d in enumerate(prof.deltas):
            got = prof.stat(d, "mlp", "sq_norm")[layer].double()
            assert torch.allclose(got, want[m], rtol=1e-5, atol=1e-12)
    # a pairwise cosine per unit, from the Gram, against brute force on layer 1
    p = "model.layers.1.mlp."
    def upd(m):
        a, b = states[m + 1], states[m] if mode == "consecutive" else states[0]
        return torch.cat([(a[p + "gate_proj.weight"].double() - b[p + "gate_proj.weight"].double()),
                          (a[p + "up_proj.weight"].double() - b[p + "up_proj.weight"].double()),
                          (a[p + "down_proj.weight"].double() - b[p + "down_proj.weight"].double()).t()], 1)
    u, v = upd(0), upd(2)
    den = (u.norm(dim=1) * v.norm(dim=1))
    want = torch.where(den > 0, (u * v).sum(1) / den.clamp_min(1e-300), 0.0)
    assert torch.allclose(prof.cosine("d1", "d3", "mlp")[1], want, atol=1e-5)


def test_attention_and_kv_heads(chain, helpers):
    dirs, states = chain
    prof = diff(dirs, progress=False)
    for layer in range(3):
        got = prof.stat("d2", "attn", "sq_norm")[layer].double()
        want = _brute_heads(states, layer, ("q_proj", "o_proj"), (0, 1), 16, 1)
        assert torch.allclose(got, want, rtol=1e-5)
        got = prof.stat("d2", "kv", "sq_norm")[layer].double()
        want = _brute_heads(states, layer, ("k_proj", "v_proj"), (0, 0), 16, 1)
        assert torch.allclose(got, want, rtol=1e-5)
    assert prof.stat("d1", "attn", "sq_norm").shape == (3, 4)
    assert prof.stat("d1", "kv", "sq_norm").shape == (3, 2)


def test_sparsity_counts_are_exact(chain, helpers):
    dirs, states = chain
    prof = diff(dirs, atol=1e-3, progress=False)
    names = [n for n in states[0] if n != "lm_head.weight"]  # tied to embed_tokens: counted once
    total = sum(states[0][n].numel() for n in names)
    for m, d in enumerate(prof.deltas):
        zeros = sum(int((states[m + 1][n].float() - states[m][n].float() == 0).sum()) for n in names)
        near = sum(int(((states[m + 1][n].float() - states[m][n].float()).abs() <= 1e-3).sum()) for n in names)
        assert prof.sparsity()[d] == pytest.approx(zeros / total, abs=0)
        assert prof.sparsity(tolerance=True)[d] == pytest.approx(near / total, abs=0)
    assert 0.5 < prof.sparsity()["d1"] < 0.9  # the factory changes ~30% of rows


@pytest.mark.parametrize("mode", ["consecutive", "base"])
def test_histograms_match_brute_force(chain, mode, helpers):
    """Every 7th row of every tensor, binned in float64 with explicit edges, summed over tensors."""
    dirs, states = chain
    prof = diff(dirs, mode=mode, hist_stride=7, progress=False)
    names = [n for n in states[0] if n != "lm_head.weight"]
    edges = torch.linspace(-12.0, 2.0, 141, dtype=torch.float64)
    for m, d in enumerate(prof.deltas):
        want = {"abs": torch.zeros(140, dtype=torch.float64), "rel": torch.zeros(140, dtype=torch.float64)}
        zeros = {"abs": 0, "rel": 0}
        for n in names:
            assert states[0][n].numel() <= 7 * (1 << 13)  # small enough that the stride of 7 is not grown
            pick = [states[i][n].reshape(-1, states[i][n].shape[-1])[::7].double() for i in range(len(states))]
            ref = pick[m] if mode == "consecutive" else pick[0]
            dw = (pick[m + 1] - ref).abs()
            rel = torch.where(ref != 0, dw / ref.abs(), torch.zeros_like(dw))
            for kind, v in (("abs", dw), ("rel", rel)):
                zeros[kind] += int((v == 0).sum())
                logs = torch.log10(v[v > 0]).clamp(max=2.0 - 1e-9)
                want[kind] += torch.histogram(logs[logs >= -12], bins=edges).hist
        for kind in ("abs", "rel"):
            got = prof.hist[f"{d}/{kind}"]
            assert got.sum() > 1000
            # float32 log10 (torch) may move a value sitting on a bin edge by one bin; the C++ helper compares with
            # exact edges, so only its fp32 quotient (rel) can differ from the float64 one
            assert (got - want[kind]).abs().sum() <= 2e-3 * want[kind].sum(), (d, kind)
            assert torch.allclose(got.cumsum(0), want[kind].cumsum(0), atol=2e-3 * want[kind].sum())
            assert prof.hist[f"{d}/{kind}_zero"].item() == zeros[kind]


@pytest.mark.parametrize("mode", ["consecutive", "base"])
@pytest.mark.parametrize("cols,threads", [(67, 1), (2500, 1), (2500, 2)])  # one thread; two, over column chunks of 1024
def test_log_hist_bins_exactly(mode, cols, threads):
    """The C++ helper against float64 edges on the same fp32 values: every magnitude from 1e-14 to 1e4, values on
    and next to the edges, zeros, zero weights, inf and NaN, mixed dtypes and a strided view, sampled rows only."""
    import lpt_kernels.analysis.profile as P
    if not P.cpu.AVAILABLE:
        pytest.skip("the CPU extension is not built")
    g = torch.Generator().manual_seed(7)
    rows = 40
    edges = torch.tensor([10.0 ** (P.HIST_LO + (P.HIST_HI - P.HIST_LO) * b / P.HIST_BINS)
                          for b in range(P.HIST_BINS + 1)], dtype=torch.float64)
    base = torch.randn(rows, cols, generator=g)
    base[3, :5] = 0.0  # zero weights: relative change counted as zero
    ws = [base]
    for m in range(3):
        mag = 10.0 ** (torch.rand(rows, cols, generator=g) * 18 - 14)
        mag[6 + m, :10] = torch.nextafter(edges[50:60].float(), torch.tensor(0.0))  # next to the edges
        d = mag * torch.randn(rows, cols, generator=g).sign()
        d[torch.rand(rows, cols, generator=g) < 0.2] = 0.0
        ws.append(ws[0] + d if mode == "base" else ws[-1] + d)
    ws[0][12, :5], ws[1][12, :5] = 0.0, torch.tensor([1.0, 10.0, 100.0, 0.99999994, 1e-12])  # on the edges
    ws[2][9, 4] = float("inf")
    ws[3][10, 2] = float("nan")
    ws = [ws[0].to(torch.bfloat16), ws[1], ws[2].t().contiguous().t(), ws[3].half().float()]
    pick = torch.arange(0, rows, 3)
    counts = torch.zeros(6, P.HIST_BINS, dtype=torch.float64)
    zeros = torch.zeros(6, dtype=torch.float64)
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        P.cpu.log_hist(ws, pick, mode, counts, zeros, P.HIST_BINS, P.HIST_LO, P.HIST_HI)
    finally:
        torch.set_num_threads(was)
    w = [x.float()[pick] for x in ws]
    for m in range(3):
        ref = w[m] if mode == "consecutive" else w[0]
        d = (w[m + 1] - ref).abs()
        rel = d.double() / ref.abs().double()  # the exact ratio, rounded once to a double (d is the fp32 difference)
        rel = torch.where(torch.isfinite(rel), rel, torch.zeros_like(rel))
        for row, v in ((m, d), (3 + m, rel)):
            v = v.double().flatten()
            assert zeros[row] == (v == 0).sum()
            keep = v[(v >= edges[0]) & ~v.isnan()]
            want = torch.bincount((torch.searchsorted(edges, keep, right=True) - 1).clamp(max=P.HIST_BINS - 1),
                                  minlength=P.HIST_BINS).double()
            assert torch.equal(counts[row], want), (m, row)
    with pytest.raises(ValueError, match="row index out of range"):
        P.cpu.log_hist(ws, torch.tensor([rows]), mode, counts, zeros, P.HIST_BINS, P.HIST_LO, P.HIST_HI)


def test_log_hist_bins_subnormal_changes_exactly():
    """Bins below the smallest normal float (1.2e-38): a subnormal's top 16 bits span several bins there, and each
    value must still land in the bin of its float64 edges (51 of 100 bins were off before)."""
    import lpt_kernels.analysis.profile as P
    if not P.cpu.AVAILABLE:
        pytest.skip("the CPU extension is not built")
    lo, hi, bins = -45.0, -35.0, 100
    edges = torch.tensor([10.0 ** (lo + (hi - lo) * b / bins) for b in range(bins + 1)], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    d = (10.0 ** (torch.rand(1, 4000, generator=g, dtype=torch.float64) * 10 - 45)).float()
    d[0, :60] = edges[20:80].float()  # on (the floats nearest) the edges
    counts, zeros = torch.zeros(2, bins, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    P.cpu.log_hist([torch.zeros_like(d), d], torch.tensor([0]), "consecutive", counts, zeros, bins, lo, hi)
    v = d.double().flatten()
    v = v[v >= edges[0]]
    want = torch.bincount((torch.searchsorted(edges, v, right=True) - 1).clamp(max=bins - 1), minlength=bins)
    assert torch.equal(counts[0], want.double())
    assert zeros.tolist() == [float((d == 0).sum()), 4000.0]  # every relative change is against a zero weight


def test_top_units_jaccard_and_shared_cosine(chain):
    dirs, states = chain
    prof = diff(dirs, progress=False)
    norms = torch.stack([_brute_mlp(states, l) for l in range(3)], 1).sqrt()  # [M, L, U]
    k = math.ceil(0.1 * norms[0].numel())
    tops = []
    for m in range(3):
        flat = norms[m].reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(k).indices] = True
        tops.append(mask.reshape(norms[m].shape))
        assert torch.equal(prof.top_units(m, "mlp", 0.1), mask.reshape(norms[m].shape))
    jac = prof.jaccard("mlp", 0.1)
    for a in range(3):
        for b in range(3):
            inter, union = (tops[a] & tops[b]).sum().item(), (tops[a] | tops[b]).sum().item()
            assert jac[a, b].item() == pytest.approx(inter / union)
    c = prof.shared_cosine("d1", "d2", "mlp", 0.1)
    assert c["pooled"].shape == (3,) and torch.equal(c["shared"], (tops[0] & tops[1]).sum(1))
    # chance level: the expected Jaccard of random sets of the same sizes, |A & B| hypergeometric (exact fractions)
    chance, n = prof.jaccard_chance("mlp", 0.1), norms[0].numel()
    for a in range(3):
        for b in range(3):
            sa, sb = int(tops[a].sum()), int(tops[b].sum())
            want = 1.0 if a == b else float(sum(Fraction(math.comb(sa, i) * math.comb(n - sa, sb - i), math.comb(n, sb))
                                                * Fraction(i, sa + sb - i) for i in range(max(0, sa + sb - n),
                                                                                          min(sa, sb) + 1)))
            assert chance[a, b].item() == pytest.approx(want, rel=1e-12)
    assert chance[0, 1].item() == pytest.approx(0.1 / 1.9, rel=0.1)  # about frac / (2 - frac)
    per_layer = prof.jaccard_chance("mlp", 0.1, per_layer=True)
    assert per_layer.shape == (3, 3, 3) and torch.equal(per_layer[:, 0, 0], torch.ones(3, dtype=torch.float64))
    # a random pair of sets of those sizes overlaps by about the chance level (a Monte Carlo mean)
    gen = torch.Generator().manual_seed(0)
    sa, sb = int(tops[0].sum()), int(tops[1].sum())
    mc = []
    for _ in range(2000):
        x, y = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        x[torch.randperm(n, generator=gen)[:sa]] = True
        y[torch.randperm(n, generator=gen)[:sb]] = True
        mc.append((x & y).sum().item() / (x | y).sum().item())
    assert sum(mc) / len(mc) == pytest.approx(chance[0, 1].item(), rel=0.05)
    # a unit whose statistics are NaN (non-finite weights) outside the shared set leaves the shared cosine alone
    layer = int(c["shared"].argmax())
    outside = int((~(tops[0][layer] | tops[1][layer])).nonzero()[0])
    for key in ("d1/mlp/sq_norm", "d1|d2/mlp/dot"):
        prof.arrays[key] = prof.arrays[key].clone()
        prof.arrays[key][layer, outside] = float("nan")
    c2 = prof.shared_cosine("d1", "d2", "mlp", 0.1)
    assert c2["pooled"][layer].item() == pytest.approx(c["pooled"][layer].item())
    assert c2["mean"][layer].item() == pytest.approx(c["mean"][layer].item())


def test_groups_in_some_layers_rank_their_own_units(tmp_path):
    """A MoE layout's dense MLP exists in layer 0 only and its experts in layers 1-3: "the top 10%" is 10% of the
    units that exist, and the chance level draws from those (not from the rows of zeros of the other layers)."""
    dirs, states, spec = save_moe_chain(str(tmp_path), n_domains=2)
    prof = diff(dirs, layout=spec, progress=False)
    assert prof.group_layers("mlp") == [0] and prof.group_layers("expert.0") == [1, 2, 3]
    for g in ("mlp", "expert.0"):
        layers = prof.group_layers(g)
        units = prof.stat("d1", g, "sq_norm").shape[1]
        n = len(layers) * units
        top = prof.top_units("d1", g, 0.1)
        assert int(top.sum()) == math.ceil(0.1 * n) and not top[[i for i in range(4) if i not in layers]].any()
        sa, sb = int(top.sum()), int(prof.top_units("d2", g, 0.1).sum())
        want = float(sum(Fraction(math.comb(sa, i) * math.comb(n - sa, sb - i), math.comb(n, sb))
                         * Fraction(i, sa + sb - i) for i in range(max(0, sa + sb - n), min(sa, sb) + 1)))
        assert prof.jaccard_chance(g, 0.1)[0, 1].item() == pytest.approx(want, rel=1e-12)
        per_layer = prof.jaccard_chance(g, 0.1, per_layer=True)
        assert torch.equal(per_layer[[i for i in range(4) if i not in layers]],
                           torch.zeros(4 - len(layers), 2, 2, dtype=torch.float64))
    # the report's per-layer norms leave the layers without the group as gaps (not 0); overlap's CSV lists its layers
    import subprocess
    import sys

    import lpt_kernels.analysis.report as R
    figs = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(R, "_save", lambda fig, path: figs.append(fig) or path)
    try:
        R.plot_layer_norms(prof, "mlp", str(tmp_path / "n.png"))
    finally:
        monkey.undo()
    ys = [torch.tensor(line.get_ydata(), dtype=torch.float64) for line in figs[0].axes[0].lines if line.get_label() in
          prof.deltas]
    assert len(ys) == 2 and all(y[0] > 0 and y[1:].isnan().all() for y in ys)
    prof.save(str(tmp_path / "prof"))
    r = subprocess.run([sys.executable, "-m", "lpt_kernels.cli", "overlap", str(tmp_path / "prof"), "--group", "mlp",
                        "--csv", str(tmp_path / "o.csv")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cos_layers = {ln.split(",")[4] for ln in open(tmp_path / "o.csv").read().splitlines() if ",shared_cosine," in ln}
    assert cos_layers == {"0"}


def test_save_load_roundtrip(chain, tmp_path):
    dirs, _ = chain
    prof = diff(dirs, atol=1e-4, progress=False)
    prof.save(str(tmp_path / "p"))
    back = Profile.load(str(tmp_path / "p"))
    assert back.meta == prof.meta
    assert set(back.arrays) == set(prof.arrays)
    for k in prof.arrays:
        assert torch.equal(back.arrays[k], prof.arrays[k])
        assert back.arrays[k].shape[:1] == (3,)
    assert "d1/mlp/sq_norm" in back.arrays and "d1|d2/mlp/dot" in back.arrays
    with pytest.raises(ProfileError, match="not a profile"):
        Profile.load(str(tmp_path))


def test_mixed_dtypes_and_nonfinite(tmp_path, helpers):
    dirs, states = save_chain(str(tmp_path / "a"), n_domains=1)
    # the same update stored as fp32 master weights
    dirs32, _ = save_chain(str(tmp_path / "b"), n_domains=1, dtype=torch.float32)
    prof = diff([dirs[0], dirs32[1]], progress=False, intersect=False)
    assert prof.meta["mixed_dtypes"] and prof.meta["dtypes"][1] == ["float32"]
    # a non-finite weight is counted and reported, never folded silently
    from safetensors.torch import load_file, save_file
    import glob, os
    shard = sorted(glob.glob(os.path.join(dirs[1], "*.safetensors")))[0]
    sd = load_file(shard)
    name = next(n for n, t in sd.items() if t.dim() == 2)
    sd[name][0, 0] = float("inf")
    save_file(sd, shard, metadata={"format": "pt"})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        prof = diff(dirs, progress=False)
    assert prof.meta["nonfinite"][name] == [0, 1]
    entry = prof.tensors[name]
    assert math.isinf(entry["abs_max"][0]) and not math.isfinite(entry["sq_norm"][0])


def test_bookkeeping_helpers_reject_bad_arguments():
    """The C++ helpers raise, never touch memory they were not given."""
    import lpt_kernels.analysis.profile as P
    from lpt_kernels.ops import UnitGram
    if not P.cpu.AVAILABLE:
        pytest.skip("the CPU extension is not built")
    n, m = 5, 2
    r = UnitGram(torch.rand(n, m, m), torch.rand(n, m), torch.rand(n, m), torch.zeros(n, m, dtype=torch.int64),
                 torch.zeros(n, m, dtype=torch.int64))
    acc = (torch.zeros(n, m, m, dtype=torch.float64), torch.zeros(n, m, dtype=torch.float64), torch.zeros(n, m),
           torch.zeros(n, m, dtype=torch.int64), torch.zeros(n, m, dtype=torch.int64))
    zeros, near, sq, mx, finite = P.cpu.fold_unit_gram(r, acc)
    assert sq == pytest.approx(torch.diagonal(r.gram, dim1=1, dim2=2).double().sum(0).tolist()) and finite
    assert torch.equal(acc[0], r.gram.double()) and mx == r.abs_max.amax(0).tolist()
    with pytest.raises(TypeError, match="dtypes"):
        P.cpu.fold_unit_gram(r._replace(gram=r.gram.double()))
    with pytest.raises(ValueError, match="shaped like"):
        P.cpu.fold_unit_gram(r, (acc[0][:2],) + acc[1:])
    r.gram[1, 0, 1] = float("nan")
    assert P.cpu.fold_unit_gram(r)[4] is False
    w = [torch.rand(4, 8), torch.rand(4, 8)]
    counts, z = torch.zeros(2, P.HIST_BINS, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="2 to 8 inputs"):
        P.cpu.log_hist(w[:1], torch.arange(2), "consecutive", counts[:0], z[:0], P.HIST_BINS, P.HIST_LO, P.HIST_HI)
    with pytest.raises(ValueError, match="bad mode"):
        P.cpu.log_hist(w, torch.arange(2), "given", counts, z, P.HIST_BINS, P.HIST_LO, P.HIST_HI)
    with pytest.raises(ValueError, match="bins"):
        P.cpu.log_hist(w, torch.arange(2), "base", torch.zeros(2, 0, dtype=torch.float64), z, 0, P.HIST_LO,
                       P.HIST_HI)
    with pytest.raises(ValueError, match="one shape"):
        P.cpu.log_hist([w[0], w[1][:2]], torch.arange(2), "base", counts, z, P.HIST_BINS, P.HIST_LO, P.HIST_HI)
    with pytest.raises(ValueError, match="counts must be"):
        P.cpu.log_hist(w, torch.arange(2), "base", counts.float(), z, P.HIST_BINS, P.HIST_LO, P.HIST_HI)
    with pytest.raises(ValueError, match="gram"):
        P.cpu.fold_unit_gram(r._replace(gram=r.gram[:, :1]))
