"""Synthesise a chain of Qwen3-4B-shaped checkpoints (base -> code -> math -> qa -> cw) for the `lpt diff` benchmark.

    python benchmarks/synth_checkpoints.py OUT_DIR [--layers N] [--domains 4] [--dtype bf16|fp32] [--seed 0]
                                                   [--shard-gb 4] [--force] [--threads 1]

writes OUT_DIR/{base,code,math,qa,cw} as Hugging Face directories: ``config.json`` (a valid Qwen3 config:
model_type qwen3, Qwen3ForCausalLM, num_hidden_layers N, tied embeddings), ``model-0000i-of-0000n.safetensors`` shards
written with ``safetensors.torch.save_file`` (one call per shard, at most --shard-gb each, at least 2 shards) and
``model.safetensors.index.json``. Every tensor has the real Qwen3-4B shape: hidden 2560, intermediate 9728, 32 query
heads and 8 KV heads of head_dim 128 (q_norm / k_norm [128]), vocab 151936, tied embeddings (no lm_head), input and
post-attention RMSNorm weights [2560] and the final norm. The full 36 layers are 8.05 GB in bf16; --layers 8 gives
2.40 GB per checkpoint (the embedding alone is 0.78 GB).

The updates are sparse, small and concentrated, like the GRPO updates of the paper (77.6% of parameters unchanged
after one domain, 73.4% after four):

- every tensor has a fixed "plastic" set of elements P (the same for every domain): ~30% of its units (rows of
  gate/up_proj and of the embedding, columns of down_proj, heads of q/k/v/o_proj, elements of the norms) are "hot"
  and hold P at a density drawn from U(0.6, 1.0); the other units hold it at density 0.04 (~27% of all parameters);
- domain d changes each element of P with a probability q[d, unit] ~ U(0.7, 0.98) drawn per unit and domain (so the
  top-changed neurons of two domains overlap, but not completely), by a relative step |dw|/|w| log-uniform in
  [1e-3, 1e-2] (fp32) or [4e-3, 1.2e-2] (bf16: a relative change below half a bf16 ulp, 2^-9..2^-8, rounds back to
  the same value, so the smallest representable bf16 changes are 1-3 ulps), with a random sign;
- elements outside P never change. One domain leaves ~77% of the parameters exactly unchanged; base -> cw (four
  domains) ~73%.

Generation streams: one shard of one checkpoint is in memory at a time (the base shard is generated, saved, then
updated in place domain after domain, each version saved as that domain's shard), and the per-element work runs on
chunks of <= 4M elements. Randomness comes from pools (a few 16M-element tensors drawn once from a seeded
torch.Generator) read at seeded offsets per (tensor, chunk, purpose), which keeps it fast on 2 cores: the same
--seed always gives the same bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch
from safetensors.torch import save_file

DOMAINS = ("code", "math", "qa", "cw", "d5", "d6", "d7")

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2560, 9728, 32, 8, 128, 151936
HOT_FRAC, HOT_DENS, COLD_DENS = 0.30, (0.6, 1.0), 0.07
Q_RANGE = (0.55, 1.0)
REL = {"bf16": (4e-3, 1.2e-2), "fp32": (1e-3, 1e-2)}
CHUNK = 1 << 22          # elements per work chunk
POOL = 1 << 24           # distinct offsets into a pool


def qwen3_config(n_layers: int, dtype: str) -> dict:
    """The config.json of Qwen3-4B with `n_layers` layers (what transformers' Qwen3Config writes, plus the
    torch_dtype key older readers look for)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "layer_types": ["full_attention"] * n_layers,
        "max_position_embeddings": 40960,
        "max_window_layers": n_layers,
        "model_type": "qwen3",
        "num_attention_heads": HEADS,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "dtype": "bfloat16" if dtype == "bf16" else "float32",
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }


def tensor_specs(n_layers: int):
    """(name, shape, unit axis, unit block, kind) in Hugging Face state_dict order. The unit axis/block say along which
    axis the hot/cold units of the update pattern lie (rows of gate/up, columns of down, heads of the attention)."""
    specs = [("model.embed_tokens.weight", (VOCAB, HIDDEN), 0, 1, "embed")]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (HIDDEN,), 0, 1, "norm"),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER), 1, 1, "matrix"),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN), 0, 1, "matrix"),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN), 0, 1, "matrix"),
            (p + "post_attention_layernorm.weight", (HIDDEN,), 0, 1, "norm"),
            (p + "self_attn.k_norm.weight", (HEAD_DIM,), 0, 1, "norm"),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), 0, HEAD_DIM, "matrix"),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), 1, HEAD_DIM, "matrix"),
            (p + "self_attn.q_norm.weight", (HEAD_DIM,), 0, 1, "norm"),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), 0, HEAD_DIM, "matrix"),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), 0, HEAD_DIM, "matrix"),
        ]
    specs.append(("model.norm.weight", (HIDDEN,), 0, 1, "norm"))
    return specs


def plan_shards(specs, itemsize: int, shard_bytes: float):
    """Greedy HF-style sharding in state_dict order: at least 2 shards, each at most ~shard_bytes."""
    sizes = [math.prod(s[1]) * itemsize for s in specs]
    total = sum(sizes)
    n = max(2, math.ceil(total / shard_bytes))
    target = total / n
    shards, cur, cur_bytes = [], [], 0
    for spec, size in zip(specs, sizes):
        if cur and cur_bytes + size > target * 1.02 and len(shards) < n - 1:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += size
    shards.append(cur)
    return shards, total


class Pools:
    """Seeded random pools, sliced at seeded offsets: cheap, reproducible randomness for billions of elements."""

    def __init__(self, seed: int, dtype: torch.dtype, rel):
        g = torch.Generator().manual_seed(seed)
        n = POOL + CHUNK
        self.seed = seed
        self.weights = (torch.empty(n).normal_(generator=g) * 0.02).to(dtype)   # base matrices: N(0, 0.02^2)
        self.normal = torch.empty(n).normal_(generator=g).to(dtype)
        # uniform bytes: P(byte < k) = k / 256
        self.bytes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        # a fixed drift direction per element (the same in every domain, so that successive domains mostly push
        # an element the same way, as the paper's 73.4%-unchanged-after-four implies), reversed by a domain with
        # probability 0.1
        self.sign = torch.where(torch.empty(n).uniform_(generator=g) < 0.5, -1, 1).to(torch.int16)
        flip = torch.where(torch.empty(n).uniform_(generator=g) < 0.1, -1, 1).to(torch.int16)
        if dtype == torch.bfloat16:
            # bf16 steps in ulps, added to the bit pattern (monotonic for finite non-zero values): 1 ulp (3/4) or
            # 2 ulps (1/4), i.e. a relative change of 2^-8..2^-7 per ulp
            self.step = torch.where(torch.empty(n).uniform_(generator=g) < 0.75, 1, 2).to(torch.int16) * flip
        else:
            # fp32 relative steps, log-uniform in [lo, hi]
            lo, hi = rel
            r = torch.empty(n).uniform_(generator=g)
            self.step = torch.exp(math.log(lo) + r * (math.log(hi) - math.log(lo))) * flip

    def offset(self, *key) -> int:
        return random.Random(f"{self.seed}/" + "/".join(map(str, key))).randrange(POOL)

    def slice(self, pool: torch.Tensor, n: int, *key) -> torch.Tensor:
        o = self.offset(*key)
        return pool[o:o + n]


def unit_vectors(name, shape, axis, block, seed, n_domains):
    """Per domain and unit, the byte threshold below which an element changes: the element's uniform byte v (the same
    for every domain) < 256 * density(unit) * q(domain, unit). The plastic set P is {v < 256 * density}; each domain
    changes a nested part of it (the elements of smallest v), so the union over domains stays close to P. Expanded to
    one value per index along the unit axis: uint8 [n_domains, len(axis)]."""
    g = torch.Generator().manual_seed(random.Random(f"{seed}/units/{name}").randrange(1 << 62))
    n_units = shape[axis] // block if len(shape) > axis else 1
    hot = torch.rand(n_units, generator=g) < HOT_FRAC
    dens = torch.where(hot, HOT_DENS[0] + (HOT_DENS[1] - HOT_DENS[0]) * torch.rand(n_units, generator=g),
                       torch.full((n_units,), COLD_DENS))
    q = Q_RANGE[0] + (Q_RANGE[1] - Q_RANGE[0]) * torch.rand(n_domains, n_units, generator=g)
    thr = (dens * q * 256).round().clamp(0, 255).to(torch.uint8)
    if block > 1:
        thr = thr.repeat_interleave(block, dim=1)
    return thr


def chunks(shape):
    """Row ranges [r0, r1) of <= CHUNK elements (1-D tensors: one chunk)."""
    if len(shape) == 1:
        return [(0, shape[0])]
    rows, cols = shape
    step = max(1, CHUNK // cols)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def make_base(name, shape, kind, pools: Pools, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    for c, (r0, r1) in enumerate(chunks(shape)):
        n = (r1 - r0) * (shape[1] if len(shape) == 2 else 1)
        if kind == "norm":
            t[r0:r1].copy_(1.0 + 0.1 * pools.slice(pools.normal, n, name, c, "base").float().view(t[r0:r1].shape))
        else:
            t[r0:r1].copy_(pools.slice(pools.weights, n, name, c, "base").view(t[r0:r1].shape))
    return t


def apply_domain(t: torch.Tensor, name, axis, thr_d, d: int, pools: Pools) -> None:
    """Update `t` in place with domain d's sparse step (bf16: integer ulp steps on the bit pattern; fp32: relative
    steps), in a few elementwise passes per chunk."""
    shape = tuple(t.shape)
    for c, (r0, r1) in enumerate(chunks(shape)):
        w = t[r0:r1]
        n = w.numel()
        if len(shape) == 2:
            thr_b = thr_d[r0:r1, None] if axis == 0 else thr_d[None, :]
        else:
            thr_b = thr_d[r0:r1]
        v = pools.slice(pools.bytes, n, name, c, "plastic").view(w.shape)     # the same for every domain
        sign = pools.slice(pools.sign, n, name, c, "sign").view(w.shape)       # the same for every domain
        step = pools.slice(pools.step, n, name, c, "step", d).view(w.shape)
        chg = v < thr_b
        if t.dtype == torch.bfloat16:
            s = chg.to(torch.int16)
            s.mul_(sign).mul_(step)
            w.view(torch.int16).add_(s)
        else:
            w.mul_(torch.where(chg, 1.0 + sign * step, 1.0))


def _atomic_json(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def synthesise(out_dir, n_layers=36, n_domains=4, dtype="bf16", seed=0, shard_gb=4.0, force=False, quiet=False):
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    labels = ["base"] + list(DOMAINS[:n_domains])
    specs = tensor_specs(n_layers)
    shards, total = plan_shards(specs, tdtype.itemsize, shard_gb * 1e9)
    dirs = [os.path.join(out_dir, lab) for lab in labels]
    for d in dirs:
        if os.path.exists(d):
            if not force:
                raise SystemExit(f"synth_checkpoints: {d} exists (use --force to overwrite)")
            shutil.rmtree(d)
        os.makedirs(d)
    free = shutil.disk_usage(out_dir).free
    if free < total * len(dirs) * 1.02:
        raise SystemExit(f"synth_checkpoints: {len(dirs)} checkpoints of {total / 1e9:.2f} GB need "
                         f"{total * len(dirs) / 1e9:.1f} GB, {out_dir} has {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()
    pools = Pools(seed, tdtype, REL[dtype])
    n_sh = len(shards)
    fnames = [f"model-{i + 1:05d}-of-{n_sh:05d}.safetensors" for i in range(n_sh)]
    weight_map = {}
    for si, shard in enumerate(shards):
        tensors, meta = {}, {}
        for name, shape, axis, block, kind in shard:
            tensors[name] = make_base(name, shape, kind, pools, tdtype)
            meta[name] = (unit_vectors(name, shape, axis, block, seed, n_domains), axis)
            weight_map[name] = fnames[si]
        save_file(tensors, os.path.join(dirs[0], fnames[si]), metadata={"format": "pt"})
        for d in range(n_domains):
            for name, t in tensors.items():
                thr, axis = meta[name]
                apply_domain(t, name, axis, thr[d], d, pools)
            save_file(tensors, os.path.join(dirs[d + 1], fnames[si]), metadata={"format": "pt"})
        del tensors
        if not quiet:
            done = sum(math.prod(s[1]) for sh in shards[:si + 1] for s in sh) * tdtype.itemsize
            print(f"  shard {si + 1}/{n_sh}: {done / 1e9:.2f}/{total / 1e9:.2f} GB per checkpoint, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for d in dirs:
        _atomic_json(os.path.join(d, "config.json"), qwen3_config(n_layers, dtype))
        _atomic_json(os.path.join(d, "model.safetensors.index.json"),
                     {"metadata": {"total_size": total}, "weight_map": weight_map})
    dt = time.perf_counter() - t0
    if not quiet:
        print(f"wrote {len(dirs)} checkpoints x {total / 1e9:.2f} GB ({n_layers} layers, {dtype}, {n_sh} shards) "
              f"to {out_dir} in {dt:.0f} s ({total * len(dirs) / 1e9 / dt:.2f} GB/s)")
    return dirs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=36, help="decoder layers (Qwen3-4B has 36; default 36)")
    ap.add_argument("--domains", type=int, default=4, help="checkpoints after the base (default 4: code math qa cw)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=4.0, help="largest shard in GB (default 4, like HF)")
    ap.add_argument("--force", action="store_true", help="overwrite existing checkpoint directories")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the passes are memory-bound and 1 thread degrades least when "
                         "the machine is shared)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    if not 1 <= a.layers <= 36:
        ap.error("--layers must be in 1..36")
    if not 1 <= a.domains <= len(DOMAINS):
        ap.error(f"--domains must be in 1..{len(DOMAINS)}")
    os.makedirs(a.out_dir, exist_ok=True)
    synthesise(a.out_dir, a.layers, a.domains, a.dtype, a.seed, a.shard_gb, a.force)


if __name__ == "__main__":
    main()
