"""Atomic outputs: every file or directory the package writes appears complete under its final name, or not at all.

One writer for every command that writes (``lpt diff``, ``report``, ``select``, ``rollback``, ``sweep``, ``demo``)
and for the Python functions behind them:

- :func:`check_output` validates an output path *before* any work: an existing non-empty directory, an existing file,
  or a checkpoint directory is refused unless ``force``; an input of the command (or a path inside or above one) is
  refused even with ``force``; a file where a directory is wanted (or the reverse) is refused.
- :class:`AtomicDir` builds a directory in a hidden temp directory beside the destination
  (``.NAME.tmp-PID-XXXXXXXX``, same filesystem), fsyncs every file and directory in it, and renames it into place:
  without replacing anything (``renameat2(RENAME_NOREPLACE)``) when the destination is absent, replacing an empty
  directory, or, with ``force``, swapping it with the old output in one step (``renameat2(RENAME_EXCHANGE)``) and
  then deleting the old one. An error or an interrupt removes the temp directory; a killed process leaves it behind,
  and the next writer to the same destination removes such leftovers whose process is gone.
- :func:`atomic_file` does the same for one file (temp file, fsync, no-replace link or replacing rename).

This is checkpoint I/O, not analysis: it knows nothing of profiles or models.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

__all__ = ["OutputError", "check_output", "AtomicDir", "atomic_file", "is_checkpoint_dir", "remove_stale",
           "rename_noreplace", "fsync_dir", "temp_name", "set_default_mode", "replace_file", "MARKER"]

PathLike = Union[str, "os.PathLike[str]"]

_CKPT_FILES = re.compile(r"(\.safetensors|\.safetensors\.index\.json|^pytorch_model.*\.bin|\.bin\.index\.json|"
                         r"^\.metadata)$")
# the package's own outputs that are safetensors files but not checkpoints (a profile, activation statistics, Grams)
_OWN_OUTPUTS = {"profile.safetensors", "activations.safetensors", "gradgram.safetensors"}


# Written into every directory AtomicDir publishes: the entries it wrote. ``force`` replaces only such a directory,
# and only while everything in it is what was written (or is itself such an output, e.g. a report inside a profile).
MARKER = ".lpt-output.json"


class OutputError(ValueError):
    """An output that cannot or must not be written (one-line message naming the path and what to do)."""


def _written_entries(path: str) -> Optional[set]:
    """The entries recorded in `path`'s marker, or None when `path` is not a directory this package wrote."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            entries = json.load(f).get("entries")
    except (OSError, ValueError, AttributeError):
        return None
    return set(entries) if isinstance(entries, list) else None


def _why_not_replaceable(path: str) -> Optional[str]:
    """None when `force` may replace the non-empty directory `path`, else why not."""
    entries = _written_entries(path)
    if entries is None:
        return f"was not written by lpt_kernels (no {MARKER} in it); refusing to replace it even with --force: " \
               "choose another path (or remove it yourself)"
    extra = sorted(e for e in os.listdir(path) if e != MARKER and e not in entries
                   and _written_entries(os.path.join(path, e)) is None)
    if extra:
        return (f"holds entries lpt_kernels did not write there ({', '.join(extra[:3])}"
                f"{', ...' if len(extra) > 3 else ''}); refusing to replace it even with --force: move them out or "
                "choose another path")
    return None


def replace_file(path: PathLike, write: Callable[[str], None]) -> str:
    """Write `path` through ``write(tmp)`` into a temp file beside it, give it the default mode and move it over
    `path`: readers never see a partial file. An existing file is replaced (the Python API's ``save`` methods
    overwrite, like ``save_pretrained``; the CLI checks its outputs with :func:`check_output` first)."""
    d, name = os.path.split(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=d)
    os.close(fd)
    try:
        write(tmp)
        set_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return os.fspath(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: PathLike) -> None:
    """Give a file made by ``tempfile.mkstemp`` (0600) the mode a plain ``open`` would (0666 less the umask), so
    that shared checkpoints and results stay readable by the group and others as the user's umask says."""
    os.chmod(path, 0o666 & ~_umask())


# ---------------------------------------------------------------------------------------------------------------
# primitives

_libc = None


def _renameat2(src: str, dst: str, flags: int) -> Optional[int]:
    """renameat2(2) with `flags`: None on success, else the errno (ENOSYS where libc lacks the call)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return errno.ENOSYS
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return None
    return ctypes.get_errno()


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with EEXIST instead of replacing anything (even an empty directory) created at `dst`
    meanwhile: renameat2(RENAME_NOREPLACE) where libc and the filesystem have it, else a check and a rename."""
    e = _renameat2(src, dst, _RENAME_NOREPLACE)
    if e is None:
        return
    if e not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: the filesystem does not support the flag
        raise OSError(e, os.strerror(e), dst)
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one step (renameat2 RENAME_EXCHANGE); False where unsupported."""
    e = _renameat2(a, b, _RENAME_EXCHANGE)
    if e is None:
        return True
    if e in (errno.EINVAL, errno.ENOSYS):
        return False
    raise OSError(e, os.strerror(e), b)


def _fsync(path: str, flag: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, flag, 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: a rename or a new file in it is durable after this)."""
    _fsync(path, "O_DIRECTORY")


def _fsync_file(path: str) -> None:
    _fsync(path, "O_CLOEXEC")


def _fsync_tree(root: str) -> None:
    """fsync every regular file under root, then every directory, deepest first."""
    dirs = []
    for d, _, names in os.walk(root, followlinks=False):
        dirs.append(d)
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                _fsync_file(p)
    for d in sorted(dirs, key=len, reverse=True):
        fsync_dir(d)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(name: str) -> str:
    """The hidden temp name of an output called `name`: ``.NAME.tmp-PID-XXXXXXXX``."""
    return f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale(parent: str, name: str) -> List[str]:
    """Remove ``.NAME.tmp-PID-XXXXXXXX`` files and directories of earlier writes to the same output whose process
    is gone (a killed run); a live process's are kept. Returns the paths removed."""
    pat = re.compile(r"^\." + re.escape(name) + r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}$")
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for e in entries:
        m = pat.match(e)
        if m and not _pid_alive(int(m.group(1))):
            p = os.path.join(parent, e)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# checks before any work


def is_checkpoint_dir(path: PathLike) -> Optional[str]:
    """The name of a weights file (or index) that makes `path` a checkpoint directory, or None."""
    try:
        for n in sorted(os.listdir(path)):
            if _CKPT_FILES.search(n) and n not in _OWN_OUTPUTS:
                return n
    except OSError:
        return None
    return None


def _under(a: str, b: str) -> bool:
    """a is b or inside b (real paths)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_output(path: PathLike, *, kind: str = "dir", force: bool = False, inputs: Iterable[PathLike] = (),
                 what: str = "--out") -> str:
    """Validate an output path before any work; returns its absolute path.

    - ``kind="dir"``: a missing path or an empty directory is fine; an existing file is refused; a non-empty
      directory or a checkpoint directory is refused unless ``force`` (then it is replaced when the new output is
      complete), and even with ``force`` unless it is an earlier output of this package holding nothing else
      (its :data:`MARKER` lists what was written; entries that are such outputs themselves are allowed).
    - ``kind="file"``: a missing path is fine; an existing file is refused unless ``force``; a directory is refused.
    - Always refused: the path of an input (``inputs``: checkpoints, profiles the command reads), a path inside one,
      or a path above one (replacing it would delete the input).

    Raises :class:`OutputError` naming the path (``what`` is how the message calls it, e.g. ``--out``).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise OutputError(f"{what}: expected a path, got {path!r}")
    p = os.path.abspath(os.fspath(path))
    name = os.path.basename(p)
    if not name or name in (".", ".."):
        raise OutputError(f"{what}: {path} does not name a {'directory' if kind == 'dir' else 'file'}")
    real = os.path.realpath(p)
    for i in inputs:
        if i is None:
            continue
        ri = os.path.realpath(os.fspath(i))
        if _under(real, ri) or _under(ri, real):
            rel = "is" if real == ri else ("is inside" if _under(real, ri) else "contains")
            raise OutputError(f"{what}: {path} {rel} the input {os.fspath(i)}; refusing to write there "
                              f"(even with --force): choose another path")
    again = "; choose another path, or --force to replace it"
    if kind == "dir":
        if os.path.isdir(p):
            try:
                entries = os.listdir(p)
            except OSError as e:
                raise OutputError(f"{what}: cannot read {path} ({e.strerror})") from None
            if entries and not force:
                ck = is_checkpoint_dir(p)
                if ck:
                    raise OutputError(f"{what}: {path} is a checkpoint directory (it holds {ck}){again}")
                raise OutputError(f"{what}: {path} already exists and is not empty{again}")
            why = _why_not_replaceable(p) if entries else None
            if why:
                raise OutputError(f"{what}: {path} {why}")
        elif os.path.lexists(p):
            raise OutputError(f"{what}: {path} is an existing file, not a directory; choose a directory path")
    elif kind == "file":
        if os.path.isdir(p):
            raise OutputError(f"{what}: {path} is a directory; give a file path")
        if os.path.lexists(p) and not force:
            raise OutputError(f"{what}: {path} already exists{again}")
    else:
        raise ValueError(f"kind: expected 'dir' or 'file', got {kind!r}")
    parent = os.path.dirname(p)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise OutputError(f"{what}: {parent} is a file, not a directory")
    return p


# ---------------------------------------------------------------------------------------------------------------
# directories


class AtomicDir:
    """Build a directory under a temp name beside `out` and move it into place when complete.

    ::

        with AtomicDir("prof/", force=False, inputs=checkpoints) as tmp:
            write files into tmp
        # prof/ now holds exactly what was written, fsynced; on an exception nothing changed at prof/

    The checks of :func:`check_output` run in the constructor (call it before any heavy work). On entering, stale
    temp directories of killed runs to the same output are removed (:attr:`stale_removed`) and the temp directory is
    made (:attr:`path`). On a clean exit, :meth:`commit`: every file and directory is fsynced, and the temp
    directory is renamed to `out` (no-replace; an empty directory at `out` is replaced; with ``force`` a non-empty
    one is swapped out in one step and deleted), and the parent is fsynced. On an exception (KeyboardInterrupt
    included), :meth:`abort` removes the temp directory. Where something appeared at `out` meanwhile that may not
    be replaced, :class:`OutputError` is raised and the temp directory removed.
    """

    def __init__(self, out: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = (), what: str = "--out"):
        self.out = check_output(out, kind="dir", force=force, inputs=inputs, what=what)
        self.force = force
        self.what = what
        self.parent, self.name = os.path.split(self.out)
        self.path: Optional[str] = None
        self.stale_removed: List[str] = []
        self.committed = False

    def open(self) -> str:
        """Remove stale temps of killed runs, make the temp directory (and `out`'s parent); returns its path."""
        try:
            os.makedirs(self.parent, exist_ok=True)
            self.stale_removed = remove_stale(self.parent, self.name)
            self.path = os.path.join(self.parent, temp_name(self.name))
            os.mkdir(self.path)
        except OSError as e:
            self.path = None
            raise OutputError(f"{self.what}: cannot write {self.out} ({e.strerror or e}); nothing was written") from None
        return self.path

    def __enter__(self) -> str:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    def abort(self) -> None:
        """Remove the temp directory (nothing at `out` changes)."""
        if self.path is not None and not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> str:
        """fsync everything, move the temp directory to `out`; returns `out`."""
        if self.path is None:
            raise RuntimeError("AtomicDir.commit: open() was not called")
        try:
            from lpt_kernels import __version__

            entries = sorted(e for e in os.listdir(self.path) if e != MARKER)
            with open(os.path.join(self.path, MARKER), "w") as f:
                json.dump({"written_by": f"lpt_kernels {__version__}", "entries": entries}, f)
            _fsync_tree(self.path)
            self._swap_in()
            fsync_dir(self.parent)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.what}: cannot write {self.out} ({e.strerror or e}); nothing was written "
                              "there") from None
        except BaseException:
            self.abort()
            raise
        self.committed = True
        return self.out

    def _swap_in(self) -> None:
        tmp, out = self.path, self.out
        try:
            rename_noreplace(tmp, out)
            return
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
        # something is at out: an empty directory may be replaced (rename(2) does that atomically, and fails if it
        # is no longer empty); a non-empty one only with force
        if os.path.isdir(out) and not os.path.islink(out):
            try:
                os.rename(tmp, out)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if self.force:
                if _exchange(tmp, out):  # tmp now holds the old output
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                old = os.path.join(self.parent, f".{self.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
                os.rename(out, old)
                rename_noreplace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
                return
            raise OutputError(f"{self.what}: {out} was filled by something else while this ran; left it alone "
                              f"(nothing written; --force replaces it)")
        raise OutputError(f"{self.what}: {out} appeared (not as a directory) while this ran; left it alone "
                          f"(nothing written)")


# ---------------------------------------------------------------------------------------------------------------
# files


@contextlib.contextmanager
def atomic_file(path: PathLike, *, force: bool = False, inputs: Sequence[PathLike] = (),
                what: str = "--out") -> Iterator[str]:
    """Write one file atomically: yields a temp path beside `path` to write to (by any means: ``open``,
    ``save_file``, ``savefig``); on a clean exit the file is fsynced and moved to `path` — without replacing an
    existing file unless ``force`` — and the directory fsynced. On an exception the temp file is removed.
    The checks of :func:`check_output` (``kind="file"``) run first."""
    out = check_output(path, kind="file", force=force, inputs=inputs, what=what)
    parent, name = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what}: cannot write {path} ({e.strerror or e}); nothing was written") from None
    remove_stale(parent, name)
    tmp = os.path.join(parent, temp_name(name))
    ok = False
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise OutputError(f"{what}: nothing was written for {path}")
        _fsync_file(tmp)
        if force:
            if os.path.isdir(out):
                raise OutputError(f"{what}: {path} became a directory while this ran; left it alone")
            os.replace(tmp, out)
        else:
            try:
                rename_noreplace(tmp, out)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    raise OutputError(f"{what}: {path} appeared while this ran; left it alone (--force replaces "
                                      f"it)") from None
                raise
        fsync_dir(parent)
        ok = True
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
