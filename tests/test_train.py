"""lpt_kernels.train: the DeltaTracker against `diff` over checkpoints saved by save_pretrained at the same points,
its step metrics against the profile, the RefreshMonitor against a brute-force projection, memory over many steps,
and misuse."""
import gc
import math
import os
import tracemalloc
import warnings

import pytest
import torch

from ckpt_factory import tiny_qwen3_config
from lpt_kernels.analysis import Profile, diff
from lpt_kernels.analysis.select import conflict_scores, select
from lpt_kernels.checkpoint import Checkpoint
from lpt_kernels.layout import layout_from_spec
from lpt_kernels.train import MAX_DOMAINS, DeltaTracker, RefreshMonitor, TrainError
from lpt_kernels.train import tracker as tracker_mod

DOMAINS = ("code", "math", "qa")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread; on a loaded shared machine two OpenMP threads wait on each other
    (10x slower steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(dtype=torch.float32, tie=False, seed=0):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_qwen3_config(tie=tie)).to(dtype)


def train_step(model, opt, domain_index, gen):
    """One optimizer step on a batch of the domain's tokens (each domain its own token range, so it moves its own
    embedding rows and routes)."""
    lo = 10 + 35 * domain_index
    ids = torch.randint(lo, lo + 35, (2, 12), generator=gen)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_domains(model, tracker, root, opt, steps=4, domains=DOMAINS, on_step=None, seed=0):
    """Train domain after domain, saving base and every domain's end with save_pretrained (sharded, with index)."""
    gen = torch.Generator().manual_seed(seed)
    model.save_pretrained(os.path.join(root, "base"), max_shard_size="60KB")
    for i, d in enumerate(domains):
        tracker.start_domain(d)
        for s in range(steps):
            train_step(model, opt, i, gen)
            m = tracker.step()
            if on_step is not None:
                on_step(d, s, m)
        model.save_pretrained(os.path.join(root, d), max_shard_size="60KB")
    return [os.path.join(root, x) for x in ("base",) + tuple(domains)]


def assert_profiles_equal(p: Profile, q: Profile):
    """The tracker's profile p against diff's q: same meta fields the readers use, same arrays (counts and maxima
    bit for bit, sums within fp32 tolerance), same per-tensor entries and histograms."""
    for key in ("deltas", "labels", "mode", "atol", "rtol", "groups", "groups_left_out", "group_layers", "layout",
                "num_layers", "units", "dtypes", "mixed_dtypes", "skipped", "nonfinite", "hist_stride",
                "hist_edges_log10", "version"):
        assert p.meta[key] == q.meta[key], key
    assert len(p.meta["checkpoints"]) == len(q.meta["checkpoints"])
    assert set(p.arrays) == set(q.arrays)
    for k, b in q.arrays.items():
        a = p.arrays[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if a.dtype == torch.int64 or k.endswith("/abs_max"):
            assert torch.equal(a, b), k
        else:
            tol = 1e-5 * b.double().abs().max().clamp_min(1e-30)
            assert ((a.double() - b.double()).abs() <= tol).all(), k
    assert set(p.tensors) == set(q.tensors)
    for n, e in q.tensors.items():
        f = p.tensors[n]
        assert set(f) == set(e), n
        for key in ("elements", "shape", "dtypes", "zeros", "near_zeros", "abs_max"):
            assert f[key] == e[key], (n, key)
        assert f.get("tied_to") == e.get("tied_to")
        for x, y in zip(f["sq_norm"], e["sq_norm"]):
            assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-30), n
    assert set(p.hist) == set(q.hist)
    for k in q.hist:
        assert torch.equal(p.hist[k], q.hist[k]), k
    assert p.sparsity() == q.sparsity()
    assert p.sparsity(tolerance=True) == q.sparsity(tolerance=True)


@pytest.mark.parametrize("case", ["fp32-adamw-untied", "fp32-sgd-tied", "bf16-adamw-tied", "fp64-sgd-tied"])
def test_profile_equals_diff_of_saved_checkpoints(tmp_path, case):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[case[:4]]
    model = make_model(dtype, tie=case.endswith("-tied"))
    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if "sgd" in case
           else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0))
    tracker = DeltaTracker(model, groups=("mlp", "attn", "kv"), every=3, atol=1e-6, rtol=1e-3)
    mid = {}

    def on_step(d, s, metrics):  # every > 1: a tracked step mid-domain, saved and compared too
        if d == "math" and metrics:
            model.save_pretrained(tmp_path / "math_mid", max_shard_size="60KB")
            mid["profile"] = tracker.profile()

    dirs = run_domains(model, tracker, str(tmp_path), opt, steps=4, on_step=on_step)
    q = diff(dirs, groups=("mlp", "attn", "kv"), atol=1e-6, rtol=1e-3, progress=False)
    p = tracker.profile()
    assert p.deltas == list(DOMAINS) and p.meta["labels"] == ["base", *DOMAINS]
    assert_profiles_equal(p, q)
    q_mid = diff(dirs[:2] + [str(tmp_path / "math_mid")], groups=("mlp", "attn", "kv"), atol=1e-6, rtol=1e-3,
                 labels=["base", "code", "math"], progress=False)
    assert_profiles_equal(mid["profile"], q_mid)
    # the comparison has teeth: updates are not trivial, and the bf16 case has the paper's exact-zero sparsity
    assert all(p.norm(d, "mlp").sum() > 0 for d in DOMAINS)
    if dtype == torch.bfloat16:
        assert min(p.sparsity().values()) > 0.01
    if "untied" in case:  # AdamW without decay leaves the rows of tokens a domain never saw exactly in place
        assert p.tensors["model.embed_tokens.weight"]["zeros"][0] > 0


def test_step_metrics_equal_the_profile_at_that_point(tmp_path):
    model = make_model(torch.bfloat16, tie=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    tracker = DeltaTracker(model, groups=("mlp", "attn"), every=2, atol=1e-5, conflict=True)
    checked = []

    def on_step(d, s, metrics):
        if not metrics:
            return
        p = tracker.profile()  # equals diff at this point (test above); the metrics must agree with it
        assert metrics[f"lpt/{d}/sparsity"] == p.sparsity()[d]
        assert metrics[f"lpt/{d}/sparsity_tol"] == p.sparsity(tolerance=True)[d]
        total = sum(e["sq_norm"][-1] for e in p.tensors.values())
        assert math.isclose(metrics[f"lpt/{d}/update_norm"], math.sqrt(total), rel_tol=1e-5)
        for g in ("mlp", "attn"):
            assert math.isclose(metrics[f"lpt/{d}/{g}/update_norm"], float(p.norm(d, g).pow(2).sum().sqrt()),
                                rel_tol=1e-5)
            j = p.jaccard(g, 0.10)
            for e in p.deltas[:p.deltas.index(d)]:
                assert metrics[f"lpt/{d}/{g}/top10_jaccard/{e}"] == pytest.approx(
                    float(j[p.deltas.index(e), p.deltas.index(d)]), abs=1e-12)
                pooled = p.shared_cosine(e, d, g, 0.10)["pooled"]
                ok = ~pooled.isnan()
                want = float(pooled[ok].mean()) if ok.any() else float("nan")
                got = metrics[f"lpt/{d}/{g}/shared_cosine/{e}"]
                assert (math.isnan(want) and math.isnan(got)) or math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6)
                for layer in range(3):
                    c = float(pooled[layer]) if ok[layer] else 0.0
                    assert metrics[f"lpt/{d}/{g}/conflict/{e}/layer{layer}"] == pytest.approx(max(0.0, -c), abs=1e-5)
        checked.append((d, sorted(metrics)))

    run_domains(model, tracker, str(tmp_path), opt, steps=4, on_step=on_step)
    assert [d for d, _ in checked] == ["code", "code", "math", "math", "qa", "qa"]
    keys = dict(checked)
    assert "lpt/qa/mlp/shared_cosine/code" in keys["qa"] and "lpt/qa/mlp/top10_jaccard/math" in keys["qa"]
    assert not any("jaccard" in k for k in keys["code"])  # the first domain has nothing to compare with
    assert all(isinstance(v, float) for v in tracker.step().values())


def test_compare_limits_the_cosines_but_not_the_overlaps(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    full, last, none = DeltaTracker(model), DeltaTracker(model, compare=1), DeltaTracker(model, compare=0)
    gen = torch.Generator().manual_seed(0)
    for i, d in enumerate(DOMAINS):
        for t in (full, last, none):
            t.start_domain(d)
        for _ in range(2):
            train_step(model, opt, i, gen)
            a, b, c = full.step(), last.step(), none.step()
    assert "lpt/qa/mlp/shared_cosine/code" in a and "lpt/qa/mlp/shared_cosine/math" in a
    assert set(b) == {k for k in a if "shared_cosine/code" not in k}
    assert set(c) == {k for k in a if "shared_cosine" not in k} and "lpt/qa/mlp/top10_jaccard/code" in c
    for k in b:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=1e-6), k
    for k in c:
        assert a[k] == pytest.approx(c[k], rel=1e-6), k


def test_every_and_start_domain_semantics():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = DeltaTracker(model, every=3)
    gen = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker.start_domain("code")
    assert tracker.domain == "code" and tracker.steps == 0
    got = []
    for i in range(7):
        train_step(model, opt, 0, gen)
        got.append(bool(tracker.step()))
    assert got == [False, False, True, False, False, True, False] and tracker.steps == 7
    after_code = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker.start_domain("math")  # closes code at the current parameters; counting restarts
    assert tracker.steps == 0 and tracker.domains == ["code", "math"]
    got = []
    for i in range(3):
        train_step(model, opt, 1, gen)
        got.append(sorted(tracker.step()))
    assert got[0] == [] and got[1] == [] and all(k.startswith("lpt/math/") for k in got[2])
    # snapshots: base = the parameters at the first start_domain, code = those when math started
    for label, want in (("base", before), ("code", after_code)):
        snap = tracker.snapshot(label)
        assert set(snap) == {n for n, _ in model.named_parameters()}
        for n, t in want.items():
            assert torch.equal(snap[n], t), (label, n)
    with pytest.raises(TrainError, match="no snapshot 'math'"):
        tracker.snapshot("math")
    p = tracker.profile()
    assert p.deltas == ["code", "math"] and p.meta["steps"] == {"code": 7, "math": 3}
    # code's update is exactly after_code - before, whatever happened since
    d = sum(float(((after_code[n].double() - before[n].double()) ** 2).sum()) for n in before)
    assert math.isclose(sum(e["sq_norm"][0] for e in p.tensors.values()), d, rel_tol=1e-5)


def test_misuse_is_a_one_line_error(tmp_path):
    model = make_model()
    tracker = DeltaTracker(model)
    for call, msg in ((tracker.step, "no domain started"), (tracker.profile, "no domain started")):
        with pytest.raises(TrainError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)
    tracker.start_domain("code")
    for bad, msg in (("code", "already used"), ("base", "already used"), ("a/b", "may not contain"),
                     ("", "non-empty")):
        with pytest.raises(TrainError, match=msg):
            tracker.start_domain(bad)
    for i in range(MAX_DOMAINS - 1):
        tracker.start_domain(f"d{i}")
    with pytest.raises(TrainError, match=f"at most {MAX_DOMAINS} domains"):
        tracker.start_domain("one-too-many")
    tracker.close()
    with pytest.raises(TrainError, match="closed"):
        tracker.step()
    # a model whose units no layout describes
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with pytest.raises(TrainError) as e:
        DeltaTracker(mlp)
    assert "unknown architecture" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TrainError, match="no floating-point parameters"):
        DeltaTracker(torch.nn.Module())
    with pytest.raises(TypeError, match="model"):
        DeltaTracker("not a model")
    for kwargs, msg in (({"every": 0}, "every"), ({"every": 1.5}, "every"), ({"snapshot": "ram"}, "snapshot"),
                        ({"snapshot": "disk:"}, "snapshot"), ({"groups": ("mlp", "experts")}, "group 'experts'"),
                        ({"top": 0.0}, "top"), ({"atol": -1.0}, "atol"), ({"compare": -1}, "compare"),
                        ({"layout": {"groups": {"mlp": [{"tensor": "x.{layer}.w", "axis": 0}]}}}, "no tensor name")):
        with pytest.raises(TrainError, match=msg) as e:
            DeltaTracker(model, **kwargs)
        assert "\n" not in str(e.value)


def test_sharded_parameters_are_tracked(tmp_path):
    """A DTensor parameter (here on a one-rank mesh; tests/test_fsdp.py runs FSDP2 over 2 and 3 ranks) is tracked
    through its local shard and gives the plain model's numbers."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lpt_kernels.distributed import local_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, plain = make_model(), make_model()
        mesh = init_device_mesh("cpu", (1,))
        for mod, dim in ((model.model.layers[0].mlp.gate_proj, 0), (model.model.layers[1].mlp.down_proj, 1),
                         (model.model.norm, 0)):
            mod.weight = torch.nn.Parameter(distribute_tensor(mod.weight.detach(), mesh, [Shard(dim)]))
        trackers = [DeltaTracker(m, snapshot="cpu") for m in (model, plain)]
        gen = torch.Generator().manual_seed(3)
        for i, d in enumerate(DOMAINS[:2]):
            for t in trackers:
                t.start_domain(d)
            with torch.no_grad():
                for m in (model, plain):
                    for p in m.parameters():  # one rank: the local shard is the whole parameter
                        local_tensor(p).add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-3)
            got, want = trackers[0].step(), trackers[1].step()
            assert got.keys() == want.keys() and all(math.isclose(got[k], want[k], rel_tol=1e-6, abs_tol=1e-9)
                                                     for k in want)
        a, b = (t.profile() for t in trackers)
        assert all(torch.allclose(a.arrays[k].double(), b.arrays[k].double(), rtol=1e-6) for k in b.arrays)
        assert a.tensors == b.tensors or all(a.tensors[n]["zeros"] == b.tensors[n]["zeros"] for n in b.tensors)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["cpu", "device", "disk"])
def test_snapshot_modes_give_the_same_profile(tmp_path, mode):
    spec = f"disk:{tmp_path / 'snaps'}" if mode == "disk" else mode
    model = make_model(torch.bfloat16)
    ref = DeltaTracker(model, every=2)
    tracker = DeltaTracker(model, snapshot=spec, every=2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for i, d in enumerate(DOMAINS[:2]):
        ref.start_domain(d)
        tracker.start_domain(d)
        for _ in range(2):
            train_step(model, opt, i, gen)
            a, b = ref.step(), tracker.step()
            assert set(a) == set(b) and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)
    p, q = tracker.profile(), ref.profile()
    assert p.arrays.keys() == q.arrays.keys() and all(torch.equal(p.arrays[k], q.arrays[k]) for k in p.arrays)
    mem = tracker.memory()
    assert mem["snapshots"] == 2 and mem["snapshot_bytes"] >= 2 * DeltaTracker.snapshot_bytes(model)
    assert mem["summary_bytes"] > 0
    if mode == "disk":
        files = sorted(os.listdir(tmp_path / "snaps"))
        assert files == ["00-base.safetensors", "01-code.safetensors"]
        assert p.meta["checkpoints"][:2] == [str(tmp_path / "snaps" / f) for f in files]
        # the snapshot files are ordinary checkpoints: the base one holds the parameters at the first start
        with Checkpoint(str(tmp_path / "snaps" / files[0])) as c:
            assert torch.equal(c.tensor("model.norm.weight"), tracker.snapshot("base")["model.norm.weight"])
        assert mem["location"].startswith("disk:")
    else:
        assert mem["snapshot_bytes"] == 2 * DeltaTracker.snapshot_bytes(model)
    tracker.close()


def test_histograms_binned_on_another_device_match(tmp_path):
    """The device path of the histograms (rows gathered where the tensors live, binned on the host) bins the same
    rows as lpt diff: exercised here on CPU tensors."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((3000, 40), (5, 7), (1, 9000)):
        w0 = torch.randn(shape, generator=gen).to(torch.bfloat16)
        w1 = (w0.float() + torch.randn(shape, generator=gen) * 1e-2 * (torch.rand(shape, generator=gen) < 0.3)
              ).to(torch.bfloat16)
        a, b = tracker_mod._HistTotals(["x"]), tracker_mod._HistTotals(["x"])
        tracker_mod._hist_add(a, w0, w1, 64)
        tracker_mod._hist_add(b, w0, w1, 64, gather=True)
        assert torch.equal(a.counts, b.counts) and torch.equal(a.zeros, b.zeros) and a.counts.sum() > 0


def test_no_memory_growth_over_many_steps():
    import psutil

    model = make_model()
    tracker = DeltaTracker(model, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    tracker.start_domain("code")
    train_step(model, opt, 0, gen)
    tracker.start_domain("math")
    train_step(model, opt, 1, gen)
    proc = psutil.Process()

    def steps(n):
        for _ in range(n):
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight.add_(1e-4)
            tracker.step()

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))

    steps(50)  # warm up the allocator and every code path
    tensors0 = live_tensors()
    tracemalloc.start()
    rss0 = proc.memory_info().rss
    snap0 = tracemalloc.take_snapshot()
    steps(200)
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename"))
    rss1 = proc.memory_info().rss
    tracemalloc.stop()
    assert grown < 64 << 10, f"Python allocations grew by {grown} bytes over 200 steps"
    assert rss1 - rss0 < 8 << 20, f"RSS grew by {(rss1 - rss0) >> 10} KiB over 200 steps"
    assert live_tensors() == tensors0  # nothing kept from one step to the next


def test_profile_feeds_the_cli_and_the_selector(tmp_path, capsys):
    from lpt_kernels.cli import main

    model = make_model(torch.bfloat16)
    tracker = DeltaTracker(model, groups=("mlp", "attn", "kv"))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    dirs = run_domains(model, tracker, str(tmp_path), opt, steps=3)
    tracker.profile().save(str(tmp_path / "p_tracker"))
    diff(dirs, progress=False).save(str(tmp_path / "p_diff"))
    outs = []
    for name in ("p_tracker", "p_diff"):
        assert main(["overlap", str(tmp_path / name)]) == 0
        outs.append(capsys.readouterr().out)
        assert main(["report", str(tmp_path / name)]) == 0
        capsys.readouterr()
        assert os.path.isfile(tmp_path / name / "report" / "report.html")
    assert outs[0] == outs[1]
    for selector in ("M", "MC"):
        sels = []
        for name in ("p_tracker", "p_diff"):
            prof = Profile.load(str(tmp_path / name))
            layout = layout_from_spec(prof.meta["layout"], list(prof.tensors), None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sels.append(select(conflict_scores(prof, "math", "qa"), layout, selector, 0.1).units)
            said = any("nothing selected" in str(w.message) for w in caught)
            assert said == (not any(sels[-1].values())), caught  # an empty selection says so, and only then
        assert sels[0] == sels[1]
        assert sels[0] or selector == "MC"  # MC takes only units with a conflict (there may be none)


def _brute_displacement(model, ref, selection):
    """float64 norms of theta - ref over the selection's slices, over the rest, over everything."""
    mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for m, ids in selection.slices():
        for u in ids:
            sl = slice(u * m.block, (u + 1) * m.block)
            if m.axis == 0:
                mask[m.tensor][sl] = True
            else:
                mask[m.tensor][:, sl] = True
    sel = rest = 0.0
    for n, p in model.named_parameters():
        d = (p.detach().double() - ref[n].double()) ** 2
        sel += float(d[mask[n]].sum())
        rest += float(d[~mask[n]].sum())
    return math.sqrt(sel), math.sqrt(rest), math.sqrt(sel + rest)


def test_refresh_monitor_equals_brute_force_projection(tmp_path):
    model = make_model(torch.bfloat16)
    tracker = DeltaTracker(model, groups=("mlp", "attn"))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    dirs = run_domains(model, tracker, str(tmp_path), opt, steps=3)
    prof = tracker.profile()
    layout = layout_from_spec(prof.meta["layout"], list(prof.tensors), None)
    sel = select(conflict_scores(prof, "math", "qa", groups=("mlp", "attn")), layout, "M", 0.2)
    assert sel.count() > 0 and sel.meta["earlier"] == "math"
    sel_path = sel.save(str(tmp_path / "sel.json"))
    refs = {}
    for name, d in (("math", dirs[2]), ("code", dirs[1])):
        with Checkpoint(d) as c:
            refs[name] = {n: c.tensor(n).clone() for n in c.names}
    # E as a path, the others as a Checkpoint and as the tracker's own snapshot (code's end = math's start)
    monitor = RefreshMonitor(model, dirs[2], sel_path, others={"code": Checkpoint(dirs[1]),
                                                               "code_snap": tracker.snapshot("code")}, every=2)
    gen = torch.Generator().manual_seed(1)
    ropt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    seen = 0
    for s in range(4):
        train_step(model, ropt, 1, gen)  # the refresh: math again
        m = monitor.step()
        if s % 2 == 0:
            assert m == {}
            continue
        seen += 1
        for name, ref in (("math", refs["math"]), ("code", refs["code"]), ("code_snap", refs["code"])):
            want = _brute_displacement(model, ref, sel)
            got = [m[f"lpt/refresh/{name}/{k}"] for k in ("selected_norm", "rest_norm", "norm")]
            for g, w in zip(got, want):
                assert math.isclose(g, w, rel_tol=1e-5), (name, got, want)
        assert m["lpt/refresh/math/selected_norm"] > 0 and m["lpt/refresh/math/rest_norm"] > 0
    assert seen == 2
    monitor.close()


def test_refresh_monitor_misuse(tmp_path):
    model = make_model()
    tracker = DeltaTracker(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dirs = run_domains(model, tracker, str(tmp_path), opt, steps=1, domains=("code", "math"))
    prof = tracker.profile()
    layout = layout_from_spec(prof.meta["layout"], list(prof.tensors), None)
    sel = select(conflict_scores(prof, "code", "math"), layout, "M", 0.1)
    with pytest.raises(TrainError, match="earlier: no tensor model.embed_tokens.weight"):
        RefreshMonitor(model, {"x": torch.zeros(1)}, sel)
    bad = {n: p.detach()[:1] if n.endswith("up_proj.weight") else p.detach() for n, p in model.named_parameters()}
    with pytest.raises(TrainError, match="up_proj.weight has shape"):
        RefreshMonitor(model, bad, sel)
    with pytest.raises(TrainError, match="no such checkpoint"):
        RefreshMonitor(model, str(tmp_path / "missing"), sel)
    with pytest.raises(TrainError, match="selection"):
        RefreshMonitor(model, dirs[1], str(tmp_path / "missing.json"))
    other = make_model()
    other_sel = select(conflict_scores(prof, "code", "math"), layout, "M", 0.1)
    small = __import__("transformers").Qwen3ForCausalLM(tiny_qwen3_config(layers=2))
    with pytest.raises(TrainError, match="does not fit the model"):
        RefreshMonitor(small, dirs[1], other_sel)
    with pytest.raises(TrainError, match="used twice"):
        RefreshMonitor(other, dirs[1], sel, name="code", others={"code": dirs[1]})
