"""Atomic publication: write ``*.partial``, flush, fsync, ``os.replace``, fsync the directory.

A reader (or a resumed writer) only ever sees whole files at final names: a process killed at any instant leaves
either the old file, the new file, or a ``*.partial`` leftover that is cleaned up on the next run.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kdcli.infra import crashpoints

PARTIAL = ".partial"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some filesystems do not support fsync on directories
        pass


def replace_atomically(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final`` and fsync the directory."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    tmp = final.with_name(final.name + PARTIAL)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crashpoints.reached(final.name + PARTIAL)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def is_disk_full(e: BaseException) -> bool:
    """True for the OS errors a full disk, a quota or a file-size limit produce (h5py may hide the errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)  # torch.save / safetensors / h5py wrap the OS error in their own exception types
    return isinstance(e, Exception) and any(
        s in text
        for s in (
            "No space left",
            "Disk quota exceeded",
            "File too large",
            "errno = 28",
            "errno = 27",
            "os error 28",
            "os error 27",
        )
    )


def remove_partials(directory: Path) -> list[Path]:
    removed = []
    for p in sorted(directory.glob("*" + PARTIAL)):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
