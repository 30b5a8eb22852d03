"""The tracker inside real training loops: transformers' Trainer, TRL's GRPOTrainer, a verl-shaped actor, and the plain
PyTorch loop of examples/."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from ckpt_factory import tiny_qwen3_config
from lpt_kernels.analysis import Profile
from lpt_kernels.train import DeltaTracker, TrainError, track_verl_actor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(**cfg):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    c = tiny_qwen3_config()
    for k, v in cfg.items():
        setattr(c, k, v)
    return Qwen3ForCausalLM(c)


class TokenRange(torch.utils.data.Dataset):
    """Next-token prediction on one range of token ids (a 'domain')."""

    def __init__(self, lo, n=64):
        self.lo, self.n = lo, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.lo + i)
        ids = torch.randint(self.lo, self.lo + 40, (12,), generator=g)
        return {"input_ids": ids, "labels": ids}


def test_callback_logs_through_a_real_trainer(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lpt_kernels.train import LptCallback, attach

    class Reporter(TrainerCallback):  # stands where TensorBoard / W&B integrations stand: before user callbacks
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append((state.global_step, dict(logs)))

    model = make_model()
    tracker = DeltaTracker(model, every=2)
    for i, domain in enumerate(("code", "math")):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, logging_steps=3, learning_rate=1e-2,
                                 per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no",
                                 disable_tqdm=True)
        reporter = Reporter()
        trainer = Trainer(model=model, args=args, train_dataset=TokenRange(10 + 40 * i), callbacks=[reporter])
        cb = attach(trainer, tracker, domain=domain)
        assert trainer.callback_handler.callbacks[0] is cb
        trainer.train()
        assert tracker.domain == domain and tracker.steps == 6
        hist = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
        # measured at 2, 4, 6 (every=2): logged at those steps, beside the trainer's own loss
        assert sorted(s for s, e in hist.items() if f"lpt/{domain}/sparsity" in e) == [2, 4, 6]
        assert sorted(hist) == [2, 3, 4, 6]
        assert not any(k.startswith("lpt/") for k in hist[3])
        seen = {s: logs for s, logs in reporter.logs if f"lpt/{domain}/update_norm" in logs}
        assert sorted(seen) == [2, 4, 6]
        assert {k: v for k, v in seen[6].items() if k.startswith("lpt/")} == cb.latest
        norms = [hist[s][f"lpt/{domain}/update_norm"] for s in (2, 4, 6)]
        assert 0 < norms[0] < norms[2]
    assert "lpt/math/mlp/top10_jaccard/code" in cb.latest and "lpt/math/mlp/shared_cosine/code" in cb.latest
    # the metrics are the tracker's: the last logged norm is the profile's
    p = tracker.profile()
    assert math.isclose(cb.latest["lpt/math/mlp/update_norm"], float(p.norm("math", "mlp").pow(2).sum().sqrt()),
                        rel_tol=1e-5)

    # misuse: a callback added without attach() would log after the reporters: refused when training starts
    trainer = Trainer(model=model, args=args, train_dataset=TokenRange(90), callbacks=[LptCallback(tracker)])
    with pytest.raises(TrainError, match="attach"):
        trainer.train()
    with pytest.raises(TrainError, match="not a transformers Trainer"):
        attach(object(), tracker)
    with pytest.raises(TrainError, match="tracker, a monitor"):
        LptCallback()


def test_callback_with_trl_grpo_trainer(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from lpt_kernels.train import attach

    vocab = {f"t{i}": i for i in range(125)}
    vocab.update({"<pad>": 125, "<eos>": 126, "<unk>": 127})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model = make_model(pad_token_id=125, eos_token_id=126, bos_token_id=None)
    prompts = Dataset.from_dict({"prompt": [" ".join(f"t{(7 * i + j) % 100}" for j in range(6)) for i in range(32)]})

    def reward(completions, **kwargs):  # GRPO's reward: how many distinct tokens a completion has
        return [float(len(set(c.split()))) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=4, logging_steps=2, learning_rate=1e-2, report_to=[],
                      use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False)
    tracker = DeltaTracker(model, every=2)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                          processing_class=tokenizer)
    cb = attach(trainer, tracker, domain="code")
    trainer.train()
    logged = [e for e in trainer.state.log_history if "lpt/code/update_norm" in e]
    assert [e["step"] for e in logged] == [2, 4]
    assert all("reward" in e for e in logged)  # beside GRPO's own metrics, in the same log lines
    assert logged[-1]["lpt/code/update_norm"] == cb.latest["lpt/code/update_norm"] > 0


class FakeOptimizerActor:
    """The shape of verl's DataParallelPPOActor (verl/workers/actor/dp_actor.py): update_policy loops over PPO epochs
    and mini-batches, runs backward over micro-batches, calls self._optimizer_step() (clip, then step, or skip a
    non-finite step) and returns a dict of metric lists."""

    def __init__(self, module, lr=1e-2):
        self.actor_module = module
        self.actor_optimizer = torch.optim.SGD(module.parameters(), lr=lr)

    def _optimizer_step(self):
        grad_norm = torch.nn.utils.clip_grad_norm_(self.actor_module.parameters(), max_norm=1.0)
        if not torch.isfinite(grad_norm):
            self.actor_optimizer.zero_grad()
        else:
            self.actor_optimizer.step()
        return grad_norm

    def update_policy(self, data):
        metrics = {}
        for epoch in range(1):
            for mini in data.split(2):
                self.actor_optimizer.zero_grad()
                for micro in mini.split(1):
                    loss = self.actor_module(input_ids=micro, labels=micro).loss / 2
                    loss.backward()
                    metrics.setdefault("actor/pg_loss", []).append(loss.item())
                grad_norm = self._optimizer_step()
                metrics.setdefault("actor/grad_norm", []).append(grad_norm.item())
        self.actor_optimizer.zero_grad()
        return metrics


def test_verl_helper_measures_after_each_optimizer_step():
    model = make_model()
    actor = FakeOptimizerActor(model)
    tracker = DeltaTracker(model, every=2)
    tracker.start_domain("code")
    handle = track_verl_actor(actor, tracker)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(10, 50, (6, 12), generator=gen)       # 3 mini-batches: 3 optimizer steps
    metrics = actor.update_policy(data)
    assert tracker.steps == 3 and len(metrics["actor/grad_norm"]) == 3
    assert metrics["lpt/code/update_norm"] == [handle.latest["lpt/code/update_norm"]]  # the step-2 measurement
    metrics = actor.update_policy(data)                       # steps 4, 5, 6: measured at 4 and 6, the last kept
    assert tracker.steps == 6 and metrics["lpt/code/update_norm"] == [handle.latest["lpt/code/update_norm"]]
    p = tracker.profile()
    assert math.isclose(metrics["lpt/code/mlp/update_norm"][0], float(p.norm("code", "mlp").pow(2).sum().sqrt()),
                        rel_tol=1e-5)
    handle.remove()
    assert "lpt/code/update_norm" not in actor.update_policy(data) and tracker.steps == 6
    with pytest.raises(TrainError, match="no _optimizer_step"):
        track_verl_actor(object(), tracker)
    with pytest.raises(TrainError, match="give a tracker"):
        track_verl_actor(actor)


def test_plain_pytorch_loop_example(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_loop.py"), "--out", str(tmp_path),
                          "--steps", "8", "--every", "4", "--snapshot", f"disk:{tmp_path / 'snaps'}", "--plot"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "qa step   8" in out.stdout and "refresh step 1" in out.stdout
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["domain"] for r in rows[:6]] == ["code", "code", "math", "math", "qa", "qa"]
    assert float(rows[5]["lpt/qa/mlp/top10_jaccard/math"]) >= 0 and rows[-1]["domain"] == "refresh-math"
    prof = Profile.load(str(tmp_path / "profile"))
    assert prof.deltas == ["code", "math", "qa"]
    assert os.path.getsize(tmp_path / "curves.png") > 10_000
    assert sorted(os.listdir(tmp_path / "snaps")) == ["00-base.safetensors", "01-code.safetensors",
                                                      "02-math.safetensors"]
