"""TEST-ONLY fault injection at named points of the write paths. Never set this in real use.

``KDCLI_TEST_KILL_AT=POINT:N[:ACTION]`` makes the process act the N-th time (1-based) it reaches ``POINT``:

- ``KILL`` (default): ``SIGKILL`` itself -- a crash at exactly that instant, nothing runs after it
- ``INT`` / ``TERM``: send itself SIGINT / SIGTERM (Ctrl-C; the normal interrupt path then runs)
- ``STOP``: SIGSTOP itself, frozen at that point (holding its lock) until the test sends SIGCONT or SIGKILL
- ``ENOSPC``: raise ``OSError(ENOSPC)`` there, as a full disk would

Points (see where :func:`reached` is called):

- ``teacher-batch``        cache-teacher: a teacher batch was handed to the shard writer
- ``shard-partial``        a shard's datasets are written to ``shard-*.h5.partial``, the file is still open
- ``shard-renamed``        a shard is at its final name, the manifest does not list it yet
- ``shard-published``      a shard is listed in the rewritten manifest (``complete: false``)
- ``NAME.partial``         any file written by ``atomic_write_bytes`` (``manifest.json``, ``checkpoint.pt``,
                           ``model.safetensors``, ...): the new content is on disk under ``NAME.partial``, not yet
                           renamed over ``NAME``
- ``train-step``           train-student: an optimizer step finished

The tests in tests/test_reliability.py, tests/test_resume.py and tests/test_bad_inputs.py use this to crash
real ``python -m kdcli`` processes at exact, reproducible instants. When the variable is unset (always, outside
the tests) :func:`reached` is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

ENV = "KDCLI_TEST_KILL_AT"
_counts: dict[str, int] = {}
_lock = threading.Lock()


def reached(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    nth, _, action = rest.partition(":")
    with _lock:
        _counts[point] = _counts.get(point, 0) + 1
        hit = _counts[point] == int(nth or 1)
    if not hit:
        return
    action = (action or "KILL").upper()
    if action == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (simulated by " + ENV + ")")
    signals = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP}
    os.kill(os.getpid(), signals[action])


def reset() -> None:
    """Forget how often each point was reached (for tests that run kdcli in-process several times)."""
    with _lock:
        _counts.clear()
