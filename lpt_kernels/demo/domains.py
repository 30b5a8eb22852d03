"""The demo's vocabulary, tokenizer and four synthetic, verifiable domains (stand-ins for the paper's Code, Math, QA
and CW), and the warm-up corpus they are first learned from.

Every domain is written in one shared format, ``<tag> <operands ...> =`` followed by a short answer of digit tokens,
so the domains share tokens, positions and the "read the operands, write digits" route, the way real domains share
reasoning and formatting:

- **math** ``add 4 7 + 5 =`` -> ``5 2``: the last two digits of a two-digit number plus a digit (binary reward; the
  number is written without a leading zero, so math prompts have 5 or 6 tokens and batches of them are padded);
- **code** ``run dbl 3 8 1 =`` -> ``6 6 2``: a tiny digit program applied to three test inputs (reward: the share of
  the three answered right);
- **qa** ``ask eve 3 =`` -> ``3 7``: closed-book recall of a synthetic fact (person x slot -> a digit, 80 facts),
  restating the slot first (binary reward; the evaluation set is the fact table itself: knowledge is what is tested);
- **cw** ``write 2 9 4 =`` -> ``x 9``: two digits that end with ``9`` and start with a fresh digit (none of 2, 9,
  4): a rule-checked answer with several valid outputs; reward 1 when both constraints hold, 0.5 for one, 0 for
  none, like the paper's judge.

The warm-up corpus (:func:`corpus_answer`) writes the right answer half of the time and otherwise the domain's
typical slip: math one too high, qa and cw one too low in their last digit, code an input copied without the
program applied. RL with a verifiable reward then sharpens a capability that is in the model's support, as RL
post-training does; and because the slips share the route that writes the last digit, QA's and CW's updates
(away from "one too low") push against Math's (away from "one too high"): the shared, conflicting route that the
paper's analyses look for.

Evaluation sets are held out: no math, code or cw evaluation prompt is ever a training prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

DOMAINS = ("math", "code", "qa", "cw")          # the order of scores in tables
CURRICULUM = ("code", "math", "qa", "cw")       # the paper's training order

DIGITS = [str(i) for i in range(10)]
NAMES = ["ada", "ben", "cyd", "dot", "eve", "fay", "gus", "hal"]
ATTRS = DIGITS  # qa asks "ask <name> <d> =": the d-th number of a person (80 facts)
OPS = {"inc": lambda x: (x + 1) % 10, "dbl": lambda x: (2 * x) % 10, "neg": lambda x: (10 - x) % 10,
       "sqr": lambda x: (x * x) % 10, "rev": lambda x: 9 - x}
TAGS = {"math": "add", "code": "run", "qa": "ask", "cw": "write"}
SPECIAL = ["<pad>", "<unk>", "<eos>"]
VOCAB: List[str] = SPECIAL + ["=", "+"] + DIGITS + list(TAGS.values()) + list(OPS) + NAMES


@dataclass(frozen=True)
class Example:
    """One prompt of a domain: its tokens and what the checker needs (``key``: the correct answer, or for cw the
    constraints)."""

    domain: str
    prompt: Tuple[str, ...]
    key: Tuple[int, ...]


def build_tokenizer():
    """A ``transformers.PreTrainedTokenizerFast`` over :data:`VOCAB` (word level, split on whitespace), so the saved
    checkpoints load with ``AutoTokenizer`` + ``AutoModelForCausalLM``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   padding_side="left", model_input_names=["input_ids", "attention_mask"])


TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
DIGIT_IDS = [TOKEN_ID[d] for d in DIGITS]
PAD_ID = TOKEN_ID["<pad>"]


def encode(tokens: Sequence[str]) -> List[int]:
    return [TOKEN_ID[t] for t in tokens]


# ---- the fact table of qa (fixed by the seed) ---------------------------------------------------------------------

def fact_table(seed: int) -> Dict[Tuple[str, str], int]:
    """name x attr -> a value 0..99 (64 facts)."""
    rng = random.Random(f"facts-{seed}")
    return {(n, a): rng.randrange(10) for n in NAMES for a in ATTRS}


# ---- generators: rng -> Example -----------------------------------------------------------------------------------

def _math(rng: random.Random, facts) -> Example:
    x, y = rng.randrange(100), rng.randrange(10)  # x written without a leading zero: prompts of 5 or 6 tokens
    s = (x + y) % 100
    return Example("math", ("add", *str(x), "+", str(y), "="), (s // 10, s % 10))


def _code(rng: random.Random, facts) -> Example:
    op = rng.choice(sorted(OPS))
    xs = [rng.randrange(10) for _ in range(3)]
    return Example("code", ("run", op, *map(str, xs), "="), tuple(OPS[op](x) for x in xs))


def _qa(rng: random.Random, facts) -> Example:
    n, a = rng.choice(NAMES), rng.choice(ATTRS)
    return Example("qa", ("ask", n, a, "="), (int(a), facts[(n, a)]))


def _cw(rng: random.Random, facts) -> Example:
    a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
    return Example("cw", ("write", str(a), str(b), str(c), "="), (a, b, c))


GENERATORS: Dict[str, Callable] = {"math": _math, "code": _code, "qa": _qa, "cw": _cw}
ANSWER_LEN = {"math": 2, "code": 3, "qa": 2, "cw": 2}


def reward(ex: Example, answer: Sequence[int]) -> float:
    """Score of an answer (digit values, -1 for a non-digit token) in [0, 1]."""
    if ex.domain in ("math", "qa"):
        return float(tuple(answer) == ex.key)
    if ex.domain == "code":
        return sum(int(a == k) for a, k in zip(answer, ex.key)) / len(ex.key)
    a, b, c = ex.key  # cw: ends with b; the first digit is none of a, b, c
    if any(d < 0 for d in answer):
        return 0.0
    return (int(answer[1] == b) + int(answer[0] not in (a, b, c))) / 2


def reference_answer(ex: Example, rng: random.Random) -> Tuple[int, ...]:
    """One correct answer (the supervised warm-up's target); for cw, a valid answer with a random first digit."""
    if ex.domain != "cw":
        return ex.key
    a, b, c = ex.key
    return (rng.choice([d for d in range(10) if d not in (a, b, c)]), b)


def corpus_answer(ex: Example, rng: random.Random, q: float, facts) -> Tuple[int, ...]:
    """An answer as the warm-up corpus writes it: correct with probability ``q``, else the domain's typical slip
    (math: the sum one too high; qa: the fact one too low; cw: the last digit one too low; code: each test input
    copied without applying the program, independently with probability ``1 - q``)."""
    ans = reference_answer(ex, rng)
    if ex.domain == "code":
        xs = [int(t) for t in ex.prompt[2:5]]
        return tuple(a if rng.random() < q else x for a, x in zip(ans, xs))
    if rng.random() < q:
        return ans
    if ex.domain == "math":
        s = (10 * ans[0] + ans[1] + 1) % 100
        return (s // 10, s % 10)
    if ex.domain == "qa":
        name, attr = ex.prompt[1], ex.prompt[2]
        return (int(attr), (facts[(name, attr)] - 1) % 10)
    return ans[:-1] + ((ans[-1] - 1) % 10,)


class Domains:
    """Seeded prompt sources: disjoint held-out evaluation sets and endless training prompts."""

    def __init__(self, seed: int, eval_size: int):
        self.seed = seed
        self.facts = fact_table(seed)
        self.eval: Dict[str, List[Example]] = {}
        held = {}
        for d in DOMAINS:
            rng = random.Random(f"eval-{d}-{seed}")
            if d == "qa":  # closed-book: every fact, in a fixed order
                self.eval[d] = [Example("qa", ("ask", n, a, "="), (int(a), v))
                                for (n, a), v in sorted(self.facts.items())]
            else:
                seen, out = set(), []
                for _ in range(100 * eval_size):
                    if len(out) == eval_size:
                        break
                    ex = GENERATORS[d](rng, self.facts)
                    if ex.prompt not in seen:
                        seen.add(ex.prompt)
                        out.append(ex)
                self.eval[d] = out
            held[d] = {ex.prompt for ex in self.eval[d]} if d != "qa" else set()
        self._held = held

    def sample(self, domain: str, rng: random.Random, n: int) -> List[Example]:
        """``n`` training prompts of ``domain`` (never one of its held-out evaluation prompts)."""
        out = []
        gen, held = GENERATORS[domain], self._held[domain]
        while len(out) < n:
            ex = gen(rng, self.facts)
            if ex.prompt not in held:
                out.append(ex)
        return out
