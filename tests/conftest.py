import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

# One intra-op thread: tiny models gain nothing from more, and several test processes share 2 cores.
torch.set_num_threads(1)

# Ctrl-C tests send SIGINT to kdcli subprocesses. A suite started in the background of a non-interactive shell
# inherits SIGINT *ignored*, Python then installs no Ctrl-C handler, and every child inherits the ignore (the
# interrupted run would finish with exit 0). A handler here resets to the default at the children's exec.
signal.signal(signal.SIGINT, signal.default_int_handler)


def make_blobs(n: int = 600, d: int = 8, classes: int = 4, seed: int = 0, noise: float = 1.0):
    """Gaussian blobs: a small, learnable, non-trivial classification set."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, size=(classes, d))
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(0, noise, size=(n, d))
    return x.astype(np.float32), y.astype(np.int64)


def divergence_reference(t, s, T, divergence="forward", beta=0.5):
    """Per row, the divergence between teacher and student logits at T through torch.distributions, in float64:
    forward KL(p || q), reverse KL(q || p) or the generalised JSD with weight beta (the independent reference for
    the losses' tests)."""
    p, q = Categorical(logits=t.double() / T), Categorical(logits=s.double() / T)
    if divergence == "forward":
        return kl_divergence(p, q)
    if divergence == "reverse":
        return kl_divergence(q, p)
    m = Categorical(probs=beta * p.probs + (1 - beta) * q.probs)
    return beta * kl_divergence(p, m) + (1 - beta) * kl_divergence(q, m)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module, restored after it: tiny models gain nothing from more, runs stay bitwise
    comparable with the subprocesses (OMP_NUM_THREADS=1), and with two threads each op waits on a busy shared CPU
    (measured: a 27-step run took 0.4 s on 1 thread, 8.7 s on 2 under load; ~100x slower for tiny ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def blobs_npz(tmp_path: Path) -> Path:
    x, y = make_blobs()
    p = tmp_path / "blobs.npz"
    np.savez(p, x=x, y=y)
    return p


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None, check: bool = False
) -> subprocess.CompletedProcess:
    """Run kdcli as a CI shell script would: a real subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "kdcli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kdcli {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.fixture
def teacher_run(tmp_path: Path, blobs_npz: Path) -> Path:
    """A small MLP teacher trained on the blobs with kdcli itself (a run dir)."""
    from kdcli.config import TrainConfig
    from kdcli.stages.train import train_student

    out = tmp_path / "teacher"
    train_student(
        TrainConfig(
            student="mlp", student_args={"hidden": [32]}, data=str(blobs_npz), out=str(out), epochs=3, lr=3e-3, seed=0
        )
    )
    return out
