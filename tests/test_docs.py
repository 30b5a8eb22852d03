"""Every code block of README.md and docs/*.md runs as written, so the documentation cannot rot.

Convention (for writers of docs):

- ```` ```python ```` blocks of one file run in order, in one namespace (a later block sees what an earlier one
  defined), in this process, with the file's scratch directory as the working directory;
- ```` ```bash ```` blocks run with ``bash -e`` in the same scratch directory (``lpt`` and ``python`` are this
  environment's);
- the scratch directory (a fresh one per file) holds small real checkpoints under ``ckpts/{base,code,math,qa,cw}``:
  tiny Qwen3 models (hidden 64, intermediate 96, 3 layers, 4 query heads, 2 KV heads of dim 16, vocab 128, fp32)
  saved by ``save_pretrained`` in several shards with an index, each domain changing a random 30% of the rows of
  every weight of the one before (tests/ckpt_factory.py);
- a line ``<!-- no-test: REASON -->`` right before a block exempts it; each exemption is reported as a skipped test
  with its reason. Keep them rare (install commands, a GPU-only command);
- blocks of any other info string (```` ```text ````, ```` ```json ````) are output or data and are not run; a block
  without an info string is an error (say ``text``).

Blocks of one file stop at the first failure, which is reported with the file, the block's line and its output.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import List, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(.+?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
DOMAINS = ("base", "code", "math", "qa", "cw")


@dataclass
class Block:
    file: str
    line: int        # 1-based line of the opening fence
    lang: str        # the info string's first word ('' if none)
    code: str
    skip: Optional[str] = None  # the no-test reason

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def extract(text: str, file: str = "<doc>") -> List[Block]:
    """The fenced code blocks of a Markdown text, with their info string and no-test reason."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip = NO_TEST.match(prev)
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{file}:{i + 1}: code block never closed")
        blocks.append(Block(file, i + 1, lang, "\n".join(body) + "\n", skip.group(1) if skip else None))
        i = j + 1
    return blocks


def doc_blocks(file: str) -> List[Block]:
    with open(os.path.join(REPO, file), encoding="utf-8") as f:
        return extract(f.read(), file)


# ---- the scratch directory -----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def doc_checkpoints(tmp_path_factory):
    """ckpts/{base,code,math,qa,cw}, made once per session."""
    import torch
    from ckpt_factory import save_chain

    root = tmp_path_factory.mktemp("doc_ckpts")
    save_chain(str(root), names=DOMAINS, seed=12, dtype=torch.float32)  # fp32: a CPU runs bf16 matmuls slowly
    return str(root)


def _scratch(tmp_path, ckpts: str) -> str:
    work = tmp_path / "work"
    os.makedirs(work / "ckpts")
    for d in DOMAINS:
        shutil.copytree(os.path.join(ckpts, d), work / "ckpts" / d)
    return str(work)


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["MPLBACKEND"] = "Agg"
    env["OMP_NUM_THREADS"] = "1"  # tiny models: a second thread only waits at barriers (badly, on a busy machine)
    env.pop("PYTHONSTARTUP", None)
    return env


def _run_python(block: Block, ns: dict) -> None:
    code = compile(block.code, f"{block.where} (python block)", "exec")
    try:
        exec(code, ns)  # noqa: S102 -- the documentation's own code, which is the point of this test
    except BaseException:  # noqa: BLE001
        tb = traceback.format_exc(limit=-6)
        pytest.fail(f"{block.where}: python block failed\n--- block ---\n{block.code}--- error ---\n{tb}",
                    pytrace=False)


def _run_bash(block: Block, cwd: str) -> None:
    r = subprocess.run(["bash", "-e", "-c", block.code], cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        pytest.fail(f"{block.where}: bash block failed (exit {r.returncode})\n--- block ---\n{block.code}"
                    f"--- stdout ---\n{r.stdout[-3000:]}--- stderr ---\n{r.stderr[-3000:]}", pytrace=False)


def _runnable(file: str) -> List[Block]:
    return [b for b in doc_blocks(file) if RUN.get(b.lang) and b.skip is None]


@pytest.mark.parametrize("file", [f for f in DOC_FILES if _runnable(f)])
def test_doc_blocks_run(file, doc_checkpoints, tmp_path, monkeypatch):
    blocks = _runnable(file)
    work = _scratch(tmp_path, doc_checkpoints)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(work)  # a module a block writes (an evaluator) imports as it would for the reader
    for k, v in (("MPLBACKEND", "Agg"),):
        monkeypatch.setenv(k, v)
    ns = {"__name__": "__main__"}
    t0 = time.perf_counter()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in blocks:
            t1 = time.perf_counter()
            if RUN[b.lang] == "python":
                _run_python(b, ns)
            else:
                _run_bash(b, work)
            print(f"  {b.where} ({b.lang}): {time.perf_counter() - t1:.1f} s")
    finally:  # modules a block wrote (my_evals.py) must not leak into the next file's run
        torch.set_num_threads(threads)
        for name, mod in list(sys.modules.items()):
            if os.path.abspath(getattr(mod, "__file__", None) or "/").startswith(work + os.sep):
                del sys.modules[name]
    print(f"{file}: {len(blocks)} blocks in {time.perf_counter() - t0:.1f} s")


def _exempt():
    out = []
    for f in DOC_FILES:
        for b in doc_blocks(f):
            if b.skip is not None and RUN.get(b.lang):
                out.append(pytest.param(b, id=b.where))
    return out or [pytest.param(None, id="none")]


@pytest.mark.parametrize("block", _exempt())
def test_exempt_blocks_are_reported(block):
    if block is None:
        return
    assert block.skip.strip(), f"{block.where}: a no-test marker needs a reason"
    pytest.skip(f"{block.where}: not run ({block.skip})")


# ---- the documents themselves --------------------------------------------------------------------------------------

ALL_DOCS = DOC_FILES + ["benchmarks/README.md"]


@pytest.mark.parametrize("file", ALL_DOCS)
def test_every_block_says_what_it_is(file):
    """A block without an info string would silently not run: say ``text`` for output."""
    bad = [b.where for b in doc_blocks(file) if not b.lang]
    assert not bad, f"code blocks without an info string (write ```text for output): {bad}"


@pytest.mark.parametrize("file", ALL_DOCS)
def test_docs_stay_inside_the_repository(file):
    """No pointer to files outside the repository (the architecture page is docs/architecture.md), and every
    relative link resolves."""
    text = open(os.path.join(REPO, file), encoding="utf-8").read()
    assert "../shared" not in text and "DESIGN.md" not in text, f"{file} points outside the repository"
    base = os.path.dirname(os.path.join(REPO, file))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        p = os.path.normpath(os.path.join(base, target))
        assert p.startswith(REPO + os.sep), f"{file}: link {target} leaves the repository"
        assert os.path.exists(p), f"{file}: link {target} does not resolve"


def test_package_sources_point_inside_the_repository():
    hits = []
    for root in ("lpt_kernels", "tests", "benchmarks", "csrc", ".ci"):
        for dirpath, _, names in os.walk(os.path.join(REPO, root)):
            for n in names:
                if n.endswith((".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".sh")) or n == "run":
                    p = os.path.join(dirpath, n)
                    text = open(p, encoding="utf-8", errors="replace").read()
                    if "DESIGN.md" in text or "../shared" in text:
                        hits.append(os.path.relpath(p, REPO))
    hits = [h for h in hits if h != "tests/test_docs.py"]
    assert not hits, f"references to files outside the repository: {hits}"


# ---- the extractor itself --------------------------------------------------------------------------------------------

def test_extractor():
    text = "\n".join([
        "# t", "```python", "a = 1", "```", "", "<!-- no-test: needs a GPU -->", "", "```bash", "nvidia-smi", "```",
        "```text", "output", "```", "````python", "b = '```'", "````", "  ```json", "  {}", "  ```",
        "```", "untagged", "```",
    ])
    bs = extract(text)
    assert [(b.line, b.lang, b.skip) for b in bs] == [
        (2, "python", None), (8, "bash", "needs a GPU"), (11, "text", None), (14, "python", None), (17, "json", None),
        (20, "", None)]
    assert bs[0].code == "a = 1\n" and bs[3].code == "b = '```'\n" and bs[4].code == "{}\n"
    with pytest.raises(ValueError, match="never closed"):
        extract("```python\nx = 1\n")
