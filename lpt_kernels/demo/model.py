"""The demo's tiny Qwen3, batching of prompts, batched decoding (greedy or sampled) and evaluation.

Decoding is a fixed, short loop over the answer tokens with the model's KV cache (answers are 2-3 tokens), not
``model.generate``: for a model this small the generic generation machinery costs more than the model itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from lpt_kernels.demo.domains import ANSWER_LEN, DIGIT_IDS, DOMAINS, PAD_ID, VOCAB, Example, encode, reward


@dataclass(frozen=True)
class ModelSize:
    layers: int = 4
    hidden: int = 128
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32


def build_model(size: ModelSize, seed: int, device: str = "cpu"):
    """A freshly initialised ``Qwen3ForCausalLM`` from a ``Qwen3Config`` (GQA, tied embeddings, eager attention:
    the fastest for sequences of ~10 tokens)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=len(VOCAB), hidden_size=size.hidden, intermediate_size=size.intermediate,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.kv_heads, head_dim=size.head_dim, tie_word_embeddings=True,
                      max_position_embeddings=32, rope_theta=10000.0, pad_token_id=PAD_ID,
                      bos_token_id=None, eos_token_id=VOCAB.index("<eos>"))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(device)
    model.generation_config.pad_token_id = PAD_ID
    return model


def collate(seqs: Sequence[Sequence[int]], device) -> Dict[str, torch.Tensor]:
    """Left-pad token id lists: ``input_ids``, ``attention_mask`` and ``position_ids`` (0 at each first real token)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, n - len(s):] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


_DIGIT_OF = torch.full((len(VOCAB),), -1, dtype=torch.long)
_DIGIT_OF[torch.tensor(DIGIT_IDS)] = torch.arange(10)


def digits_of(ids: torch.Tensor) -> torch.Tensor:
    """Token ids -> digit values (-1 for any other token)."""
    return _DIGIT_OF.to(ids.device)[ids]


def _cache_arg(model) -> str:
    """The name of the KV-cache argument (``cache`` from transformers 5.2x, ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


@torch.no_grad()
def decode(model, examples: Sequence[Example], steps: int, temperature: float = 0.0,
           generator: Optional[torch.Generator] = None, repeats: int = 1) -> torch.Tensor:
    """Answer ``steps`` tokens for each prompt, ``repeats`` times (greedy when ``temperature`` is 0, else sampled):
    ``[len(examples) * repeats, steps]`` token ids, prompt-major. A prompt is run through the model once, whatever
    ``repeats`` is: its KV cache is repeated for the sampled continuations (GRPO's group shares its prompt)."""
    device = next(model.parameters()).device
    batch = collate([encode(ex.prompt) for ex in examples], device)
    mask, pos = batch["attention_mask"], batch["position_ids"]
    out = model(**batch, use_cache=True)
    cache, logits = _cache_of(out), out.logits[:, -1]
    answer = []
    for t in range(steps):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, -1).cpu()
            nxt = torch.multinomial(probs, repeats if t == 0 else 1, replacement=True, generator=generator)
            nxt = nxt.reshape(-1, 1).to(device)
        else:
            nxt = logits.argmax(-1, keepdim=True)
            if t == 0 and repeats > 1:
                nxt = nxt.repeat_interleave(repeats, 0)
        answer.append(nxt)
        if t + 1 == steps:
            break
        if t == 0 and repeats > 1:
            idx = torch.arange(len(examples), device=device).repeat_interleave(repeats)
            cache.reorder_cache(idx)
            mask, pos = mask[idx], pos[idx]
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **{_cache_arg(model): cache})
        cache, logits = _cache_of(out), out.logits[:, -1]
    return torch.cat(answer, 1)


def score(examples: Sequence[Example], answers: torch.Tensor) -> List[float]:
    """Rewards of decoded answers ([B, steps] ids; each domain reads its first ANSWER_LEN tokens)."""
    vals = digits_of(answers.cpu()).tolist()
    return [reward(ex, v[:ANSWER_LEN[ex.domain]]) for ex, v in zip(examples, vals)]


def evaluate(model, eval_sets: Dict[str, List[Example]], batch: int = 1024) -> Dict[str, float]:
    """Greedy accuracy (mean reward) per domain in percent, on the held-out sets."""
    was_training = model.training
    model.eval()
    out = {}
    for d in DOMAINS:
        exs = eval_sets[d]
        total = 0.0
        for i in range(0, len(exs), batch):
            part = exs[i:i + batch]
            total += sum(score(part, decode(model, part, ANSWER_LEN[d])))
        out[d] = 100.0 * total / len(exs)
    model.train(was_training)
    return out
