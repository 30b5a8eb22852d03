"""The smaller inputs from the field (issue 11, "also seen"): tied heads, checkpoints with nothing in common, the CLI's
non-strict rollback, GradientGram after an exception, and the relative histogram's exact edges."""
import math
import os
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckpt_factory import save_chain, tiny_qwen3_config
from lpt_kernels.analysis import diff
from lpt_kernels.analysis.apply import RollbackError, rollback_checkpoint
from lpt_kernels.analysis.profile import HIST_BINS, HIST_HI, HIST_LO
from lpt_kernels.analysis.selection import Selection
from lpt_kernels.backends import cpu
from lpt_kernels.checkpoint import Checkpoint, CheckpointError
from lpt_kernels.cli import main
from lpt_kernels.layout import detect_layout

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _copy_with(src, dst, extra=None, drop=(), config=None):
    """A single-file copy of checkpoint `src` with tensors added/replaced and dropped, and its config edited."""
    import json

    with Checkpoint(src) as ck:
        sd = {n: ck.tensor(n).clone() for n in ck.names if n not in drop}
        cfg = dict(ck.config, **(config or {}))
    sd.update(extra or {})
    os.makedirs(dst)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("seen")
    dirs, states = save_chain(str(root), n_domains=1)  # tied embeddings, saved without lm_head
    return root, dirs, states


def test_a_tied_head_that_differs_from_the_embedding_warns(chain, tmp_path):
    root, dirs, states = chain
    a = _copy_with(dirs[0], str(tmp_path / "a"), {HEAD: states[0][EMBED].clone()})
    b = _copy_with(dirs[1], str(tmp_path / "b"), {HEAD: states[1][EMBED] + 1})  # "tied", stored different
    with pytest.warns(RuntimeWarning, match=r"lm_head.weight differs from model.embed_tokens.weight"):
        prof = diff([a, b], progress=False)
    assert "tied_to" not in prof.tensors[HEAD]  # counted as a tensor of its own
    c = _copy_with(dirs[1], str(tmp_path / "c"), {HEAD: states[1][EMBED].clone()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = diff([a, c], progress=False)
    assert prof.tensors[HEAD]["tied_to"] == EMBED


def test_a_tied_head_stored_by_one_checkpoint_follows_one_rule(chain, tmp_path):
    """lpt diff rejected a tied lm_head stored by only one checkpoint while lpt rollback accepted it."""
    root, dirs, states = chain
    stored = _copy_with(dirs[1], str(tmp_path / "stored"), {HEAD: states[1][EMBED].clone()})
    prof = diff([dirs[0], stored], progress=False)  # dirs[0] lacks the head and declares tie_word_embeddings
    assert HEAD not in prof.tensors and "tied output embedding" in prof.meta["skipped"][HEAD]
    with Checkpoint(dirs[0]) as ck:
        layout = detect_layout({n: ck.info(n).shape for n in ck.names}, ck.config)
    sel = Selection(layout, {"mlp": {0: [1, 2]}})
    rollback_checkpoint(stored, dirs[0], sel, str(tmp_path / "r1"))
    rollback_checkpoint(dirs[0], stored, sel, str(tmp_path / "r2"))
    # without the declaration the missing head is a difference, for both
    untied = _copy_with(dirs[0], str(tmp_path / "untied"), config={"tie_word_embeddings": False})
    with pytest.raises(CheckpointError, match="lm_head.weight' missing from"):
        diff([untied, stored], progress=False)
    with pytest.raises(RollbackError, match="'lm_head.weight' is in TARGET but not in SOURCE"):
        rollback_checkpoint(stored, untied, sel, str(tmp_path / "r3"))


def test_no_tensor_in_common_is_said_so(chain, tmp_path):
    root, dirs, states = chain
    other = str(tmp_path / "other.safetensors")
    save_file({"encoder.w": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError) as ei:
        diff([dirs[0], other], progress=False)
    assert "no tensor in common" in str(ei.value) and "--intersect" not in str(ei.value)
    with pytest.raises(CheckpointError, match="no tensor in common"):
        diff([dirs[0], other], progress=False, intersect=True)


def test_cli_rolls_back_a_vocab_resized_pair_with_non_strict(chain, tmp_path, capsys):
    root, dirs, states = chain
    with Checkpoint(dirs[0]) as ck:
        layout = detect_layout({n: ck.info(n).shape for n in ck.names}, ck.config)
    resized = _copy_with(dirs[0], str(tmp_path / "resized"), {EMBED: torch.cat([states[0][EMBED],
                                                                                 states[0][EMBED][:2]])},
                         config={"vocab_size": 130})
    sel = str(tmp_path / "sel.json")
    Selection(layout, {"mlp": {2: [5]}}).save(sel)
    args = ["rollback", dirs[1], "--from", resized, "--select", sel, "-q"]
    assert main(args + ["--out", str(tmp_path / "strict")]) == 1
    assert "mismatched checkpoints" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "loose"), "--non-strict"]) == 0
    g = "model.layers.2.mlp.gate_proj.weight"
    with Checkpoint(str(tmp_path / "loose")) as r:
        assert torch.equal(r.tensor(g)[5], states[0][g][5]) and torch.equal(r.tensor(g)[4], states[1][g][4])


@pytest.mark.parametrize("device_buffer", [False, True])
def test_gradient_gram_counts_the_batch_whose_gradients_it_keeps(device_buffer):
    from transformers import Qwen3ForCausalLM

    from lpt_kernels.hooks import GradientGram

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(layers=1)).float()
    gg = GradientGram(model, ["a"], groups=("mlp",), device_buffer=device_buffer)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="eval failed"):
        with gg.domain("a"):
            model(input_ids=ids, labels=ids).loss.backward()
            raise RuntimeError("eval failed")
    model.zero_grad()
    kept = float(gg.result().gram()[0, 0])
    assert (kept > 0) == (not device_buffer)
    assert gg.batches["a"] == (0 if device_buffer else 1)  # the count follows the gradients kept
    with pytest.raises(RuntimeError):
        with gg.domain("a"):
            raise RuntimeError("before any backward")
    assert gg.batches["a"] == (0 if device_buffer else 1)


def _save_pair(d, w0, w1):
    os.makedirs(d)
    a, b = os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors")
    save_file({"w": w0}, a)
    save_file({"w": w1}, b)
    return a, b


def test_a_ratio_on_a_bin_edge_lands_in_the_bin_it_starts(tmp_path):
    """|d| = 2^-10 over |W| = 25 * 2^-8 is exactly 1/100: bin 100 ([1e-2, 10^-1.9)), not 99."""
    w0 = torch.full((4, 8), 25 * 2.0 ** -8, dtype=torch.bfloat16)
    w1 = w0 + 2.0 ** -10
    assert float(w1[0, 0]) - float(w0[0, 0]) == 2.0 ** -10
    spec = {"groups": {"rows": {"0": [{"tensor": "w", "axis": 0, "block": 1}]}}}
    prof = diff(list(_save_pair(str(tmp_path / "x"), w0, w1)), progress=False, labels=["a", "b"], layout=spec)
    rel = prof.hist["b/rel"]
    assert int(rel[100]) == 8 and int(rel.sum()) == 8  # every 64th row: row 0, 8 elements
    assert int(prof.hist["b/abs"][math.floor((-10 * math.log10(2) - HIST_LO) * 10)]) == 8


def _edge(b):
    x = HIST_LO + (HIST_HI - HIST_LO) * b / HIST_BINS
    k = round(x)
    return Fraction(10) ** k if abs(x - k) < 1e-9 else Fraction(math.pow(10.0, x))


_EDGES = [_edge(b) for b in range(HIST_BINS + 1)]


def _reference_bin(d: float, r: float):
    """The exact bin of the ratio d / r (rationals against the edges: decades exact, others the double pow)."""
    q = Fraction(d) / Fraction(r)
    if q < _EDGES[0]:
        return None
    for b in range(HIST_BINS):
        if q < _EDGES[b + 1]:
            return b
    return HIST_BINS - 1


@pytest.mark.skipif(not cpu.AVAILABLE, reason="CPU extension not built")
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2 ** 11), st.integers(-40, 4), st.sampled_from([1, 2, 4, 5, 8, 10, 20, 25,
                                                                                          50, 100, 125, 1000])),
                min_size=1, max_size=64))
def test_ratio_bins_are_exact(cases):
    """Ratios built to sit on or next to decade edges: |d| = m 2^e, |w| = |d| * k (or one ulp off), binned by
    log_hist and by exact rational arithmetic."""
    w0, w1 = [], []
    for m, e, k in cases:
        base = m * 2.0 ** e
        for ref in (base * k, math.nextafter(base * k, 0.0), math.nextafter(base * k, math.inf)):
            w0.append(ref)
            w1.append(ref + base)
    w0 = torch.tensor(w0, dtype=torch.float32)[None]
    w1 = torch.tensor(w1, dtype=torch.float32)[None]
    counts = torch.zeros(2, HIST_BINS, dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    cpu.log_hist([w0, w1], torch.zeros(1, dtype=torch.int64), "consecutive", counts, zeros, HIST_BINS, HIST_LO,
                 HIST_HI)
    want = torch.zeros(HIST_BINS, dtype=torch.float64)
    for a, b in zip(w0[0].tolist(), w1[0].tolist()):
        d = abs(float(torch.tensor(b, dtype=torch.float32) - torch.tensor(a, dtype=torch.float32)))
        bb = _reference_bin(d, abs(a)) if d else None
        if bb is not None:
            want[bb] += 1
    assert torch.equal(counts[1], want)
