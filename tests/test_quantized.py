"""Quantized checkpoints (issue 11, item 3): block-scaled FP8 (E4M3 codes with a weight_scale_inv per block, the
format of Qwen3's FP8 releases) is diffed against float64 dequantized truth; every other quantized or non-float
weight is refused with one line naming the tensor, its dtype and the checkpoint; rollback reads an FP8 source and
refuses an FP8 target."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from ckpt_factory import tiny_qwen3_config
from lpt_kernels.analysis import diff
from lpt_kernels.analysis.apply import RollbackError, rollback_checkpoint, rollback_model_
from lpt_kernels.analysis.selection import Selection
from lpt_kernels.checkpoint import Checkpoint, CheckpointError
from lpt_kernels.cli import main
from lpt_kernels.layout import detect_layout

E4M3 = torch.float8_e4m3fn
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w: torch.Tensor, block):
    """Block-scaled FP8 of a 2-D weight as the FP8 releases store it: per (bm x bn) block (partial at the edges)
    scale = amax / 448, codes = w / scale in E4M3, weight_scale_inv = scale (float32)."""
    rows, cols = w.shape
    bm, bn = block
    gr, gc = math.ceil(rows / bm), math.ceil(cols / bn)
    w = w.float()
    scale = torch.empty(gr, gc)
    codes = torch.empty(rows, cols, dtype=E4M3)
    for i in range(gr):
        for j in range(gc):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            s = float(blk.abs().max()) / 448.0 or 1.0
            scale[i, j] = s
            codes[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / s).clamp(-448, 448).to(E4M3)
    return codes, scale


def dequant64(codes, scale, block):
    bm, bn = block
    s = scale.double().repeat_interleave(bm, 0)[:codes.shape[0]].repeat_interleave(bn, 1)[:, :codes.shape[1]]
    return codes.double() * s


def _save(d, sd, config):
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    return d


def _quantized(sd, block):
    out = {}
    for k, v in sd.items():
        if any(k.endswith(f"{p}.weight") for p in PROJ):
            out[k], out[k + "_scale_inv"] = quantize(v, block)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module", params=[(32, 48), (128, 128)], ids=["32x48", "128x128"])
def fp8(request, tmp_path_factory):
    """bf16 checkpoints A (base) and B (trained), and their FP8 releases."""
    from transformers import Qwen3ForCausalLM

    block = request.param
    root = str(tmp_path_factory.mktemp("fp8"))
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config()).to(torch.bfloat16)
    cfg = model.config.to_dict()
    a = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(3)
    b = {k: (v.float() + torch.randn(v.shape, generator=gen) * 0.02).to(v.dtype) for k, v in a.items()}
    qcfg = dict(cfg, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                           "weight_block_size": list(block)})
    dirs = {"a": _save(f"{root}/a", a, cfg), "b": _save(f"{root}/b", b, cfg),
            "a8": _save(f"{root}/a8", _quantized(a, block), qcfg), "b8": _save(f"{root}/b8", _quantized(b, block),
                                                                                  qcfg)}
    return root, dirs, block, a, b


def _truth(path, name, block):
    with Checkpoint(path) as ck:
        t = ck.tensor(name)
        if t.dtype == E4M3:
            return dequant64(t, ck.tensor(name + "_scale_inv"), block)
        return t.double()


def _mlp_sq_norm(prof, delta, paths, block):
    """float64 per-neuron squared norm of the delta over gate row, up row, down column, from dequantized truth."""
    out = torch.zeros(3, 96, dtype=torch.float64)
    for layer in range(3):
        p = f"model.layers.{layer}.mlp."
        for n, ax in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
            d = _truth(paths[1], p + n + ".weight", block) - _truth(paths[0], p + n + ".weight", block)
            out[layer] += (d * d).sum(ax)
    return out


@pytest.mark.parametrize("pair", [("a", "b8"), ("a8", "b8"), ("a", "a8")])
def test_fp8_diffs_against_dequantized_truth(fp8, pair):
    """Issue example: the gate_proj update's squared norm came out as 4.1e6 (raw codes subtracted, scales diffed as
    weights) where the dequantized truth is 0.026."""
    root, dirs, block, a, b = fp8
    paths = [dirs[pair[0]], dirs[pair[1]]]
    prof = diff(paths, progress=False, labels=["x", "y"])
    want = _mlp_sq_norm(prof, "y", paths, block)
    got = prof.stat("y", "mlp", "sq_norm").double()
    assert torch.allclose(got, want, rtol=2e-5, atol=1e-12), (got - want).abs().max()
    assert not any(n.endswith("_scale_inv") for n in prof.tensors)  # the scales are not tensors of their own
    g = "model.layers.0.mlp.gate_proj.weight"
    full = (_truth(paths[1], g, block) - _truth(paths[0], g, block)).pow(2).sum()
    assert prof.tensors[g]["sq_norm"][0] == pytest.approx(float(full), rel=2e-5)
    assert "float8_e4m3fn" in prof.tensors[g]["dtypes"]


def test_fp8_release_diffs_via_the_cli(fp8, tmp_path):
    root, dirs, block, a, b = fp8
    assert main(["diff", dirs["a"], dirs["b8"], "--out", str(tmp_path / "p"), "-q"]) == 0


def _refused(tmp_path, other, sd, config, name, dtype_name):
    d = _save(str(tmp_path / "bad"), sd, config)
    with pytest.raises(CheckpointError) as ei:
        diff([other, d], progress=False, intersect=True)
    msg = str(ei.value)
    assert name in msg and dtype_name in msg and d in msg and "\n" not in msg, msg
    return d, msg


def test_every_other_quantized_or_non_float_weight_is_refused(fp8, tmp_path, capsys):
    root, dirs, block, a, b = fp8
    with Checkpoint(dirs["a"]) as ck:
        cfg = ck.config
    g = "model.layers.1.mlp.gate_proj.weight"
    base = {k: v for k, v in a.items()}
    cases = []
    # an int8 pack named like a weight (bitsandbytes int8), with no quantization_config
    cases.append((dict(base, **{g: torch.zeros(96, 64, dtype=torch.int8)}), cfg, g, "int8"))
    # GPTQ: qweight int32 packs, and a config naming the method
    q = {k: v for k, v in base.items() if k != g}
    q[g.replace(".weight", ".qweight")] = torch.zeros(8, 96, dtype=torch.int32)
    q[g.replace(".weight", ".scales")] = torch.ones(1, 96, dtype=torch.float16)
    cases.append((q, dict(cfg, quantization_config={"quant_method": "gptq", "bits": 4}),
                  g.replace(".weight", ".qweight"), "int32"))
    # bitsandbytes 4-bit: uint8 packed weight
    cases.append((dict(base, **{g: torch.zeros(3072, 1, dtype=torch.uint8)}),
                  dict(cfg, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}), g, "uint8"))
    # FP8 codes without a scale; FP8 with per-tensor scales (no weight_block_size); E5M2 codes
    codes, scale = quantize(base[g], (32, 32))
    fp8cfg = dict(cfg, quantization_config={"quant_method": "fp8", "weight_block_size": [32, 32]})
    cases.append((dict(base, **{g: codes}), fp8cfg, g, "float8_e4m3fn"))
    cases.append((dict(base, **{g: codes, g + "_scale_inv": scale}), dict(cfg, quantization_config={
        "quant_method": "fp8", "activation_scheme": "static"}), g, "float8_e4m3fn"))
    cases.append((dict(base, **{g: codes.float().to(torch.float8_e5m2), g + "_scale_inv": scale}), fp8cfg, g,
                  "float8_e5m2"))
    cases.append((dict(base, **{g: codes, g + "_scale_inv": scale}), cfg, g, "float8_e4m3fn"))  # no config at all
    for i, (sd, config, name, dtype_name) in enumerate(cases):
        d, msg = _refused(tmp_path / str(i), dirs["a"], sd, config, name, dtype_name)
        assert main(["diff", dirs["a"], d, "--out", str(tmp_path / f"p{i}"), "--intersect", "-q"]) == 1
        err = capsys.readouterr().err
        assert name in err and dtype_name in err, err
        assert not os.path.exists(tmp_path / f"p{i}")


def test_integer_buffers_are_left_out_not_refused(fp8, tmp_path):
    root, dirs, block, a, b = fp8
    with Checkpoint(dirs["a"]) as ck:
        cfg = ck.config
    d1 = _save(str(tmp_path / "x"), dict(a, **{"model.position_ids": torch.arange(8)}), cfg)
    d2 = _save(str(tmp_path / "y"), dict(b, **{"model.position_ids": torch.arange(8)}), cfg)
    prof = diff([d1, d2], progress=False)
    assert "int64 is not a float" in prof.meta["skipped"]["model.position_ids"]


def test_rollback_reads_an_fp8_source_and_refuses_an_fp8_target(fp8, tmp_path):
    root, dirs, block, a, b = fp8
    with Checkpoint(dirs["b"]) as ck:
        layout = detect_layout({n: ck.info(n).shape for n in ck.names}, ck.config)
    sel = Selection(layout, {"mlp": {1: [3, 40]}, "attn": {2: [1]}})
    out = str(tmp_path / "rolled")
    rollback_checkpoint(dirs["b"], dirs["a8"], sel, out)  # bf16 target, FP8 source (strict: the scales belong)
    g, o = "model.layers.1.mlp.gate_proj.weight", "model.layers.2.self_attn.o_proj.weight"
    with Checkpoint(out) as r, Checkpoint(dirs["b"]) as t:
        for name, idx, ax in ((g, [3, 40], 0), (o, list(range(16, 32)), 1)):
            want = _truth(dirs["a8"], name, block).to(torch.bfloat16)
            got = r.tensor(name)
            assert torch.equal(got.index_select(ax, torch.tensor(idx)), want.index_select(ax, torch.tensor(idx)))
            keep = [i for i in range(got.shape[ax]) if i not in idx]
            assert torch.equal(got.index_select(ax, torch.tensor(keep)), t.tensor(name).index_select(
                ax, torch.tensor(keep)))
    # live, from the FP8 checkpoint into a state dict
    state = {k: v.clone() for k, v in b.items()}
    rollback_model_(state, dirs["a8"], sel)
    want = _truth(dirs["a8"], g, block).to(torch.bfloat16)
    assert torch.equal(state[g][[3, 40]], want[[3, 40]])
    # an FP8 target is refused, before anything is written
    with pytest.raises(RollbackError, match="block-scaled FP8"):
        rollback_checkpoint(dirs["b8"], dirs["a"], sel, str(tmp_path / "no"))
    assert not os.path.exists(tmp_path / "no")
    with Checkpoint(dirs["b8"]) as ck:
        fp8_state = {n: ck.tensor(n).clone() for n in ck.names}
    with pytest.raises(RollbackError, match="block-scaled FP8"):
        rollback_model_(fp8_state, dirs["a"], sel)
