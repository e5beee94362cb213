"""One writer per cache directory: an exclusive ``.lock`` file holding the owner's host and pid.

A second writer refuses at once (exit 3). A lock left by a dead process on this host (pid gone) is stale and is
taken over, with a note on stderr.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from kdcli import log
from kdcli.errors import CacheError

LOCK = ".lock"


def _alive(pid: int) -> bool:
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

    def acquire(self) -> "DirLock":
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                    log.warn(f"taking over a stale lock on {self.path.parent} left by dead process "
                             f"{owner.get('pid')}")
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise CacheError(f"{self.path.parent} is being written by {who}; wait for it to finish (or delete "
                                 f"{self.path} if that process is gone)") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise CacheError(f"could not lock {self.path.parent}")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
