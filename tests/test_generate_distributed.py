"""``cache-teacher --generate`` with a sampled teacher in real processes: a run SIGKILLed after its 2nd shard and
resumed by 2 torchrun processes (at the same ``--batch-size``; they split the 3 remaining shards 1 + 2) writes the
answers and the cache that one uninterrupted process writes, byte for byte. (In-process interruptions after 0, 1
and 2 shards and re-runs: tests/test_generate_cli.py.) Two launches, one of them torchrun: ~25 s here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from generate_helpers import PERSONA, prompt_rows, word_teacher, write_jsonl
from test_generate_cli import shard_arrays
from typer.testing import CliRunner

from kdcli.cache.manifest import read_manifest
from kdcli.cli import app

pytest.importorskip("transformers")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ARGS = [
    "--generate", "--sample", "--seed", 11, "--gen-temperature", 1.2, "--generations-per-prompt", 2,
    "--max-new-tokens", 5, "--max-length", 64, "--mode", "sample", "--samples", 5, "--shard-size", 4,
    "--batch-size", 3, "--teacher-prompt", PERSONA,
]  # fmt: skip


def kdcli(*args, torchrun: bool = False, kill_at: str | None = None, ok: bool = True) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["KDCLI_TEST_KILL_AT"] = kill_at
    cmd = [*TORCHRUN, "-m", "kdcli"] if torchrun else [sys.executable, "-m", "kdcli"]
    p = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert (p.returncode == 0) == ok, p.stderr[-3000:]
    return p.stderr


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("gendist")
    word_teacher(d)
    write_jsonl(d / "prompts.jsonl", prompt_rows(9))  # 18 answers: 5 shards of 4, batches of 3 within them
    # the reference in this process (one thread, as the subprocesses run): what one uninterrupted process writes
    r = CliRunner().invoke(
        app, [str(a) for a in ("cache-teacher", "--teacher", d / "wteacher", "--data", d / "prompts.jsonl", "--out",
                               d / "one", *ARGS)]
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr[-2000:]
    return d


def assert_same(a, b) -> None:
    assert (a / "answers.jsonl").read_bytes() == (b / "answers.jsonl").read_bytes()
    x, y = shard_arrays(a), shard_arrays(b)
    assert set(x) == set(y) and "sample_ids" in x and "answer_json" in x
    for k in x:
        assert (x[k] == y[k]).all(), k
    assert read_manifest(a)["data"] == {**read_manifest(b)["data"], "spec": read_manifest(a)["data"]["spec"]}


def test_killed_after_two_shards_then_resumed_with_two_processes(ws):
    cmd = ["cache-teacher", "--teacher", ws / "wteacher", "--data", ws / "prompts.jsonl", "--out", ws / "k", *ARGS]
    kdcli(*cmd, kill_at="shard-published:2", ok=False)
    assert len(read_manifest(ws / "k", require_complete=False)["shards"]) == 2
    assert not (ws / "k" / "answers.jsonl").exists()
    err = kdcli(*cmd, torchrun=True)
    assert "2 whole shard(s) found" in err
    assert_same(ws / "one", ws / "k")
