"""lpt_kernels.hooks on real (tiny) transformers models: ActivationStats against a brute-force float64 reference that
records the full activations, padding and token masks, cleanup, no effect on outputs or gradients, no_grad /
inference_mode / torch.compile, save/load; GradientGram against dense gradient cosines."""
import gc
import math
import os
import warnings
import weakref

import pytest
import torch

from lpt_kernels import hooks as H
from lpt_kernels.hooks import ActivationResult, ActivationStats, GradientGram, GramResult, HookError, jaccard
from lpt_kernels.hooks.gradients import _unit_grams
from lpt_kernels.layout import load_layout
from lpt_kernels.units import top_mask

transformers = pytest.importorskip("transformers")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HEAD_DIM = 16


def _qwen3(seed=0, layers=2, **kw):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM, vocab_size=128,
                                   attn_implementation="sdpa", **kw)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def _llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM, vocab_size=128,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


MODELS = {"qwen3": _qwen3, "llama": _llama}


def _batch(seed, lengths=(12, 7), seq=12, left=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, seq - n:] = 1
        else:
            mask[i, :n] = 1
    return ids.to(device), mask.to(device)


class Recorder:
    """Brute force: store the full inputs of every down_proj / o_proj (float64) and the masks that go with them."""

    def __init__(self, model):
        self.acts = {}
        self.handles = []
        for n, mod in model.named_modules():
            if n.endswith("mlp.down_proj") or n.endswith("self_attn.o_proj"):
                g = "mlp" if n.endswith("down_proj") else "attn"
                layer = int(n.split(".")[2])
                self.handles.append(mod.register_forward_pre_hook(self._hook((g, layer))))

    def _hook(self, key):
        def hook(mod, args):
            self.acts.setdefault(key, []).append(args[0].detach().double().cpu())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def stats(self, masks, threshold=0.0, block=None):
        """{(group, layer): {stat: [units]}} float64 over the tokens where masks[i] (per call) is True."""
        out = {}
        for (g, layer), xs in self.acts.items():
            rows = torch.cat([x[m.cpu().bool()] if m is not None else x.reshape(-1, x.shape[-1])
                              for x, m in zip(xs, masks)])  # [tokens, C]
            b = HEAD_DIM if g == "attn" else 1
            a = rows.abs()
            n = rows.shape[0]
            per_unit = lambda t: t.reshape(t.shape[0], -1, b)  # noqa: E731
            d = {
                "tokens": torch.full((a.shape[1] // b,), float(n), dtype=torch.float64),
                "abs_sum": per_unit(a).sum((0, 2)),
                "sq_sum": per_unit(a * a).sum((0, 2)),
                "abs_max": per_unit(a).amax((0, 2)) if n else torch.zeros(a.shape[1] // b, dtype=torch.float64),
                "active": per_unit((rows.float().abs() > threshold).double()).sum((0, 2)),
            }
            den = max(n * b, 1)
            d["mean_abs"] = d["abs_sum"] / den
            d["rms"] = (d["sq_sum"] / den).sqrt()
            d["freq"] = d["active"] / den
            out[(g, layer)] = d
        return out


def _assert_matches(res, ref, name=None, groups=("mlp", "attn")):
    for (g, layer), d in ref.items():
        if g not in groups:
            continue
        for k, want in d.items():
            got = res.stat(g, k, name)[layer]
            if k in ("tokens", "active"):
                assert torch.equal(got, want), f"{g} layer {layer} {k}"
            elif k == "abs_max":
                assert torch.allclose(got, want, rtol=1e-6, atol=0), f"{g} layer {layer} {k}"
            else:
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-12), \
                    f"{g} layer {layer} {k}: max err {(got - want).abs().max()}"


def _no_hooks(model):
    for mod in model.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks, type(mod).__name__
        assert not getattr(mod, "_forward_hooks_always_called", {})
    for p in model.parameters():
        assert not p._backward_hooks


# ---- ActivationStats: correctness -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_stats_match_brute_force_with_padding(arch, device):
    model = MODELS[arch]().to(device)
    rec = Recorder(model)
    batches = [_batch(1, (12, 7), device=device), _batch(2, (5, 9, 11), left=True, device=device)]
    with torch.no_grad(), ActivationStats(model, threshold=0.05, name="code") as acts:
        for i, (ids, mask) in enumerate(batches):
            if i == 0:
                model(ids, attention_mask=mask)
            else:
                model(ids, mask)  # positional attention_mask
    rec.remove()
    ref = rec.stats([m for _, m in batches], threshold=0.05)  # one recorded input per call per site
    res = acts.result()
    assert res.names == ["code"] and res.groups == ["mlp", "attn"]
    assert res.stat("mlp", "tokens").shape == (2, 96) and res.stat("attn", "tokens").shape == (2, 4)
    n_real = sum(int(m.sum()) for _, m in batches)
    assert res.tokens() == n_real == 12 + 7 + 5 + 9 + 11
    _assert_matches(res, ref)
    assert acts.calls == 2 and acts.unmasked_calls == 0


def test_padding_tokens_are_not_counted():
    model = _qwen3()
    ids, mask = _batch(3, (10, 4), seq=10)
    with torch.no_grad(), ActivationStats(model) as masked:
        model(ids, attention_mask=mask)
    with torch.no_grad(), ActivationStats(model, use_attention_mask=False) as unmasked:
        model(ids, attention_mask=mask)
    with torch.no_grad(), ActivationStats(model) as nomask:
        model(ids)
    assert masked.result().tokens() == 14
    assert unmasked.result().tokens() == 20 and nomask.result().tokens() == 20
    # the padded positions do contribute activations, so the sums differ
    a = masked.result().stat("mlp", "abs_sum")
    b = unmasked.result().stat("mlp", "abs_sum")
    assert (b > a).any()
    # real tokens only: the same as the two sequences without the padding (right padding, causal attention)
    with torch.no_grad(), ActivationStats(model) as alone:
        model(ids[:1, :10])
        model(ids[1:, :4])
    assert torch.allclose(masked.result().stat("mlp", "abs_sum"), alone.result().stat("mlp", "abs_sum"), rtol=1e-4)
    assert torch.equal(masked.result().stat("mlp", "tokens"), alone.result().stat("mlp", "tokens"))


def test_explicit_token_mask_takes_precedence():
    model = _qwen3()
    ids, mask = _batch(4, (12, 8))
    g = torch.Generator().manual_seed(5)
    tm = torch.rand(2, 12, generator=g) > 0.4
    rec = Recorder(model)
    acts = ActivationStats(model)
    with torch.no_grad(), acts, acts.token_mask(tm):
        model(ids, attention_mask=mask)
    rec.remove()
    _assert_matches(acts.result(), rec.stats([tm]))
    assert acts._token_mask is None
    # set_token_mask with an integer mask, then cleared
    acts.reset()
    with torch.no_grad(), acts:
        acts.set_token_mask(tm.long())
        model(ids, attention_mask=mask)
        acts.set_token_mask(None)
        model(ids, attention_mask=mask)
    assert acts.result().tokens() == int(tm.sum()) + 20
    # an explicit mask that fits no activation is an error, and the hooks still come off
    with pytest.raises(HookError, match="token mask"):
        with torch.no_grad(), acts, acts.token_mask(torch.ones(3, 5, dtype=torch.bool)):
            model(ids)
    _no_hooks(model)


def test_unusable_attention_mask_counts_all_tokens_and_warns():
    model = _qwen3()
    ids, _ = _batch(6, (12, 12))
    mask4 = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    with pytest.warns(RuntimeWarning, match="every token"):
        with torch.no_grad(), ActivationStats(model) as acts:
            model(ids, attention_mask=mask4)
    assert acts.result().tokens() == 24 and acts.unmasked_calls == 1


def test_kv_cache_decoding_uses_the_last_mask_columns():
    model = _qwen3()
    ids, mask = _batch(7, (6, 4), seq=6, left=True)
    with torch.no_grad(), ActivationStats(model) as acts:
        out = model(ids, attention_mask=mask, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
              past_key_values=out.past_key_values, use_cache=True)
    assert acts.result().tokens() == 10 + 2 and acts.unmasked_calls == 0


def test_top_units_and_jaccard_against_brute_force():
    model = _qwen3()
    results, refs = [], []
    for dom, seed in (("code", 11), ("math", 12)):
        rec = Recorder(model)
        ids, mask = _batch(seed, (12, 9))
        with torch.no_grad(), ActivationStats(model, name=dom) as acts:
            model(ids, attention_mask=mask)
        rec.remove()
        results.append(acts.result())
        refs.append(rec.stats([mask]))
    frac = 0.1

    def ref_mask(ref, group, per_layer, by="mean_abs"):
        score = torch.stack([ref[(group, layer)][by] for layer in range(2)])
        flat = score if per_layer else score.reshape(1, -1)
        k = math.ceil(frac * flat.shape[1])
        m = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, 1).indices, True)
        return m.reshape(score.shape)

    for per_layer in (False, True):
        for group in ("mlp", "attn"):
            ma, mb = (ref_mask(r, group, per_layer) for r in refs)
            assert torch.equal(results[0].top_units(group, frac, per_layer), ma)
            assert torch.equal(results[1].top_units(group, frac, per_layer), mb)
            dims = (-1,) if per_layer else (-2, -1)
            want = (ma & mb).sum(dims).double() / (ma | mb).sum(dims).double()
            got = jaccard(results[0], results[1], group, frac, per_layer)
            assert torch.allclose(got, want)
            assert torch.allclose(results[0].jaccard(results[1], group, frac, per_layer), want)
    top = results[0].top_units("mlp", 0.05)
    assert int(top.sum()) == math.ceil(0.05 * 2 * 96)
    assert torch.equal(results[0].top_units("mlp", 0.25, by="freq"),
                       top_mask(results[0].stat("mlp", "freq"), 0.25, False))
    assert float(jaccard(results[0], results[0], "mlp", 0.05)) == 1.0
    for by, err in (("tokens", "same for every unit"), ("median", "not one of")):
        with pytest.raises(HookError, match=err):
            results[0].top_units("mlp", 0.05, by=by)


# ---- ActivationStats: modes and the model ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_no_effect_on_outputs_or_gradients(device):
    model = _qwen3().to(device).train()
    ids, mask = _batch(8, (12, 7), device=device)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return out.logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits0, grads0 = run()
    with ActivationStats(model) as acts:
        logits1, grads1 = run()
    logits2, grads2 = run()
    assert torch.equal(logits0, logits1) and torch.equal(logits0, logits2)
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
    assert acts.result().tokens() == 19
    gg = GradientGram(model, ["a"])
    with gg.domain("a"):
        _, grads3 = run()
    for n in grads0:
        assert torch.equal(grads0[n], grads3[n]), n


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_grad_modes_give_the_same_stats(mode):
    model = _qwen3()
    ids, mask = _batch(9, (12, 5))
    rec = Recorder(model)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    with ctx():
        acts = ActivationStats(model)  # built (and its buffers allocated) inside the mode
        with acts:
            out = model(ids, attention_mask=mask, labels=ids)
        if mode == "grad":
            out.loss.backward()
    rec.remove()
    _assert_matches(acts.result(), rec.stats([mask]))
    # buffers allocated under inference_mode keep accumulating outside it
    with torch.no_grad(), acts:
        model(ids, attention_mask=mask)
    assert acts.result().tokens() == 34


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_token_once(reentrant):
    """The forward re-run inside backward (gradient checkpointing) must not be counted again."""
    model = _qwen3().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids, mask = _batch(15, (12, 5))
    rec = Recorder(model)
    with ActivationStats(model) as acts:
        model(ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    rec.remove()
    rec.acts = {k: v[:1] for k, v in rec.acts.items()}  # the recorder saw the re-run too: keep the first forward
    _assert_matches(acts.result(), rec.stats([mask]))
    assert acts.result().tokens() == 17


def test_reentry_accumulates_and_reset_zeroes():
    model = _qwen3()
    ids, mask = _batch(10, (12, 3))
    acts = ActivationStats(model)
    for _ in range(3):
        with torch.no_grad(), acts:
            model(ids, attention_mask=mask)
    assert acts.result().tokens() == 45 and acts.calls == 3
    with pytest.raises(HookError, match="already attached"):
        with acts:
            acts.attach()
    _no_hooks(model)
    acts.reset()
    assert acts.result().tokens() == 0
    assert float(acts.result().stat("mlp", "mean_abs").abs().sum()) == 0.0


def test_hooks_removed_after_exit_and_exception():
    model = _qwen3()
    ids, mask = _batch(12, (12, 4))
    with torch.no_grad(), ActivationStats(model) as acts:
        assert model._forward_pre_hooks and model.model.layers[0].mlp.down_proj._forward_pre_hooks
        assert acts.active
        model(ids, attention_mask=mask)
    _no_hooks(model)
    assert not acts.active and acts._attn_mask is None
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), ActivationStats(model):
            model(ids, attention_mask=mask)
            raise RuntimeError("boom")
    _no_hooks(model)
    # an exception inside the model's forward
    with pytest.raises(Exception):
        with torch.no_grad(), ActivationStats(model) as acts:
            model(torch.full((1, 4), 10_000))  # token id out of the vocabulary
    _no_hooks(model)
    assert acts._attn_mask is None
    gg = GradientGram(model, ["a", "b"])
    with pytest.raises(RuntimeError, match="boom"):
        with gg.domain("a"):
            assert all(p._backward_hooks for p in model.parameters())
            model(ids, labels=ids).loss.backward()
            raise RuntimeError("boom")
    _no_hooks(model)
    with pytest.raises(HookError, match="do not nest"):
        with gg.domain("a"), gg.domain("b"):
            pass
    _no_hooks(model)


def _live_tensors():
    gc.collect()
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some deprecated module attributes warns
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor):
                    n += 1
            except Exception:  # noqa: BLE001 - objects that fail isinstance
                pass
    return n


def test_repeated_use_does_not_leak():
    model = _qwen3()
    ids, mask = _batch(13, (12, 6))

    def once():
        acts = ActivationStats(model)
        with torch.no_grad(), acts:
            model(ids, attention_mask=mask)
        acts.result()
        return weakref.ref(acts), [weakref.ref(t) for t in acts._stats.values()]

    once()
    before = _live_tensors()
    refs = [once() for _ in range(10)]
    after = _live_tensors()
    assert after - before <= 2, (before, after)
    gc.collect()
    assert all(r() is None for r, _ in refs)
    assert all(t() is None for _, ts in refs for t in ts)
    _no_hooks(model)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_after_attaching(backend):
    torch._dynamo.reset()
    model = _qwen3(layers=1)
    ids, mask = _batch(14, (12, 7))
    with torch.no_grad(), ActivationStats(model, threshold=0.05) as eager:
        model(ids, attention_mask=mask)
    acts = ActivationStats(model, threshold=0.05)
    with torch.no_grad(), acts:
        compiled = torch.compile(model, backend=backend)
        out = compiled(ids, attention_mask=mask)
        compiled(ids, attention_mask=mask)
    ref_logits = model(ids, attention_mask=mask).logits
    assert torch.allclose(out.logits, ref_logits, atol=1e-4)
    got, want = acts.result(), eager.result()
    assert got.tokens() == 2 * want.tokens() == 38
    for g in ("mlp", "attn"):
        for k in ("abs_sum", "sq_sum", "active", "tokens"):
            w = want.stat(g, k) * 2
            assert torch.allclose(got.stat(g, k), w, rtol=1e-4, atol=1e-2 if k == "active" else 1e-6), (g, k)
    _no_hooks(model)
    assert acts._attn_mask is None
    torch._dynamo.reset()


# ---- results --------------------------------------------------------------------------------------------------

def test_result_save_load_merge(tmp_path):
    model = _qwen3()
    out = []
    for dom, seed in (("code", 21), ("math", 22)):
        ids, mask = _batch(seed, (12, 10))
        with torch.no_grad(), ActivationStats(model, name=dom) as acts:
            model(ids, attention_mask=mask)
        out.append(acts.result())
    both = ActivationResult.merge(*out)
    assert both.names == ["code", "math"]
    with pytest.raises(HookError, match="say which"):
        both.stat("mlp")
    assert torch.equal(both.stat("mlp", "rms", "math"), out[1].stat("mlp", "rms"))
    both.save(str(tmp_path / "acts"))
    assert sorted(os.listdir(tmp_path / "acts")) == ["activations.json", "activations.safetensors"]
    back = ActivationResult.load(str(tmp_path / "acts"))
    assert back.names == both.names and set(back.arrays) == set(both.arrays)
    for k, v in both.arrays.items():
        assert torch.equal(back.arrays[k], v), k
        name, group, stat = k.split("/")  # the profile naming <name>/<group>/<stat>, [layers, units]
        assert stat in H.ACT_STATS and v.shape == (2, 96 if group == "mlp" else 4)
    assert torch.equal(back.select("code").top_units("mlp", 0.1), out[0].top_units("mlp", 0.1))
    assert torch.allclose(jaccard(back, back, "attn", 0.25, name_a="code", name_b="math"),
                          jaccard(out[0], out[1], "attn", 0.25))
    with pytest.raises(HookError, match="distinct names"):
        ActivationResult.merge(out[0], out[0])
    with pytest.raises(HookError, match="not a saved"):
        ActivationResult.load(str(tmp_path))


def test_bad_arguments():
    model = _qwen3()
    with pytest.raises(HookError, match="input axis"):
        ActivationStats(model, groups=("kv",))
    with pytest.raises(HookError, match="no group"):
        ActivationStats(model, layout=load_layout(None, {n: tuple(p.shape) for n, p in model.named_parameters()},
                                                    model.config.to_dict(), groups=("mlp",)), groups=("attn",))
    with pytest.raises(TypeError):
        ActivationStats(object())
    with pytest.raises(HookError, match="NaN"):
        ActivationStats(model, threshold=float("nan"))
    with pytest.raises(HookError, match="not one of"):
        GradientGram(model, ["a"]).accumulate("b")
    with pytest.raises(HookError, match="twice"):
        GradientGram(model, ["a", "a"])


# ---- GradientGram ----------------------------------------------------------------------------------------------

def _dense_grads(model, batches):
    """{param: summed gradient} (float64) of the batches, computed plainly."""
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for ids in batches:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                acc[n] += p.grad.double()
    model.zero_grad(set_to_none=True)
    return acc


def _cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("how", ["hooks", "accumulate", "mmap", "device_buffer"])
def test_gradient_gram_matches_dense(arch, how, tmp_path):
    model = MODELS[arch]().train()
    domains = ["code", "math", "qa"]
    g = torch.Generator().manual_seed(30)
    data = {d: [torch.randint(0, 128, (2, 10), generator=g) for _ in range(2)] for d in domains}
    gg = GradientGram(model, domains, storage=str(tmp_path / "store") if how == "mmap" else None,
                      device_buffer=how == "device_buffer")
    for d in domains:
        for ids in data[d]:
            if how == "accumulate":
                model.zero_grad(set_to_none=True)
                model(ids, labels=ids).loss.backward()
                gg.accumulate(d)
            else:
                model.zero_grad(set_to_none=True)  # hooks capture increments: stale .grad must not matter
                model(ids, labels=ids).loss.backward()  # leaves .grad from this batch in place
                with gg.domain(d):
                    model(ids, labels=ids).loss.backward()
    if how == "mmap":
        assert sorted(os.listdir(tmp_path / "store")) == ["code.f32", "math.f32", "qa.f32"]
    assert gg.stored_bytes == GradientGram.memory_bytes(model, 3)
    res = gg.result()
    dense = {d: _dense_grads(model, data[d]) for d in domains}
    names = [n for n, _ in model.named_parameters()]

    def flat(d, keys):
        return torch.cat([dense[d][k].reshape(-1) for k in keys])

    modules = ["", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp",
               "model.layers.0.self_attn", "model.embed_tokens", "model.norm"]
    for mod in modules:
        keys = [k for k in names if mod == "" or k == mod or k.startswith(mod + ".")]
        want = torch.tensor([[_cos(flat(a, keys), flat(b, keys)) for b in domains] for a in domains])
        assert torch.allclose(res.cosine(mod), want.double(), atol=2e-5), mod
        gw = torch.tensor([[float(flat(a, keys) @ flat(b, keys)) for b in domains] for a in domains])
        assert torch.allclose(res.gram(mod), gw.double(), rtol=1e-4, atol=1e-10), mod
    # per-unit cosines through the layout: MLP neuron j = gate row j, up row j, down column j
    p = "model.layers.1.mlp."

    def neuron(d):
        return torch.cat([dense[d][p + "gate_proj.weight"], dense[d][p + "up_proj.weight"],
                          dense[d][p + "down_proj.weight"].t()], 1)

    u, v = neuron("code"), neuron("qa")
    want = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))
    assert torch.allclose(res.unit_cosine("code", "qa", "mlp")[1], want, atol=2e-5)
    assert torch.allclose(res.unit_cosine("qa", "code", "mlp")[1], want, atol=2e-5)
    # heads: q rows and o columns of head h
    q = "model.layers.0.self_attn."

    def head(d):
        qw = dense[d][q + "q_proj.weight"].reshape(4, HEAD_DIM, -1).reshape(4, -1)
        ow = dense[d][q + "o_proj.weight"].t().reshape(4, HEAD_DIM, -1).reshape(4, -1)
        return torch.cat([qw, ow], 1)

    u, v = head("math"), head("code")
    want = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))
    assert torch.allclose(res.unit_cosine("math", "code", "attn")[0], want, atol=2e-5)
    assert res.unit_cosine("code", "math", "kv").shape == (2, 2)
    assert res.meta["batches"] == {d: 2 for d in domains}


def test_gradient_gram_many_domains_and_unfed_domain():
    # more domains than one unit_gram call takes (8): chunked pairs
    g = torch.Generator().manual_seed(40)
    ws = [torch.randn(6, 10, generator=g) for _ in range(11)]
    got = _unit_grams(ws, 0, 2, None)
    s = torch.stack([w.double().reshape(3, 2, 10).reshape(3, 20) for w in ws], 1)  # [U, n, 20]
    want = s @ s.transpose(1, 2)
    d = torch.diagonal(want, dim1=1, dim2=2).sqrt()
    assert ((got - want).abs() <= 1e-5 * d[:, :, None] * d[:, None, :]).all()
    model = _qwen3(layers=1).train()
    gg = GradientGram(model, ["a", "b", "never"])
    for d in ("a", "b"):
        with gg.domain(d):
            model(torch.randint(0, 128, (1, 8), generator=g), labels=torch.randint(0, 128, (1, 8),
                                                                                   generator=g)).loss.backward()
    c = gg.result().cosine()
    assert c[2].abs().sum() == 0 and c[:, 2].abs().sum() == 0 and abs(float(c[0, 0]) - 1) < 1e-9


def test_gradient_gram_save_load_and_plot(tmp_path):
    model = _llama().train()
    gg = GradientGram(model, ["code", "math", "qa"], device_buffer=True)
    g = torch.Generator().manual_seed(50)
    for d in gg.domains:
        with gg.domain(d):
            ids = torch.randint(0, 128, (2, 8), generator=g)
            model(ids, labels=ids).loss.backward()
    res = gg.result()
    res.save(str(tmp_path / "gg"))
    back = GramResult.load(str(tmp_path / "gg"))
    assert list(back.param_gram) == list(res.param_gram)
    assert torch.equal(back.cosine(), res.cosine())
    assert torch.equal(back.unit_cosine("code", "qa", "mlp"), res.unit_cosine("code", "qa", "mlp"))
    rows, cols, vals = res.table()
    assert rows[0] == "model" and cols == ["code|math", "code|qa", "math|qa"]
    assert rows[1:8] == [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                         "mlp.down_proj")]
    assert vals.shape == (1 + 2 * 7, 3)
    assert abs(float(vals[5, 1]) - float(res.cosine("model.layers.0.mlp.gate_proj")[0, 2])) < 1e-12
    pytest.importorskip("matplotlib")
    fig = res.plot(str(tmp_path / "heat.png"))
    assert os.path.getsize(tmp_path / "heat.png") > 1000
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_top_units_of_a_group_in_some_layers_only():
    """A layout whose group has units in some layers only (a MoE layout's dense MLP, its experts): the top fraction is
    of the units that exist, as in Profile.top_units, and the other layers' rows of zeros never count."""
    from lpt_kernels.layout import model_config, spec_group_layers

    model = _qwen3()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    spec = load_layout(None, shapes, model_config(model), groups=("mlp",)).to_spec()
    assert spec_group_layers(spec, "mlp") == [0, 1] and spec_group_layers(spec, "attn") is None
    spec["groups"]["mlp"] = {"1": [dict(m, tensor=m["tensor"].replace("{layer}", "1")) for m in spec["groups"]["mlp"]]}
    assert spec_group_layers(spec, "mlp") == [1]
    results = []
    for seed in (1, 2):
        ids, mask = _batch(seed, (9, 7))
        with torch.no_grad(), ActivationStats(model, layout=spec, groups=("mlp",)) as acts:
            model(ids, attention_mask=mask)
        results.append(acts.result())
    r = results[0]
    assert r.stat("mlp", "mean_abs").shape == (2, 96) and not r.stat("mlp", "mean_abs")[0].any()
    for frac in (0.1, 0.5):
        top = r.top_units("mlp", frac)
        assert int(top.sum()) == math.ceil(frac * 96) and not top[0].any()  # of layer 1's 96 units, not of 2 x 96
        want = top_mask(r.stat("mlp", "mean_abs")[1:], frac, False)
        assert torch.equal(top[1:], want)
    a, b = (x.top_units("mlp", 0.1) for x in results)
    assert float(jaccard(results[0], results[1], "mlp", 0.1)) == pytest.approx(int((a & b).sum()) / int((a | b).sum()))
    # a saved result keeps the rule (the layout spec travels in its meta)
    assert torch.equal(ActivationResult(meta=r.meta, arrays=dict(r.arrays)).top_units("mlp", 0.1), a)
