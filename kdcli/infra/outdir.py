"""Output directories (``--out``): checked before anything runs, replaced atomically, never clobbered.

- :func:`check_out` refuses an ``--out`` that cannot become a directory (a file in the way, a parent that is a
  file, a place where no directory can be made, e.g. ``/proc/self/x``) with one line, exit 2, before any work.
- ``--overwrite`` never deletes first. The new output is built in a sibling staging directory
  (:func:`staging_dir`, ``.NAME.kdcli-new``) and swapped in only when the command has succeeded
  (:func:`swap_in`: one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux, then the old output is removed), so a
  failed or interrupted replacement leaves the old output exactly as it was.
- A directory kdcli did not write is never replaced or emptied: each command knows its own outputs
  (``is_output``: a run dir, a cache, a compressed run) and refuses anything else, naming it.
- :func:`remove_stale` removes the hidden staging / ``.partial`` directories a killed command left next to
  ``--out`` (their owner is dead) when the next command on that ``--out`` starts.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from kdcli.infra import log
from kdcli.infra.atomic import fsync_dir
from kdcli.infra.errors import UsageError
from kdcli.infra.lock import LOCK, pid_alive

STAGING_SUFFIX = ".kdcli-new"
_PID_PARTIAL = re.compile(r"\.(?P<pid>\d+)-[0-9a-f]+\.partial$")


def check_out(out: Path, flag: str = "--out") -> None:
    """Refuse (exit 2) an output path that is a file, lies under a file, or cannot be created; nothing is
    created here."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} exists and is not a directory")
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent != out and not parent.is_dir():
        raise UsageError(f"{flag} {out}: {parent} is a file, not a directory; choose another {flag}")
    if parent != out and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: cannot create a directory under {parent} (not writable)")


def make_dir(out: Path, flag: str = "--out") -> bool:
    """``mkdir -p out`` with the failure as one line (exit 2); returns True when it did not exist before."""
    check_out(out, flag)
    existed = out.is_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot create the directory ({e.strerror or e.__class__.__name__})") from None
    return not existed


def staging_dir(out: Path) -> Path:
    """Where a replacement of ``out`` is built: a hidden sibling, on the same filesystem (so the swap is a rename)."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux >= 3.15, glibc >= 2.28); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def swap_in(staged: Path, out: Path) -> None:
    """Put the finished ``staged`` directory at ``out`` and remove the output it replaces.

    With ``renameat2(RENAME_EXCHANGE)`` the two directories trade places in one atomic step: at every instant
    ``out`` is either the whole old output or the whole new one. Without it (not Linux, an old kernel), ``out`` is
    renamed aside first: a crash between the two renames leaves the old output at ``.NAME.kdcli-old``."""
    staged, out = Path(staged), Path(out)
    if not out.exists():
        os.replace(staged, out)
    elif _renameat2_exchange(staged, out):
        shutil.rmtree(staged, ignore_errors=True)  # the old output, now at the staging name
    else:
        old = out.parent / f".{out.name}.kdcli-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def remove_stale(out: Path) -> list[Path]:
    """Hidden leftovers of killed commands next to ``out``: ``.NAME.PID-HEX.partial`` directories of dead pids
    (compress) and the ``.NAME.kdcli-old`` of an interrupted swap. Staging directories (``.NAME.kdcli-new``) are
    left to the command that resumes or replaces them. Returns what was removed."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{glob_escape(out.name)}.*"):
        m = _PID_PARTIAL.search(p.name)
        stale = (m is not None and not pid_alive(int(m["pid"]))) or p.name == f".{out.name}.kdcli-old"
        if stale and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info(
            f"removed {len(removed)} leftover director{'y' if len(removed) == 1 else 'ies'} of an interrupted "
            f"run next to {out} ({removed[0].name}{', ...' if len(removed) > 1 else ''})"
        )
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def empty_dir(d: Path, is_own: Callable[[Path], bool], what: str) -> None:
    """Remove everything in ``d`` but its lock (the caller holds it): a staging directory left by an earlier
    attempt that is not resumed. Refused (exit 2) unless ``is_own(d)``: only what kdcli writes is ever deleted."""
    if not is_own(d):
        raise UsageError(f"{d} is in the way of {what} and does not look like kdcli's; move it away")
    for p in d.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
