"""The atomic output writer (lpt_kernels/checkpoint/writer.py): refusals before any work, no-replace renames,
replacement with force, cleanup on errors, stale temps of killed processes."""
import errno
import json
import os
import subprocess
import sys

import pytest

from lpt_kernels.checkpoint.writer import (MARKER, AtomicDir, OutputError, atomic_file, check_output, is_checkpoint_dir,
                                           remove_stale, rename_noreplace)


def temps(parent):
    return [e for e in os.listdir(parent) if ".tmp-" in e or ".old-" in e]


def test_rename_never_replaces(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()  # an empty directory appears at the output name meanwhile: plain rename(2) would replace it
    with pytest.raises(OSError) as e:
        rename_noreplace(str(a), str(b))
    assert e.value.errno == errno.EEXIST and a.exists() and b.exists()


def test_new_directory_appears_complete(tmp_path):
    out = tmp_path / "sub" / "out"
    with AtomicDir(out) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path / "sub") and os.path.basename(tmp).startswith(".out.tmp-")
        (open(os.path.join(tmp, "a.txt"), "w")).write("x")
        os.mkdir(os.path.join(tmp, "d"))
        assert not out.exists()  # nothing under the final name before the end
    assert sorted(os.listdir(out)) == [MARKER, "a.txt", "d"] and not temps(tmp_path / "sub")


def test_empty_directory_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with AtomicDir(out) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    assert sorted(os.listdir(out)) == [MARKER, "a"]
    assert json.loads((out / MARKER).read_text())["entries"] == ["a"]


def test_refusals_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists and is not empty.*--force"):
        AtomicDir(out)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is an existing file, not a directory"):
        AtomicDir(f, force=True)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(OutputError, match=r"is a checkpoint directory \(it holds model.safetensors.index.json\)"):
        AtomicDir(ck)
    assert is_checkpoint_dir(ck) == "model.safetensors.index.json" and is_checkpoint_dir(out) is None
    # inputs: the input itself, a path inside it, a path containing it -- even with force
    for p, word in ((ck, "is the input"), (ck / "prof", "is inside the input"), (tmp_path, "contains the input")):
        with pytest.raises(OutputError, match=word):
            AtomicDir(p, force=True, inputs=[str(ck)])
    with pytest.raises(OutputError, match="does not name"):
        check_output("/")
    with pytest.raises(OutputError, match="is a directory; give a file path"):
        check_output(out, kind="file", force=True)
    with pytest.raises(OutputError, match="already exists"):
        check_output(f, kind="file")
    assert (out / "keep.txt").read_text() == "mine" and not temps(tmp_path)


def test_force_replaces_in_one_step(tmp_path):
    out = tmp_path / "out"
    with AtomicDir(out) as tmp:
        open(os.path.join(tmp, "profile.json"), "w").write("old")
    with AtomicDir(out / "report") as tmp:  # an output inside an output (lpt report into a profile)
        open(os.path.join(tmp, "report.html"), "w").write("stale")
    with AtomicDir(out, force=True) as tmp:
        open(os.path.join(tmp, "profile.json"), "w").write("{}")
    assert sorted(os.listdir(out)) == [MARKER, "profile.json"]  # the stale report went with the old output
    assert (out / "profile.json").read_text() == "{}" and not temps(tmp_path)


def test_force_replaces_only_our_own_outputs(tmp_path):
    """--force never deletes a directory this package did not write, nor one where a user put files of their own."""
    mine = tmp_path / "mywork"
    mine.mkdir()
    (mine / "thesis.tex").write_text("my thesis")
    with pytest.raises(OutputError, match=r"not written by lpt_kernels.*even with --force"):
        AtomicDir(mine, force=True)
    out = tmp_path / "prof"
    with AtomicDir(out) as tmp:
        open(os.path.join(tmp, "profile.json"), "w").write("{}")
    (out / "notes.txt").write_text("mine")
    (out / "acts").mkdir()
    with pytest.raises(OutputError, match=r"holds entries lpt_kernels did not write there \(acts, notes.txt\)"):
        AtomicDir(out, force=True)
    assert (mine / "thesis.tex").read_text() == "my thesis" and (out / "notes.txt").read_text() == "mine"


def test_unwritable_output_is_one_line(tmp_path):
    with pytest.raises(OutputError, match=r"--out: cannot write /proc/lpt-nope .*nothing was written"):
        with AtomicDir("/proc/lpt-nope"):
            pass


def test_files_get_the_default_mode(tmp_path):
    from lpt_kernels.checkpoint.writer import replace_file

    old = os.umask(0o022)
    try:
        p = replace_file(tmp_path / "x.json", lambda t: open(t, "w").write("{}"))
    finally:
        os.umask(old)
    assert os.stat(p).st_mode & 0o777 == 0o644


def test_error_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with AtomicDir(out) as tmp:
            open(os.path.join(tmp, "a"), "w").close()
            raise RuntimeError("boom")
    assert not out.exists() and not temps(tmp_path)
    # an existing output stays as it was when the new one fails, even with force
    with AtomicDir(out) as tmp:
        open(os.path.join(tmp, "keep"), "w").write("old")
    with pytest.raises(KeyboardInterrupt):
        with AtomicDir(out, force=True):
            raise KeyboardInterrupt
    assert (out / "keep").read_text() == "old" and not temps(tmp_path)


def test_something_filled_the_output_meanwhile(tmp_path):
    out = tmp_path / "out"
    w = AtomicDir(out)
    with pytest.raises(OutputError, match="filled by something else"):
        with w as tmp:
            open(os.path.join(tmp, "mine"), "w").close()
            out.mkdir()
            (out / "theirs").write_text("x")
    assert os.listdir(out) == ["theirs"] and not temps(tmp_path)


def test_atomic_file(tmp_path):
    p = tmp_path / "sel.json"
    with atomic_file(p) as tmp:
        open(tmp, "w").write("one")
    assert p.read_text() == "one"
    with pytest.raises(OutputError, match="already exists"):
        with atomic_file(p) as tmp:
            pass
    with atomic_file(p, force=True) as tmp:
        open(tmp, "w").write("two")
    assert p.read_text() == "two"
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "x.json") as tmp:
            open(tmp, "w").write("partial")
            raise ValueError("boom")
    assert not (tmp_path / "x.json").exists() and not temps(tmp_path)
    with pytest.raises(OutputError, match="nothing was written"):
        with atomic_file(tmp_path / "y.json"):
            pass


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_dir = tmp_path / f".out.tmp-{dead}-0123abcd"
    stale_dir.mkdir()
    stale_file = tmp_path / f".out.tmp-{dead}-deadbeef"
    stale_file.write_text("x")
    live = tmp_path / f".out.tmp-{os.getpid()}-00000000"
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-0123abcd"
    other.mkdir()
    assert sorted(remove_stale(str(tmp_path), "out")) == sorted([str(stale_dir), str(stale_file)])
    assert live.exists() and other.exists()
    w = AtomicDir(tmp_path / "other")
    with w:
        pass
    assert w.stale_removed == [str(other)]
