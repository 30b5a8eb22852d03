"""Training of the demo model: a short supervised warm-up on a mixture of the four domains (the stand-in for
pre-training: a base with signal on every domain), then GRPO stages, one domain at a time.

GRPO as in the paper: per prompt a group of G sampled answers, rewards normalised within the group
(``(r - mean) / (std + eps)``), the token-level policy-gradient loss averaged over each answer, no KL term, no
reference model. Each rollout batch is used for exactly one optimizer step (fully on-policy), so the PPO ratio is 1
and its clipping never binds; the loss below is that clipped-ratio objective written out, whose gradient is
``-A * grad log pi``. Groups whose rewards are all equal have zero advantage and add nothing to the gradient; they
are left out of the backward pass (the loss is still divided by the whole batch, so the gradient is unchanged).

A training loop's "after optimizer step" point is the ``on_step`` callback (step index, model): that is where a live
tracker (lpt_kernels.train's delta tracking, the refresh monitor) plugs in.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from lpt_kernels.demo.domains import ANSWER_LEN, DOMAINS, Domains, corpus_answer, encode, reference_answer
from lpt_kernels.demo.model import collate, decode, score


@dataclass(frozen=True)
class GRPOConfig:
    lr: float = 1e-3
    group: int = 8            # G sampled answers per prompt
    prompts: int = 32         # prompts per step
    temperature: float = 1.0
    eps: float = 1e-6         # in the std of the group normalisation


def _optimizer(model, lr: float) -> torch.optim.Optimizer:
    # No weight decay: a parameter the loss does not reach stays exactly where it is (update sparsity is measured).
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def warmup(model, domains: Domains, steps: int, batch: int, lr: float, seed: int,
           mix: Optional[Dict[str, float]] = None, quality: Optional[Dict[str, float]] = None,
           sloppy_from: float = 0.0, progress=None) -> List[float]:
    """Supervised next-token training on the answers of a mixture of the four domains; returns the losses."""
    rng = random.Random(f"warmup-{seed}")
    opt = _optimizer(model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 10, 1.0 - 0.9 * s / steps))
    mix = mix or {d: 1.0 for d in DOMAINS}
    names, weights = list(mix), [mix[d] for d in mix]
    model.train()
    losses = []
    for step in range(steps):
        exs = [domains.sample(d, rng, 1)[0] for d in rng.choices(names, weights, k=batch)]
        seqs, ans_len = [], []
        for ex in exs:
            ans = corpus_answer(ex, rng, quality.get(ex.domain, 1.0), domains.facts) \
                if quality and step >= sloppy_from * steps else reference_answer(ex, rng)
            seqs.append(encode(ex.prompt) + [encode([str(a)])[0] for a in ans])
            ans_len.append(len(ans))
        b = collate(seqs, next(model.parameters()).device)
        logits = model(**b).logits[:, :-1].float()
        target = b["input_ids"][:, 1:]
        n = target.shape[1]
        # loss on the answer tokens only (the last ans_len positions of each left-padded row)
        keep = torch.zeros_like(target, dtype=torch.bool)
        for i, k in enumerate(ans_len):
            keep[i, n - k:] = True
        loss = torch.nn.functional.cross_entropy(logits[keep], target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    return losses


def grpo_stage(model, domains: Domains, domain: str, steps: int, cfg: GRPOConfig, seed: int,
               on_step: Optional[Callable[[int, torch.nn.Module], None]] = None, progress=None) -> List[dict]:
    """GRPO on one domain for ``steps`` optimizer steps; returns per-step logs (mean reward, kept groups)."""
    rng = random.Random(f"grpo-{domain}-{seed}")
    gen = torch.Generator().manual_seed(int(rng.randrange(2 ** 31)))
    opt = _optimizer(model, cfg.lr)
    length = ANSWER_LEN[domain]
    device = next(model.parameters()).device
    logs = []
    for step in range(steps):
        prompts = domains.sample(domain, rng, cfg.prompts)
        group = [ex for ex in prompts for _ in range(cfg.group)]
        model.eval()
        answers = decode(model, prompts, length, cfg.temperature, gen, repeats=cfg.group)  # [P*G, length]
        r = torch.tensor(score(group, answers), dtype=torch.float32).view(cfg.prompts, cfg.group)
        adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + cfg.eps)
        live = (r.std(1) > 0).repeat_interleave(cfg.group)  # groups with any signal
        adv = adv.reshape(-1)
        model.train()
        if live.any():
            idx = live.nonzero().squeeze(1)
            ans = answers.cpu()[idx].tolist()
            b = collate([encode(group[i].prompt) + a for i, a in zip(idx.tolist(), ans)], device)
            seq = b["input_ids"]
            logits = model(**b).logits[:, -length - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, seq[:, -length:, None]).squeeze(-1)  # [n, length]
            ratio = torch.exp(logp - logp.detach())  # 1 in value, grad log pi in gradient (one step per batch)
            a = adv[idx].to(device)[:, None]
            per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 0.8, 1.28) * a)
            loss = per_token.mean(1).sum() / len(group)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_step is not None:
            on_step(step, model)
        logs.append({"step": step, "reward": float(r.mean()), "live_groups": int(live.sum()) // cfg.group})
        if progress is not None:
            progress.update(1)
    model.eval()
    return logs
