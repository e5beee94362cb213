"""Language models on the one pipeline, as a user runs them: torchrun caches equal to one process, a sample-mode
LM cache killed after any number of shards resumes to the same bytes (with any process count), and a 2-process
DDP LM run equals nothing less than what it promises (equal steps on every rank, resumable, eval reads it).

Tiny data: a BPE tokenizer and a random 2-layer Llama made by tests/lm_helpers.py; each launch is a few seconds
of process start-up."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl
from safetensors.numpy import load_file

from kdcli.cache.manifest import read_manifest
from kdcli.cache.tokens import TokenCacheReader

pytest.importorskip("transformers")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# 33 sequences of <= 32 tokens; shards of 4 rows -> 9 shards; teacher batches of 3 rows: before the one cache pass
# an LM batch ran across shard boundaries (rows 3..5 straddle shards 0 and 1), so a resumed run drew differently
CACHE = [
    "--mode",
    "sample",
    "--samples",
    "8",
    "--shard-size",
    "4",
    "--batch-size",
    "3",
    "--seed",
    "5",
    "--max-length",
    "32",
]
TRAIN = [
    "--student",
    "transformer",
    "--student-arg",
    "d_model=16",
    "--student-arg",
    "n_layers=1",
    "--student-arg",
    "n_heads=2",
    "--epochs",
    "2",
    "--lr",
    "3e-3",
    "--seed",
    "1",
    "--temperature",
    "2",
]


def env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


def kdcli(*args, extra_env: dict | None = None, torchrun: bool = False) -> subprocess.Popen:
    cmd = [*TORCHRUN, "-m", "kdcli"] if torchrun else [sys.executable, "-m", "kdcli"]
    return subprocess.Popen(
        [*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(extra_env)
    )


def finish(p: subprocess.Popen, ok: bool = True) -> tuple[str, str]:
    out, err = p.communicate(timeout=300)
    if ok:
        assert p.returncode == 0, err[-3000:]
    else:
        assert p.returncode != 0, "the run was meant to be killed"
    return out, err


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmdist")
    tok = make_tokenizer(d / "tok")
    make_llama(d / "teacher", tok, hidden=16, layers=1)
    write_jsonl(d / "text.jsonl", text_rows(24))
    finish(kdcli("cache-teacher", "--teacher", d / "teacher", "--data", d / "text.jsonl", "--out", d / "c1", *CACHE))
    return d


def arrays(cache) -> dict:
    r = TokenCacheReader(cache)
    return r.read_rows(0, r.num_rows)


def assert_same_cache(a, b) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert [(s["name"], s["row_start"], s["row_stop"]) for s in ma["shards"]] == [
        (s["name"], s["row_start"], s["row_stop"]) for s in mb["shards"]
    ]
    x, y = arrays(a), arrays(b)
    assert set(x) == set(y) and "sample_ids" in x
    for k in x:  # the draws too: every row was computed in the same batch with the same seed
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def cache_cmd(ws, out) -> list:
    return ["cache-teacher", "--teacher", ws / "teacher", "--data", ws / "text.jsonl", "--out", out, *CACHE]


def test_the_fixture_cache_has_batches_across_shards(ws):
    m = read_manifest(ws / "c1")
    assert m["kind"] == "token" and len(m["shards"]) == 9 and m["shard_size"] == 4  # 3-row batches vs 4-row shards


def test_torchrun_lm_cache_equals_one_process(ws):
    out, err = finish(kdcli(*cache_cmd(ws, ws / "c2"), torchrun=True))
    assert out.count("cache-teacher: written") == 1  # one summary, from rank 0
    shards = [f"shard-{i:05d}.h5" for i in range(9)]
    assert sorted(f.name for f in (ws / "c2").iterdir()) == ["manifest.json", *shards, "teacher_vocab.json"]
    assert (ws / "c2" / "teacher_vocab.json").read_bytes() == (ws / "c1" / "teacher_vocab.json").read_bytes()
    assert_same_cache(ws / "c1", ws / "c2")
    assert [s["sha256"] for s in read_manifest(ws / "c2")["shards"]] == [
        s["sha256"] for s in read_manifest(ws / "c1")["shards"]
    ]  # even byte-identical


@pytest.mark.parametrize("shards", [1, 2, 3, 5, 7])
def test_sample_lm_cache_killed_after_n_shards_resumes_to_the_same_cache(ws, shards):
    out = ws / f"killed-{shards}"
    finish(kdcli(*cache_cmd(ws, out), extra_env={"KDCLI_TEST_KILL_AT": f"shard-published:{shards}"}), ok=False)
    assert len(read_manifest(out, require_complete=False)["shards"]) == shards
    _, err = finish(kdcli(*cache_cmd(ws, out)))
    assert f"{shards} whole shard(s) found" in err
    assert_same_cache(ws / "c1", out)


def test_lm_cache_resumes_with_another_process_count(ws):
    two_then_one, one_then_two = ws / "two-then-one", ws / "one-then-two"
    # each rank publishes its own run of shards; rank 0 of 2 is killed after its 2nd
    finish(
        kdcli(*cache_cmd(ws, two_then_one), torchrun=True, extra_env={"KDCLI_TEST_KILL_AT": "shard-published:2"}),
        ok=False,
    )
    finish(kdcli(*cache_cmd(ws, one_then_two), extra_env={"KDCLI_TEST_KILL_AT": "shard-published:3"}), ok=False)
    finish(kdcli(*cache_cmd(ws, two_then_one)))
    finish(kdcli(*cache_cmd(ws, one_then_two), torchrun=True))
    assert_same_cache(ws / "c1", two_then_one)
    assert_same_cache(ws / "c1", one_then_two)


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_ddp_lm_training_runs_resumes_and_evaluates(ws):
    base = ["train-student", "--data", ws / "text.jsonl", "--cache", ws / "c1", *TRAIN, "--val-fraction", "0.1"]
    one = kdcli(*base, "--out", ws / "r1", "--batch-size", "8")
    two = kdcli(*base, "--out", ws / "r2", "--batch-size", "4", torchrun=True)
    killed = kdcli(
        *base,
        "--out",
        ws / "r3",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "2",
        torchrun=True,
        extra_env={"KDCLI_TEST_KILL_AT": "train-step:5"},
    )
    finish(one)
    out, err = finish(two)
    finish(killed, ok=False)
    assert "global batch 8" in err and out.count("train-student") == 1
    assert sorted(f.name for f in (ws / "r2").iterdir()) == [
        "config.yaml",
        "metrics.jsonl",
        "model.json",
        "model.safetensors",
        "summary.json",
        "tokenizer",
    ]
    m1, m2 = metrics(ws / "r1"), metrics(ws / "r2")
    # 30 training sequences: 15 per rank, 4 steps of 4 on each rank (equal step counts: no rank waits forever)
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == [4, 8]
    for a, b in zip(m1, m2):  # different data order per rank: statistically the same curve
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.1)
        assert {"tokens_per_second", "val_perplexity"} <= set(b)
    # a killed DDP LM run resumes (2 processes again) to the uninterrupted run's weights
    assert (ws / "r3" / "checkpoint.pt").exists()
    _, err = finish(kdcli(*base, "--out", ws / "r3", "--batch-size", "4", "--checkpoint-every", "2", torchrun=True))
    assert "resuming" in err
    w2, w3 = weights(ws / "r2"), weights(ws / "r3")
    for k in w2:
        np.testing.assert_array_equal(w2[k], w3[k], err_msg=k)
    # eval reads the DDP run dir with no other flags than the data and the cache
    out, _ = finish(kdcli("eval", "--model", ws / "r2", "--data", ws / "text.jsonl", "--cache", ws / "c1", "--json"))
    report = json.loads(out)
    assert report["models"][0]["num_tokens"] > 0 and 0 <= report["models"][0]["agreement"] <= 1


def test_fsdp_hf_student_matches_ddp_resumes_and_evaluates(ws):
    """--fsdp (FSDP2 on gloo): the same averaged gradients as DDP, so the same weights to float rounding; a killed
    sharded run resumes from its whole-model checkpoint to the uninterrupted run's weights; eval reads the run."""
    student = make_llama(ws / "hf-student", ws / "tok", hidden=16, layers=2, seed=1)
    base = [
        "train-student",
        "--data",
        ws / "text.jsonl",
        "--cache",
        ws / "c1",
        "--student",
        student,
        "--epochs",
        "2",
        "--lr",
        "3e-3",
        "--seed",
        "1",
        "--temperature",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "3",
    ]
    ddp = kdcli(*base, "--out", ws / "h-ddp", torchrun=True)
    fsdp = kdcli(*base, "--out", ws / "h-fsdp", "--fsdp", torchrun=True)
    killed = kdcli(
        *base, "--out", ws / "h-cut", "--fsdp", torchrun=True, extra_env={"KDCLI_TEST_KILL_AT": "train-step:5"}
    )
    finish(ddp)
    finish(fsdp)
    finish(killed, ok=False)
    wd, wf = weights(ws / "h-ddp"), weights(ws / "h-fsdp")
    assert set(wd) == set(wf)
    for k in wd:
        np.testing.assert_allclose(wf[k], wd[k], rtol=1e-4, atol=1e-5, err_msg=k)
    _, err = finish(kdcli(*base, "--out", ws / "h-cut", "--fsdp", torchrun=True))
    assert "resuming" in err
    wc = weights(ws / "h-cut")
    for k in wf:
        np.testing.assert_array_equal(wc[k], wf[k], err_msg=k)
    # resuming a sharded checkpoint without --fsdp is refused, nothing touched
    p = subprocess.run(
        [sys.executable, "-m", "kdcli", *map(str, base), "--out", ws / "h-cut", "--resume"],
        capture_output=True,
        text=True,
        env=env(),
    )
    assert p.returncode == 2 and "already holds a finished run" in p.stderr
    out, _ = finish(
        kdcli("eval", "--model", ws / "h-fsdp", "--data", ws / "text.jsonl", "--cache", ws / "c1", "--json")
    )
    assert json.loads(out)["models"][0]["num_tokens"] > 0


def test_fsdp_needs_torchrun(ws, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdcli",
            "train-student",
            "--data",
            ws / "text.jsonl",
            "--cache",
            ws / "c1",
            *TRAIN,
            "--out",
            tmp_path / "r",
            "--fsdp",
        ],
        capture_output=True,
        text=True,
        env=env(),
    )
    assert p.returncode == 2 and "--fsdp shards the student over torchrun processes" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "r").exists()  # refused before anything is written


def test_token_cache_batches_are_the_same_with_dataloader_workers_and_split_disjointly(ws):
    from kdcli.cache.reader import CacheLoader

    def epoch(**kw):
        loader = CacheLoader(TokenCacheReader(ws / "c1"), batch_size=4, seed=3, block_rows=5, shuffle_blocks=2, **kw)
        try:
            return list(loader.epoch(1))
        finally:
            loader.close()

    plain, workers = epoch(), epoch(num_workers=2)
    assert len(plain) == len(workers) == 9  # 33 sequences in batches of 4
    for a, b in zip(plain, workers):
        assert set(a) == set(b) and "lengths" in a
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # ragged rows stay whole: each row's tokens follow it through the shuffle (lengths match the cache's)
    whole = arrays(ws / "c1")  # rows in order: row i is whole's row i
    for b in plain:
        expect = TokenCacheReader.take(whole, b["row_index"])
        for k in expect:
            np.testing.assert_array_equal(b[k], expect[k], err_msg=k)
    ranks = [epoch(rank=r, world=2) for r in (0, 1)]
    rows = [np.concatenate([b["row_index"] for b in r]) for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) and len(rows[0]) == len(rows[1]) == 16  # equal shares of 33 // 2
    assert not set(rows[0]) & set(rows[1])
