"""Real checkpoints for the tests: tiny transformers models built from configs, saved by save_pretrained with
several shards and an index, and a chain of sparse, small 'domain' updates of them."""
import os

import torch


def tiny_qwen3_config(layers=3, tie=True):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=tie,
                       max_position_embeddings=64)


def save_chain(root, n_domains=3, seed=0, dtype=torch.bfloat16, config=None, shard="60KB", frac=0.3, names=None):
    """Save base + n_domains checkpoints under root/{base,d1,...} (or root/{names...}: the first is the base);
    each domain changes a random `frac` of the rows of every weight by a small amount. Returns the list of
    directories and their state dicts (as saved)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = config or tiny_qwen3_config()
    model = Qwen3ForCausalLM(cfg).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    dirs, states = [], []
    names = list(names) if names else ["base"] + [f"d{i}" for i in range(1, n_domains + 1)]
    for i, name in enumerate(names):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    rows = torch.rand(p.shape[0], generator=gen) < frac
                    noise = torch.randn(p.shape, generator=gen) * 1e-2
                    noise[~rows] = 0
                    p.add_(noise.to(p.dtype))
        d = os.path.join(root, name)
        model.save_pretrained(d, max_shard_size=shard)
        dirs.append(d)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return dirs, states


MOE_SPEC = {
    "name": "qwen3_moe",
    "groups": {
        "mlp": [{"tensor": "model.layers.{layer}.mlp.gate_proj.weight", "axis": 0, "block": 1},
                {"tensor": "model.layers.{layer}.mlp.up_proj.weight", "axis": 0, "block": 1},
                {"tensor": "model.layers.{layer}.mlp.down_proj.weight", "axis": 1, "block": 1}],
        "expert.{expert}": [
            {"tensor": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", "axis": 0, "block": 1},
            {"tensor": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight", "axis": 0, "block": 1},
            {"tensor": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", "axis": 1, "block": 1}],
        "attn": [{"tensor": "model.layers.{layer}.self_attn.q_proj.weight", "axis": 0, "block": "head_dim"},
                 {"tensor": "model.layers.{layer}.self_attn.o_proj.weight", "axis": 1, "block": "head_dim"}],
        "kv": [{"tensor": "model.layers.{layer}.self_attn.k_proj.weight", "axis": 0, "block": "head_dim"},
               {"tensor": "model.layers.{layer}.self_attn.v_proj.weight", "axis": 0, "block": "head_dim"}],
    },
    "units": {"expert.{expert}": "moe_intermediate_size"},
}


def moe_state(seed=0, layers=4, experts=4, hidden=32, inter=48, moe_inter=8, heads=4, kv=2, head_dim=8, vocab=64):
    """A Qwen3-MoE-shaped state dict (bf16, per-expert 2-D tensors as the Hub checkpoints store them): a dense MLP in
    layer 0 (``mlp_only_layers=[0]``), `experts` experts with a router in layers 1.., and its config.json."""
    gen = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.05).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
          "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                   p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
                   p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
                   p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                   p + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
                   p + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16)})
        if i == 0:
            sd.update({p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                       p + "mlp.down_proj.weight": w(hidden, inter)})
        else:
            sd[p + "mlp.gate.weight"] = w(experts, hidden)
            for e in range(experts):
                q = f"{p}mlp.experts.{e}."
                sd.update({q + "gate_proj.weight": w(moe_inter, hidden), q + "up_proj.weight": w(moe_inter, hidden),
                           q + "down_proj.weight": w(hidden, moe_inter)})
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
              "intermediate_size": inter, "moe_intermediate_size": moe_inter, "num_experts": experts,
              "num_experts_per_tok": 2, "mlp_only_layers": [0], "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab,
              "tie_word_embeddings": False}
    return sd, config


def save_moe_chain(root, n_domains=2, seed=0, frac=0.5):
    """base + n_domains Qwen3-MoE-shaped checkpoints (safetensors + config.json) under root/{base,d1,...}, each
    domain changing a random `frac` of the rows of every weight; and the per-expert layout spec as root/moe.json.
    Returns (dirs, states, spec path)."""
    import json

    from safetensors.torch import save_file

    sd, config = moe_state(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dirs, states = [], []
    for i, name in enumerate(["base"] + [f"d{k}" for k in range(1, n_domains + 1)]):
        if i:
            for k, v in sd.items():
                rows = torch.rand(v.shape[0], generator=gen) < frac
                noise = torch.randn(v.shape, generator=gen) * 1e-2
                noise[~rows] = 0
                sd[k] = (v.float() + noise).to(v.dtype)
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
        dirs.append(d)
        states.append({k: v.clone() for k, v in sd.items()})
    spec = os.path.join(root, "moe.json")
    with open(spec, "w") as f:
        json.dump(MOE_SPEC, f)
    return dirs, states, spec
