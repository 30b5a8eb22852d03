"""`lpt demo`: train a tiny Qwen3 through the paper's curriculum on the CPU, show the interference, explain it with
the package's analyses and recover it in the paper's two ways; write checkpoints, results.json and report.html.

Phases (each timed, wall and CPU): a supervised warm-up (the base), GRPO stages Code -> Math -> QA -> CW (one
checkpoint each, saved with ``save_pretrained`` as sharded bf16 safetensors with an index, like the paper's), the
Re-Math refresh, the analyses (:mod:`.analyses`), the rollback sweeps (:mod:`.interventions`) and the report
(:mod:`.report`). Same seed, same machine (and thread count) -> the same results.json, apart from its ``timing``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

import torch

from lpt_kernels.demo.domains import CURRICULUM, DOMAINS, Domains
from lpt_kernels.demo.model import ModelSize
from lpt_kernels.demo.training import GRPOConfig



class DemoError(ValueError):
    """A demo that cannot run as asked (one-line message)."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything that shapes a run. :data:`FULL` and :data:`FAST` are the two presets."""

    size: ModelSize = ModelSize(layers=4, hidden=192, intermediate=512, heads=6, kv_heads=2, head_dim=32)
    warmup_steps: int = 300
    warmup_batch: int = 64
    warmup_lr: float = 1e-3
    warmup_mix: Dict[str, float] = field(default_factory=lambda: {"math": 0.6, "code": 0.1, "qa": 0.15, "cw": 0.15})
    corpus_quality: Dict[str, float] = field(default_factory=lambda: {d: 0.5 for d in DOMAINS})
    sloppy_from: float = 0.6
    grpo: GRPOConfig = GRPOConfig(lr=1e-4, group=8, prompts=32, temperature=1.0)
    stage_steps: Dict[str, int] = field(default_factory=lambda: {"code": 20, "math": 20, "qa": 30, "cw": 20})
    refresh_steps: int = 20
    refresh_every: int = 5
    track_every: int = 1  # DeltaTracker: metrics after every optimizer step of the GRPO stages
    eval_size: int = 256
    budgets: tuple = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
    random_seeds: int = 3
    shard_size: str = "1MB"


FULL = DemoConfig()
FAST = replace(FULL, warmup_steps=240, warmup_lr=1.5e-3, eval_size=128,
               stage_steps={"code": 15, "math": 15, "qa": 20, "cw": 15}, refresh_steps=15)


class Timer:
    """Wall and CPU (user + sys of this process, all threads) seconds per phase; a nested phase's time is not
    counted in its parent."""

    def __init__(self):
        self.phases: Dict[str, Dict[str, float]] = {}
        self._stack: List[list] = []

    @staticmethod
    def _now():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), r.ru_utime + r.ru_stime

    def _add(self, name, wall, cpu):
        p = self.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        p["wall_s"] += wall
        p["cpu_s"] += cpu

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                now = timer._now()
                if timer._stack:
                    top = timer._stack[-1]
                    timer._add(top[0], now[0] - top[1], now[1] - top[2])
                timer._stack.append([name, *now])

            def __exit__(self, *exc):
                now = timer._now()
                top = timer._stack.pop()
                timer._add(top[0], now[0] - top[1], now[1] - top[2])
                if timer._stack:
                    timer._stack[-1][1:] = list(now)
        return _Ctx()

    def table(self) -> dict:
        out = {k: {"wall_s": round(v["wall_s"], 2), "cpu_s": round(v["cpu_s"], 2)} for k, v in self.phases.items()}
        out["total"] = {"wall_s": round(sum(v["wall_s"] for v in self.phases.values()), 2),
                        "cpu_s": round(sum(v["cpu_s"] for v in self.phases.values()), 2)}
        return out


def _round_bf16_(model) -> None:
    """Round the weights to bf16 in place (kept in fp32 for the CPU's matmuls): the checkpoint is the model."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))


def _save(model, tokenizer, path: str, shard: str) -> str:
    """save_pretrained as bf16 (sharded safetensors + index), with the tokenizer."""
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path, state_dict=state, max_shard_size=shard)
    tokenizer.save_pretrained(path)
    return path


def _load(path: str, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    return model


def _bar(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not show, file=sys.stderr)


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' own bars ("Writing model shards", "Loading weights") off for the run, restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def run_demo(out: str = "lpt-demo", fast: bool = False, seed: int = 0, device: str = "cpu", force: bool = False,
             quiet: bool = False, threads: Optional[int] = 1, config: Optional[DemoConfig] = None,
             progress: Optional[bool] = None) -> dict:
    """Run the whole demo into ``out``; returns the results dict (also written to ``out/results.json``).

    ``out`` must be new or empty, or with ``force`` an earlier output of this package holding nothing else (then it
    is replaced); everything is written under a temp name beside it and moved into place when complete (:class:`lpt_kernels.checkpoint.writer.AtomicDir`), so an
    interrupted run leaves nothing under ``out``. ``progress``: tqdm bars (default: only when stderr is a terminal
    and not ``quiet``). Raises :class:`DemoError` (a ``ValueError``) for arguments it cannot run with, and
    ``OutputError`` for an ``out`` it may not write.
    """
    from lpt_kernels.checkpoint.writer import AtomicDir
    from lpt_kernels.demo import report

    cfg = config or (FAST if fast else FULL)
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise DemoError(f"lpt demo needs transformers and tokenizers ({e}); pip install 'lpt_kernels[demo]'") from None
    if device not in ("cpu", "cuda"):
        raise DemoError(f"--device: expected cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device is available")
    if threads is not None:
        if threads < 1:
            raise DemoError(f"--threads: must be at least 1, got {threads}")
    show = (not quiet and sys.stderr.isatty()) if progress is None else bool(progress)
    writer = AtomicDir(out, force=force)  # checks --out before any work
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with writer as tmp, _transformers_quiet():
            results = _run(tmp, cfg, seed, fast, device, quiet, show)
    finally:
        torch.set_num_threads(old_threads)
    if not quiet:
        print(report.text(results))
    return results


def _run(out: str, cfg: DemoConfig, seed: int, fast: bool, device: str, quiet: bool, show: bool) -> dict:
    from lpt_kernels.demo import analyses, interventions, report
    from lpt_kernels.demo.domains import build_tokenizer
    from lpt_kernels.demo.model import build_model, evaluate
    from lpt_kernels.demo.training import grpo_stage, warmup

    timer = Timer()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    ckpt = {s: os.path.join(out, "ckpts", s) for s in ("base",) + CURRICULUM + ("remath",)}
    # the first line at once: the first score line follows only after the warm-up and a GRPO stage (minutes)
    say("lpt demo: training a tiny Qwen3 (warm-up, then GRPO Code -> Math -> QA -> CW); scores on held-out sets "
        "after each stage:")

    with timer("setup"):
        random.seed(seed)
        torch.manual_seed(seed)
        domains = Domains(seed, cfg.eval_size)
        tokenizer = build_tokenizer()
        model = build_model(cfg.size, seed, device)

    def scored(m) -> Dict[str, float]:
        with timer("evaluate"):
            return evaluate(m, domains.eval)

    stages: List[dict] = []
    rewards: Dict[str, List[float]] = {}
    with timer("warmup"):
        bar = _bar(cfg.warmup_steps, "warm-up (supervised)", show)
        losses = warmup(model, domains, cfg.warmup_steps, cfg.warmup_batch, cfg.warmup_lr, seed, cfg.warmup_mix,
                        cfg.corpus_quality, cfg.sloppy_from, progress=bar)
        bar.close()
        _round_bf16_(model)
    with timer("save"):
        _save(model, tokenizer, ckpt["base"], cfg.shard_size)
    stages.append({"name": "base", "scores": scored(model)})
    # The training loop's tracker (lpt_kernels.train): each domain's update, live, after every optimizer step.
    from lpt_kernels.train import DeltaTracker

    tracker = DeltaTracker(model, groups=("mlp", "attn"), every=cfg.track_every)
    curves: List[dict] = []
    for d in CURRICULUM:
        with timer("track"):
            tracker.start_domain(d)  # the first call also snapshots the base

        def tracked(step: int, m, d=d) -> None:  # after the optimizer step
            with timer("track"):
                metrics = tracker.step()
            if metrics:
                curves.append({"domain": d, "step": step + 1, "metrics": metrics})

        with timer(f"grpo:{d}"):
            bar = _bar(cfg.stage_steps[d], f"GRPO {d}", show)
            logs = grpo_stage(model, domains, d, cfg.stage_steps[d], cfg.grpo, seed, on_step=tracked, progress=bar)
            bar.close()
            _round_bf16_(model)
        rewards[d] = [round(x["reward"], 4) for x in logs]
        with timer("save"):
            _save(model, tokenizer, ckpt[d], cfg.shard_size)
        stages.append({"name": d, "scores": scored(model)})
        say(f"  after {d:<4}: " + "  ".join(f"{k} {v:5.1f}" for k, v in stages[-1]["scores"].items()))

    with timer("track"):
        live_profile = tracker.profile()  # the four domains' updates as tracked in the loop
        tracker.close()

    # Analyses, from the saved checkpoints (what a user has).
    with timer("analysis:diff"):
        profiles = analyses.update_profiles(ckpt, progress=show)
    tracking = {"every": cfg.track_every, "curves": curves,
                "matches_diff": analyses.same_profile(live_profile, profiles["profile"])}
    math_model = _load(ckpt["math"], device)
    with timer("analysis:activations"):
        routes = analyses.activation_routes(math_model, domains.eval)
    with timer("analysis:gradients"):
        grads = analyses.gradient_alignment(math_model, domains.eval, seed)
    del math_model

    # Re-Math refresh: GRPO on Math from the CW checkpoint, every domain evaluated every few steps, and a
    # RefreshMonitor measuring the distance to the Math checkpoint on the conflict units (A x M x C at 2%) and off them.
    from lpt_kernels.train import RefreshMonitor

    refresh = [{"step": 0, "scores": stages[-1]["scores"]}]
    conflict_units = interventions.conflict_selection(profiles["profile"], routes["result"], 0.02)
    others = {"qa": ckpt["qa"], "cw": ckpt["cw"]}
    watch = RefreshMonitor(model, ckpt["math"], conflict_units, others=others, name="math")
    distance = [dict(step=0, **_distances(watch.step()))]  # every=1: before the first step too

    def after_step(step: int, m) -> None:  # the training loop's "after optimizer step" point
        distance.append(dict(step=step + 1, **_distances(watch.step())))
        if (step + 1) % cfg.refresh_every == 0 and step + 1 < cfg.refresh_steps:
            refresh.append({"step": step + 1, "scores": scored(m)})

    with timer("refresh"):
        bar = _bar(cfg.refresh_steps, "Re-Math refresh", show)
        logs = grpo_stage(model, domains, "math", cfg.refresh_steps, cfg.grpo, seed + 1, on_step=after_step,
                          progress=bar)
        bar.close()
        watch.close()
        _round_bf16_(model)
    rewards["remath"] = [round(x["reward"], 4) for x in logs]
    refresh.append({"step": cfg.refresh_steps, "scores": scored(model)})
    with timer("save"):
        _save(model, tokenizer, ckpt["remath"], cfg.shard_size)
    del model

    # Rollback of QA's displacement toward the Math checkpoint, live on the QA model.
    qa_model = _load(ckpt["qa"], device)
    before = stages[CURRICULUM.index("math") + 1]["scores"]
    with timer("rollback"):
        n_cells = len(interventions.plan(cfg.random_seeds))
        bar = _bar(n_cells, "rollback sweeps", show)
        sweeps = interventions.rollback_sweeps(qa_model, ckpt["math"], profiles["profile"], routes["result"],
                                               scored, before, cfg.budgets, cfg.random_seeds, progress=bar)
        bar.close()
        layer_budget = interventions.budget_profiles(profiles["profile"], routes["result"], 0.02)
    del qa_model

    results = _results(cfg, seed, fast, device, stages, refresh, sweeps, before, profiles, routes, grads,
                       layer_budget, losses, rewards)
    results["refresh_distance"] = _round(distance)
    results["tracking"] = _round(tracking)
    with timer("report"):
        report.write(out, results, profiles, routes, grads)
    results["timing"] = {"phases": timer.table(), "threads": torch.get_num_threads(),
                         "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                     "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    _write_json(os.path.join(out, "results.json"), results)
    return results


def _distances(metrics: Dict[str, float]) -> Dict[str, float]:
    """RefreshMonitor's metrics, renamed: distance to Math on / off the conflict units, and to QA and CW."""
    k = "lpt/refresh/{}/{}".format
    return {"math_conflict_units": metrics[k("math", "selected_norm")], "math_elsewhere": metrics[k("math", "rest_norm")],
            "qa": metrics[k("qa", "norm")], "cw": metrics[k("cw", "norm")]}


def _write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)


def _round(x, nd=6):
    """Floats to ``nd`` significant digits (results.json stays readable); NaN and infinities become null."""
    if isinstance(x, float):
        return float(f"{x:.{nd}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    return x


def _results(cfg, seed, fast, device, stages, refresh, sweeps, before, profiles, routes, grads, layer_budget,
             losses, rewards) -> dict:
    from lpt_kernels.demo import analyses
    from lpt_kernels.demo.report import PAPER

    by = {s["name"]: s["scores"] for s in stages}
    drop = by["math"]["math"] - by["cw"]["math"]
    regained = refresh[-1]["scores"]["math"] - by["cw"]["math"]
    floors = {"math_after_math": by["math"]["math"], "math_after_cw": by["cw"]["math"], "math_drop": drop,
              "math_after_refresh": refresh[-1]["scores"]["math"],
              "refresh_recovered": regained / drop if drop > 0 else float("nan"),
              "drop_ok": drop >= 10.0, "refresh_ok": drop > 0 and regained >= 0.5 * drop}
    for s in stages + refresh:
        s["scores"]["avg"] = sum(s["scores"][d] for d in DOMAINS) / len(DOMAINS)
    res = {
        "format": "lpt-demo/1", "seed": seed, "fast": fast, "device": device,
        "config": _config_doc(cfg),
        "stages": stages, "refresh": refresh,
        "rollback": sweeps["rows"],
        "rollback_reference": {"before": before, "damaged": sweeps["damaged"], "earlier": "math", "later": "qa"},
        "layer_budget": layer_budget,
        "analyses": {
            "sparsity": {"exact": profiles["sparsity_exact"], "tolerance": profiles["sparsity_tol"],
                         "step_exact": profiles["step_sparsity_exact"], "step_tolerance": profiles["step_sparsity_tol"],
                         "atol": analyses.SPARSITY_ATOL},
            "changed_jaccard": profiles["changed_jaccard"], "active_jaccard": routes["active_jaccard"],
            "shared_cosine": profiles["shared_cosine"], "activation_tokens": routes["tokens"],
            "grad_cosine": grads["cosine"], "grad_cosine_per_module": {"pairs": grads["pairs"],
                                                                      "rows": grads["per_module"]},
            "summary": analyses.summary(profiles, routes, grads),
        },
        "training": {"warmup_loss_first": losses[0], "warmup_loss_last": sum(losses[-10:]) / len(losses[-10:]),
                     "mean_reward_per_step": rewards},
        "floors": floors,
        "paper": PAPER,
    }
    return _round(res)


def _config_doc(cfg: DemoConfig) -> dict:
    d = asdict(cfg)
    d["budgets"] = list(cfg.budgets)
    return d
