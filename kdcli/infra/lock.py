"""One writer per cache (or run) directory: a ``.lock`` file holding the owner's host and pid.

The file is held with an exclusive ``flock`` for the life of the writer, so the kernel releases it the instant the
owner dies, even by SIGKILL. A second writer refuses at once (exit 3). A lock file left behind by a dead process is
stale: the next writer gets the ``flock``, says so on stderr and takes it over (no pid-reuse false alarms, no race
between two processes taking over the same stale lock). Where ``flock`` is unavailable, a lock whose recorded pid
is gone on this host is taken over instead.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from kdcli.infra import log
from kdcli.infra.errors import CacheError

LOCK = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        if fcntl is None:
            return self._acquire_by_pid(me)
        for _ in range(20):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                self._refuse(self._owner())
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner unlinked it between our open and flock: lock the new file
                os.close(fd)
                continue
            owner = self._owner()
            if owner and owner.get("pid") not in (None, me["pid"]):
                log.warn(
                    f"taking over a stale lock on {self.path.parent} left by process {owner.get('pid')} on "
                    f"{owner.get('host')}, which is gone"
                )
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            self._fd, self.held = fd, True
            return self
        raise CacheError(f"could not lock {self.path.parent}")

    def _acquire_by_pid(self, me: dict) -> DirLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and not pid_alive(int(owner.get("pid", -1))):
                    log.warn(f"taking over a stale lock on {self.path.parent} left by dead process {owner.get('pid')}")
                    self.path.unlink(missing_ok=True)
                    continue
                self._refuse(owner)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise CacheError(f"could not lock {self.path.parent}")

    def _refuse(self, owner: dict | None) -> None:
        who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
        raise CacheError(
            f"{self.path.parent} is being written by {who}; wait for it to finish (or delete "
            f"{self.path} if that process is gone)"
        ) from None

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)  # unlinked while still flock-ed: see the inode check in acquire
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
