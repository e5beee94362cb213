"""Cross-tokenizer training as a user runs it at scale: a run SIGKILLed mid-epoch resumes to the weights of the
uninterrupted run (the epoch's order of student rows and the teacher's targets are functions of the seed), and a
2-process torchrun (DDP, gloo) run finishes with equal replicas (the stage checks them) and is read by eval.

Tiny data: a BPE teacher tokenizer, a random 2-layer Llama teacher (tests/lm_helpers.py) and a student with its own
270-token BPE; the launches are real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcli.cli import app

pytest.importorskip("transformers")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("xscale")
    tok = make_tokenizer(d / "tok")
    teacher = make_llama(d / "teacher", tok)
    text = write_jsonl(d / "text.jsonl", text_rows(24))
    r = CliRunner().invoke(
        app,
        ["cache-teacher", "--teacher", str(teacher), "--data", str(text), "--out", str(d / "c"), "--top-k", "8"]
        + ["--max-length", "32", "--temperatures", "2", "--shard-size", "8"],
    )
    assert r.exit_code == 0, r.stderr
    train = [
        "train-student",
        "--student",
        "transformer",
        "--student-arg",
        "d_model=16",
        "--student-arg",
        "n_layers=1",
        "--student-arg",
        "n_heads=2",
        "--tokenizer",
        str(make_tokenizer(d / "tok2", 270)),
        "--data",
        str(text),
        "--cache",
        str(d / "c"),
        "--cross-tokenizer",
        "hybrid",
        "--temperature",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--seed",
        "1",
    ]
    return {"dir": d, "text": text, "train": train}


def launch(argv: list[str], extra_env: dict | None = None, torchrun: bool = False) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "-m", "kdcli"] if torchrun else [sys.executable, "-m", "kdcli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, env=env, timeout=300)


def test_killed_mid_epoch_resumes_to_the_uninterrupted_weights(ws):
    d = ws["dir"]
    full = CliRunner().invoke(app, [*ws["train"], "--out", str(d / "full")])
    assert full.exit_code == 0, full.stderr
    cut = launch(
        [*ws["train"], "--out", str(d / "cut"), "--checkpoint-every", "3"], {"KDCLI_TEST_KILL_AT": "train-step:5"}
    )
    assert cut.returncode == -9 and (d / "cut" / "checkpoint.pt").exists(), cut.stderr[-2000:]
    resumed = CliRunner().invoke(app, [*ws["train"], "--out", str(d / "cut"), "--checkpoint-every", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    a, b = load_file(str(d / "full" / "model.safetensors")), load_file(str(d / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = json.loads((d / "cut" / "summary.json").read_text())
    assert s["resumed_from_step"] == 3 and s["cross_tokenizer"] == "hybrid"


def test_two_process_torchrun_run_finishes_and_eval_reads_it(ws):
    d = ws["dir"]
    r = launch([*ws["train"], "--out", str(d / "ddp")], torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((d / "ddp" / "summary.json").read_text())
    assert s["steps"] > 0 and "2 processes" in r.stderr and 0.3 < s["aligned_share"] < 1.0
    rep = CliRunner().invoke(
        app,
        ["eval", "--model", str(d / "ddp"), "--data", str(ws["text"]), "--cache", str(d / "c"), "--temperature", "2"]
        + ["--cross-tokenizer", "aligned", "--latency-repeats", "0", "--json"],
    )
    assert rep.exit_code == 0, rep.stderr
    m = json.loads(rep.stdout)["models"][0]
    assert m["bits_per_byte"] > 0 and 0.3 < m["aligned_share"] < 1.0
