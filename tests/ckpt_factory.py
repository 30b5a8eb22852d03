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
