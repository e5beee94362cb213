"""``--overwrite`` replaces atomically: the new output is built beside the old one and swapped in only when the
command succeeds (kdcli/infra/outdir.py). A replacement that fails or is killed leaves the old output byte for byte;
re-running it resumes (cache-teacher; train-student with --resume) or starts over; leftovers of killed commands
are removed by the next one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_blobs
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.infra.outdir import staging_dir

runner = CliRunner()


def tree(d: Path) -> dict[str, str]:
    """The content of an output directory (a killed writer's stale .lock aside: the next writer takes it over)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def ok(*args) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr[-2000:]


def kdcli_process(*args, kill_at: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdcli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "KDCLI_TEST_KILL_AT": kill_at},
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread) -> Path:
    d = tmp_path_factory.mktemp("ow")
    x, y = make_blobs(n=600)
    np.savez(d / "blobs.npz", x=x, y=y)
    ok("train-student", "--student", "mlp", "--data", d / "blobs.npz", "--out", d / "teacher", "--epochs", 2)
    return d


def test_a_killed_cache_replacement_leaves_the_old_cache_and_resumes(ws, tmp_path):
    common = ["cache-teacher", "--teacher", ws / "teacher", "--data", ws / "blobs.npz", "--shard-size", 128]
    base = [*common, "--out", tmp_path / "c"]
    ok(*base)
    before = tree(tmp_path / "c")
    p = kdcli_process(*base, "--top-k", 2, "--overwrite", kill_at="shard-published:2")  # SIGKILL after 2 shards
    assert p.returncode == -9, p.stderr
    assert tree(tmp_path / "c") == before  # the old cache is untouched
    stage = staging_dir(tmp_path / "c")
    assert len(list(stage.glob("shard-*.h5"))) == 2
    r = runner.invoke(app, [str(a) for a in base] + ["--top-k", "2", "--overwrite"])
    assert r.exit_code == 0, r.stderr
    assert "continuing the replacement" in r.stderr and "skipping 256 of 600 rows" in r.stderr
    assert not stage.exists() and json.loads((tmp_path / "c" / "manifest.json").read_text())["mode"] == "topk"
    ok("cache", "verify", tmp_path / "c")
    ok(*common, "--top-k", 2, "--out", tmp_path / "fresh")  # the resumed replacement equals a fresh cache

    def shards(d: Path) -> dict:
        return {s["name"]: s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]}

    assert shards(tmp_path / "c") == shards(tmp_path / "fresh")


def test_a_failed_run_replacement_leaves_the_old_run(ws, tmp_path):
    run = tmp_path / "run"
    base = ["train-student", "--student", "mlp", "--data", ws / "blobs.npz", "--out", run, "--epochs", 2]
    ok(*base)
    before = tree(run)
    r = runner.invoke(app, [str(a) for a in base] + ["--overwrite", "--lr", "1e30", "--optimizer", "sgd"])
    assert r.exit_code == 4 and "training diverged" in r.stderr
    assert tree(run) == before and not staging_dir(run).exists()
    p = kdcli_process(*base, "--overwrite", "--seed", 3, "--checkpoint-every", 2, kill_at="train-step:7")
    assert p.returncode == -9
    assert tree(run) == before and (staging_dir(run) / "checkpoint.pt").exists()
    r = runner.invoke(
        app, [str(a) for a in base] + ["--overwrite", "--seed", "3", "--checkpoint-every", "2", "--resume"]
    )
    assert r.exit_code == 0, r.stderr
    assert "continuing the replacement" in r.stderr and "resuming" in r.stderr
    assert not staging_dir(run).exists() and tree(run) != before
    assert json.loads((run / "summary.json").read_text())["run_dir"] == str(run)
    assert sorted(p.name for p in run.iterdir()) == [
        "config.yaml",
        "metrics.jsonl",
        "model.json",
        "model.safetensors",
        "summary.json",
    ]


def test_a_failed_first_run_leaves_no_directory(ws, tmp_path):
    """A command that fails before it has anything to resume from leaves no half-made --out behind."""
    r = runner.invoke(
        app,
        [
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=oops",
            "--data",
            str(ws / "blobs.npz"),
            "--out",
            str(tmp_path / "new"),
        ],
    )
    assert r.exit_code == 2 and not (tmp_path / "new").exists()


def test_compress_overwrite_and_stale_partials(ws, tmp_path):
    out = tmp_path / "small"
    ok("compress", "--model", ws / "teacher", "--out", out, "--quantize", "int8")
    first = tree(out)
    dead = tmp_path / f".small.{2**22 + 12345}-deadbeef.partial"  # a killed compress's temp dir (no such pid)
    dead.mkdir()
    (dead / "model.json").write_text("{}")
    r = runner.invoke(app, ["compress", "--model", str(ws / "teacher"), "--out", str(out), "--prune", "0.5"])
    assert r.exit_code == 2 and "pass --overwrite" in r.stderr and tree(out) == first
    ok("compress", "--model", ws / "teacher", "--out", out, "--prune", "0.5", "--overwrite")
    assert tree(out) != first and not dead.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".small")]
