"""train-student killed mid-epoch (a real process, SIGKILL or Ctrl-C), then re-run: the final weights and metrics
equal an uninterrupted run's, bit for bit, on the CPU.

The run exercises everything a resume must restore: AdamW moments, a warmup + cosine schedule, dropout (torch RNG),
a held-out validation split, the cache reader's shuffled block order and the position inside the epoch. Crashes
come from the test-only hook in kdcli/infra/crashpoints.py (``KDCLI_TEST_KILL_AT``).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import make_blobs
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import CacheConfig
from kdcli.stages.cache import cache_teacher
from kdcli.stages.train import CHECKPOINT

STEPS_PER_EPOCH = 9  # 540 training rows (600 minus a 10% validation split) / batch 64, rounded up
TIMING = ("seconds", "rows_per_second")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread, for every test here


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("resume")
    x, y = make_blobs(n=600)
    np.savez(d / "blobs.npz", x=x, y=y)
    r = CliRunner().invoke(
        app,
        [
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[32]",
            "--data",
            str(d / "blobs.npz"),
            "--out",
            str(d / "teacher"),
            "--epochs",
            "2",
        ],
    )
    assert r.exit_code == 0, r.stderr
    cache_teacher(
        CacheConfig(teacher=str(d / "teacher"), data=str(d / "blobs.npz"), out=str(d / "cache"), shard_size=128)
    )
    return d


def train_args(ws, out, with_cache: bool) -> list[str]:
    args = [
        "train-student",
        "--student",
        "mlp",
        "--student-arg",
        "hidden=[32]",
        "--student-arg",
        "dropout=0.3",
        "--data",
        ws / "blobs.npz",
        "--out",
        out,
        "--epochs",
        3,
        "--batch-size",
        64,
        "--lr",
        3e-3,
        "--schedule",
        "cosine",
        "--warmup-steps",
        3,
        "--val-fraction",
        0.1,
        "--seed",
        7,
        "--checkpoint-every",
        4,
    ]
    if with_cache:
        args += ["--cache", ws / "cache", "--temperature", 3, "--alpha", 0.7]
    return [str(a) for a in args]


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def env() -> dict:
    # the killed subprocess must compute exactly what this process computes: same intra-op thread count
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(ws):
    """Uninterrupted runs (one with the cache, one on labels alone)."""
    runs = {}
    for with_cache in (True, False):
        out = ws / f"ref-{with_cache}"
        r = invoke(train_args(ws, out, with_cache))
        assert r.exit_code == 0, r.stderr
        runs[with_cache] = out
    return runs


def metrics(run) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def assert_same_run(a, b) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    assert metrics(a) == metrics(b)
    assert sorted(p.name for p in b.iterdir()) == [
        "config.yaml",
        "metrics.jsonl",
        "model.json",
        "model.safetensors",
        "summary.json",
    ]


# (kill point, the checkpoint's global step the re-run continues from, checkpoint.pt.partial left, with a cache)
KILLS = {
    "distill: SIGKILL mid-epoch 2, after the step-12 checkpoint": ("train-step:14", 12, False, True),
    "distill: SIGKILL while writing the step-8 checkpoint": ("checkpoint.pt.partial:2", 4, True, True),
    "distill: SIGKILL right after the epoch-1 checkpoint": ("train-step:10", 9, False, True),
    "labels only: SIGKILL mid-epoch 2, after the step-12 checkpoint": ("train-step:14", 12, False, False),
}


@pytest.fixture(scope="module")
def killed(ws):
    """Every kill scenario started at once (independent processes and run dirs): their imports overlap."""
    runs = {}
    plan = {
        **{where: (point, with_cache) for where, (point, _, _, with_cache) in KILLS.items()},
        "for the different-settings test": ("train-step:6", True),
    }
    for i, (where, (point, with_cache)) in enumerate(plan.items()):
        out = ws / f"killed-{i}"
        runs[where] = (
            subprocess.Popen(
                [sys.executable, "-m", "kdcli", *train_args(ws, out, with_cache)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **env(), "KDCLI_TEST_KILL_AT": point},
            ),
            out,
        )
    yield runs
    for p, _ in runs.values():
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.parametrize("where", list(KILLS))
def test_sigkill_then_rerun_equals_uninterrupted(ws, killed, reference, where):
    point, from_step, partial_left, with_cache = KILLS[where]
    p, out = killed[where]
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    assert (out / (CHECKPOINT + ".partial")).exists() == partial_left
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == from_step
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()

    r = invoke(train_args(ws, out, with_cache))  # the same command again: it resumes by itself
    assert r.exit_code == 0, r.stderr
    epoch, step = from_step // STEPS_PER_EPOCH, from_step % STEPS_PER_EPOCH
    assert f"at epoch {epoch + 1}, step {step} of {STEPS_PER_EPOCH} (global step {from_step})" in r.stderr
    assert_same_run(reference[with_cache], out)
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == from_step


def test_sigterm_mid_epoch_exits_130_then_resume_flag_continues(ws, reference, tmp_path):
    """A scheduler's SIGTERM (preemption) is handled like Ctrl-C: exit 130, whole files only; --resume goes on."""
    out = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "kdcli", *train_args(ws, out, True)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env(), "KDCLI_TEST_KILL_AT": "train-step:19:STOP"},
    )
    t0 = time.monotonic()
    while True:  # wait until it froze itself at step 19 (epoch 3), then preempt it
        pid, status = os.waitpid(p.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            break
        assert not pid and time.monotonic() - t0 < 120, "train-student never reached step 19"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGTERM)
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in err
    assert sorted(x.name for x in out.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]
    assert torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)["global_step"] == 18
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # epochs 1 and 2 finished

    r = invoke(train_args(ws, out, True) + ["--resume"])
    assert r.exit_code == 0, r.stderr
    assert "at epoch 3, step 0 of 9 (global step 18)" in r.stderr
    assert_same_run(reference[True], out)


def test_resume_with_different_settings_is_refused_and_keeps_the_checkpoint(ws, killed):
    p, out = killed["for the different-settings test"]  # SIGKILLed at step 6, checkpoint at step 4
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    before = {x.name: x.read_bytes() for x in out.iterdir() if x.is_file() and x.name != ".lock"}
    args = train_args(ws, out, True)
    args[args.index("--lr") + 1] = "1e-2"
    r = invoke(args)
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {out} holds a checkpoint from a run with different "
        "settings; use the same options to resume, or --overwrite to start "
        "over"
    )
    assert {x.name: x.read_bytes() for x in out.iterdir() if x.is_file() and x.name != ".lock"} == before
