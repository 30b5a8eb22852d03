"""Layouts (docs/layouts.md) against real transformers models built from tiny configs: names, shapes, config."""
import json
from pathlib import Path

import pytest

from lpt_kernels.layout import Layout, LayoutError, Member, detect_layout, layout_from_spec, load_layout

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
BERT_SPEC = ROOT / "examples" / "layouts" / "bert.json"
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def _model(family, **overrides):
    """(shapes, config dict) of a freshly built tiny model of this family."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    model = model_cls(cfg_cls(**{**TINY, **overrides}))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, model.config.to_dict()


@pytest.fixture(scope="module")
def models():
    return {f: _model(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                  vocab_size=100, max_position_embeddings=32)
    model = transformers.BertForMaskedLM(cfg)  # keys "bert.encoder.layer.N..." as in Hub BERT checkpoints
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model.config.to_dict()


def _check_builtin(layout, family, shapes, *, head_dim=16, inter=96, heads=4, kv=2, layers=2):
    assert layout.name == family
    assert layout.num_layers == layers
    assert layout.units == {"mlp": inter, "attn": heads, "kv": kv}
    p = "model.layers.{}."
    for i in range(layers):
        assert layout.members("mlp")[i] == [Member(p.format(i) + "mlp.gate_proj.weight", 0, 1),
                                            Member(p.format(i) + "mlp.up_proj.weight", 0, 1),
                                            Member(p.format(i) + "mlp.down_proj.weight", 1, 1)]
        assert layout.members("attn")[i] == [Member(p.format(i) + "self_attn.q_proj.weight", 0, head_dim),
                                             Member(p.format(i) + "self_attn.o_proj.weight", 1, head_dim)]
        assert layout.members("kv")[i] == [Member(p.format(i) + "self_attn.k_proj.weight", 0, head_dim),
                                           Member(p.format(i) + "self_attn.v_proj.weight", 0, head_dim)]
    for group, per_layer in layout.groups.items():
        assert sorted(per_layer) == list(range(layers))
        for members in per_layer.values():
            for m in members:
                assert shapes[m.tensor][m.axis] // m.block == layout.units[group]
                assert shapes[m.tensor][m.axis] % m.block == 0
    layout.validate(shapes)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detect_from_config(models, family):
    shapes, config = models[family]
    layout = detect_layout(list(shapes), config)
    _check_builtin(layout, family, shapes)
    assert layout.tied == {}  # tie_word_embeddings is False by default
    # biases (Qwen2's q/k/v) and norms (Qwen3's q_norm/k_norm) are not members: units are slices of 2-D weights
    for name in shapes:
        if name.endswith(".bias") or "norm" in name:
            assert layout.member_of(name) == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detect_from_architectures_and_names(models, family):
    shapes, config = models[family]
    arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM"}[family]
    by_arch = {k: v for k, v in config.items() if k != "model_type"} | {"architectures": [arch]}
    _check_builtin(detect_layout(list(shapes), by_arch), family, shapes)
    # no model_type, no architectures: the family is told from the names (Mistral's look like Llama's)
    anon = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    _check_builtin(detect_layout(list(shapes), anon), "llama" if family == "mistral" else family, shapes)


def test_qwen3_head_dim_from_config_not_hidden_over_heads():
    shapes, config = _model("qwen3", head_dim=32)  # like Qwen3-4B: head_dim != hidden_size // num_attention_heads
    layout = detect_layout(shapes, config)
    _check_builtin(layout, "qwen3", shapes, head_dim=32)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 64)


def test_without_config(models):
    shapes, _ = models["qwen3"]
    layout = detect_layout(shapes, None)  # shapes given: Qwen3's head_dim is read off q_norm
    _check_builtin(layout, "qwen3", shapes)
    shapes, _ = models["llama"]
    with pytest.raises(LayoutError, match="config.json"):
        detect_layout(shapes, None)  # head_dim is ambiguous from shapes
    mlp = detect_layout(list(shapes), None, groups=("mlp",))  # names only: MLP units come at validate time
    assert mlp.units == {}
    mlp.validate(shapes)
    assert mlp.units == {"mlp": 96} and mlp.num_layers == 2


def test_only_requested_groups(models):
    shapes, config = models["qwen2"]
    layout = detect_layout(list(shapes), config, groups=("mlp",))
    assert set(layout.groups) == {"mlp"} and set(layout.units) == {"mlp"}
    assert layout.member_of("model.layers.0.self_attn.q_proj.weight") == []
    layout = detect_layout(list(shapes), config, groups=("attn", "kv"))
    assert set(layout.groups) == {"attn", "kv"}
    with pytest.raises(LayoutError, match="mlp"):
        layout.members("mlp")
    with pytest.raises(LayoutError, match="unknown group 'ffn'"):
        detect_layout(list(shapes), config, groups=("ffn",))
    assert set(load_layout(None, shapes, config, groups=("kv",)).groups) == {"kv"}
    assert set(load_layout("qwen2", shapes, config, groups=("mlp",)).groups) == {"mlp"}


def test_member_of(models):
    shapes, config = models["llama"]
    layout = detect_layout(list(shapes), config)
    [(group, layer, member)] = layout.member_of("model.layers.1.mlp.down_proj.weight")
    assert (group, layer, member) == ("mlp", 1, Member("model.layers.1.mlp.down_proj.weight", 1, 1))
    assert layout.member_of("model.embed_tokens.weight") == []


@pytest.mark.parametrize("key,value,tensor", [
    ("intermediate_size", 80, "model.layers.0.mlp.gate_proj.weight"),
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight"),
    ("num_attention_heads", 2, "model.layers.0.self_attn.q_proj.weight"),
])
def test_mismatched_config_names_the_tensor(models, key, value, tensor):
    shapes, config = models["qwen3"]
    bad = dict(config, **{key: value})
    layout = detect_layout(list(shapes), bad)
    with pytest.raises(LayoutError, match=tensor.replace(".", r"\.")) as e:
        layout.validate(shapes)
    assert "\n" not in str(e.value)
    with pytest.raises(LayoutError, match=tensor.replace(".", r"\.")):
        detect_layout(shapes, bad)  # with shapes, detect validates on the spot


def test_validate_errors(models):
    shapes, config = models["llama"]
    layout = detect_layout(list(shapes), config)
    gone = {k: v for k, v in shapes.items() if k != "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(LayoutError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight is missing"):
        layout.validate(gone)
    flat = dict(shapes, **{"model.layers.0.mlp.up_proj.weight": (96 * 64,)})
    with pytest.raises(LayoutError, match=r"up_proj\.weight is not 2-D"):
        layout.validate(flat)
    odd = dict(shapes, **{"model.layers.0.self_attn.o_proj.weight": (64, 60)})
    with pytest.raises(LayoutError, match=r"o_proj\.weight axis 1 has size 60, not divisible by block 16"):
        layout.validate(odd)
    # no unit count from a config: members of a layer must agree among themselves
    mlp = detect_layout(list(shapes), None, groups=("mlp",))
    skew = dict(shapes, **{"model.layers.0.mlp.down_proj.weight": (64, 97)})
    with pytest.raises(LayoutError, match=r"down_proj\.weight has 97 units .*member model\.layers\.0\.mlp\.gate_"):
        mlp.validate(skew)
    assert mlp.units == {}  # nothing filled in by a failed validate
    with pytest.raises(LayoutError, match="layer 2 but config.json has num_hidden_layers=2"):
        detect_layout(list(shapes) + ["model.layers.2.mlp.up_proj.weight"], config)
    # a layer present with a member missing is an error; a layer absent altogether (names cut to the layers two
    # checkpoints share) is simply not in the layout
    first = {k: v for k, v in shapes.items() if ".layers.1." not in k}
    cut = detect_layout(first, config)
    assert cut.num_layers == 1 and all(sorted(ls) == [0] for ls in cut.groups.values())


def test_tied_embeddings():
    shapes, config = _model("qwen3", tie_word_embeddings=True)
    assert "lm_head.weight" in shapes and "model.embed_tokens.weight" in shapes
    layout = detect_layout(list(shapes), config)
    assert layout.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    saved = [n for n in shapes if n != "lm_head.weight"]  # save_pretrained keeps only one copy
    assert detect_layout(saved, config).tied == {}


def test_unknown_architecture(bert):
    shapes, config = bert
    for cfg in (config, None):
        with pytest.raises(LayoutError, match="--layout") as e:
            detect_layout(list(shapes), cfg)
        assert "docs/layouts.md" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LayoutError, match="--layout"):
        load_layout(None, list(shapes), config)
    # a config naming another architecture is not overridden by Llama-like names...
    qshapes, qconfig = _model("llama")
    with pytest.raises(LayoutError, match="'gemma'.*--layout"):
        detect_layout(list(qshapes), dict(qconfig, model_type="gemma", architectures=["GemmaForCausalLM"]))
    # ...unless the user says so
    forced = load_layout("llama", qshapes, dict(qconfig, model_type="gemma"))
    _check_builtin(forced, "llama", qshapes)


def test_bert_spec_file(bert):
    shapes, config = bert
    layout = layout_from_spec(str(BERT_SPEC), list(shapes), config)
    assert layout.name == "bert" and layout.num_layers == 2
    assert layout.units == {}  # none in the spec: filled from the shapes
    layout.validate(shapes)
    assert layout.units == {"mlp": 96, "attn": 4}
    p = "bert.encoder.layer.1."
    assert layout.members("mlp")[1] == [Member(p + "intermediate.dense.weight", 0, 1),
                                        Member(p + "output.dense.weight", 1, 1)]
    assert layout.members("attn")[1] == [Member(p + "attention.self.query.weight", 0, 16),
                                         Member(p + "attention.self.key.weight", 0, 16),
                                         Member(p + "attention.self.value.weight", 0, 16),
                                         Member(p + "attention.output.dense.weight", 1, 16)]
    assert layout.tied == {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    # load_layout takes the path; with shapes the layout comes back validated
    same = load_layout(BERT_SPEC, shapes, config)
    assert same == layout
    # blocks from the config: "head_dim" needs one
    with pytest.raises(LayoutError, match="config"):
        layout_from_spec(str(BERT_SPEC), list(shapes), None)
    # units named as config keys are checked against the shapes
    spec = json.loads(BERT_SPEC.read_text())
    spec["units"] = {"mlp": "intermediate_size", "attn": "num_attention_heads"}
    checked = layout_from_spec(spec, list(shapes), dict(config, intermediate_size=128))
    with pytest.raises(LayoutError, match=r"intermediate\.dense\.weight has 96 units"):
        checked.validate(shapes)


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_to_spec_round_trip(models, family):
    shapes, config = models[family]
    layout = detect_layout(shapes, config)
    spec = json.loads(json.dumps(layout.to_spec()))
    assert spec["groups"]["mlp"][0] == {"tensor": "model.layers.{layer}.mlp.gate_proj.weight", "axis": 0, "block": 1}
    back = layout_from_spec(spec, list(shapes))
    assert back == layout


def test_to_spec_round_trip_bert_and_explicit(bert, tmp_path):
    shapes, config = bert
    layout = layout_from_spec(BERT_SPEC, shapes, config)
    path = tmp_path / "round.json"
    path.write_text(json.dumps(layout.to_spec()))
    assert layout_from_spec(str(path), list(shapes)) == layout  # blocks written as ints: no config needed
    # a hand-made layout whose groups do not follow one pattern goes layer by layer
    odd = Layout(name="odd", groups={"g": {0: [Member("bert.encoder.layer.0.intermediate.dense.weight", 0, 1)],
                                           1: [Member("cls.predictions.transform.dense.weight", 0, 1)]}},
                 units={"g": 96}, num_layers=2)
    spec = odd.to_spec()
    assert spec["groups"]["g"] == {"0": [{"tensor": "bert.encoder.layer.0.intermediate.dense.weight", "axis": 0,
                                          "block": 1}],
                                   "1": [{"tensor": "cls.predictions.transform.dense.weight", "axis": 0, "block": 1}]}
    assert layout_from_spec(json.loads(json.dumps(spec)), list(shapes)) == odd


def _moe_shapes(layers=2, experts=3, hidden=8, inter=6, dense_first=True):
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        if dense_first and i == 0:
            shapes |= {p + "mlp.gate_proj.weight": (16, hidden), p + "mlp.up_proj.weight": (16, hidden),
                       p + "mlp.down_proj.weight": (hidden, 16)}
            continue
        shapes[p + "mlp.gate.weight"] = (experts, hidden)
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            shapes |= {q + "gate_proj.weight": (inter, hidden), q + "up_proj.weight": (inter, hidden),
                       q + "down_proj.weight": (hidden, inter)}
    return shapes


def test_moe_spec_group_per_expert():
    shapes = _moe_shapes(layers=3, experts=3)
    spec = {"name": "moe", "groups": {
        "mlp": [{"tensor": "model.layers.{layer}.mlp.gate_proj.weight", "axis": 0},
                {"tensor": "model.layers.{layer}.mlp.up_proj.weight", "axis": 0},
                {"tensor": "model.layers.{layer}.mlp.down_proj.weight", "axis": 1}],
        "expert.{expert}": [{"tensor": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", "axis": 0},
                            {"tensor": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight", "axis": 0},
                            {"tensor": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", "axis": 1}]},
        "units": {"expert.{expert}": "moe_intermediate_size"}}
    layout = layout_from_spec(spec, shapes, {"moe_intermediate_size": 6})
    assert list(layout.groups) == ["mlp", "expert.0", "expert.1", "expert.2"]
    assert sorted(layout.members("mlp")) == [0]  # no "layers" key: each group lives where its tensors are
    assert sorted(layout.members("expert.2")) == [1, 2]
    assert layout.units == {"mlp": 16, "expert.0": 6, "expert.1": 6, "expert.2": 6}
    assert layout.members("expert.1")[2][2] == Member("model.layers.2.mlp.experts.1.down_proj.weight", 1, 1)
    assert layout.num_layers == 3
    assert layout_from_spec(json.loads(json.dumps(layout.to_spec())), list(shapes)) == layout


def test_spec_errors(bert, tmp_path):
    shapes, config = bert
    names = list(shapes)
    base = json.loads(BERT_SPEC.read_text())
    with pytest.raises(LayoutError, match="unknown key 'group'"):
        layout_from_spec({"group": {}}, names)
    with pytest.raises(LayoutError, match="no tensor name matches"):
        layout_from_spec({"groups": {"mlp": [{"tensor": "bert.encoder.layers.{layer}.x.weight", "axis": 0}]}}, names)
    with pytest.raises(LayoutError, match="has no {layer}"):
        layout_from_spec({"groups": {"emb": [{"tensor": "bert.embeddings.word_embeddings.weight", "axis": 0}]}},
                         names)
    with pytest.raises(LayoutError, match="axis must be 0 or 1"):
        layout_from_spec({"groups": {"mlp": [{"tensor": "bert.encoder.layer.{layer}.output.dense.weight",
                                              "axis": 2}]}}, names)
    with pytest.raises(LayoutError, match="'nope'"):
        layout_from_spec(dict(base, groups={"mlp": [{"tensor": "bert.encoder.layer.{layer}.output.dense.weight",
                                                     "axis": 1, "block": "nope"}]}), names, config)
    with pytest.raises(LayoutError, match="no tensor name begins with"):
        layout_from_spec(dict(base, layers="encoder.layer.{layer}."), names, config)
    with pytest.raises(LayoutError, match="placeholders"):
        layout_from_spec({"groups": {"mlp": [{"tensor": "bert.encoder.layer.{layer}.{x}.dense.weight",
                                              "axis": 0}]}}, names)
    with pytest.raises(LayoutError, match="no such file|cannot read"):
        layout_from_spec(str(tmp_path / "missing.json"), names)
    broken = tmp_path / "broken.json"
    broken.write_text('{"groups": ')
    with pytest.raises(LayoutError, match="invalid JSON"):
        load_layout(str(broken), names, config)
    # "layers" given: every group must exist in all of them, so a missing layer is caught at validate time
    fixed = layout_from_spec(dict(base, layers=3), names, config)
    with pytest.raises(LayoutError, match=r"bert\.encoder\.layer\.2\.intermediate\.dense\.weight is missing"):
        fixed.validate(shapes)
