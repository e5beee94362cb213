"""``cache-teacher --generate --out s3://...``: the answers file is written into the bucket beside the shards, after
the last shard and before the manifest that marks the cache complete; an interrupted run leaves no answers object
and resumes to the same bytes as a local run. Against a moto S3 server on 127.0.0.1 (tests/remote_helpers.py)."""

from __future__ import annotations

import json

import pytest
import remote_helpers
from generate_helpers import PERSONA, prompt_rows, run, word_teacher, write_jsonl
from lm_helpers import make_llama
from remote_helpers import BUCKET, objects

from kdcli.cache.verify import verify_cache

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
s3 = remote_helpers.s3  # the moto server fixture (module scope)

GEN = ["--generate", "--max-length", 64, "--shard-size", 4, "--batch-size", 3, "--max-new-tokens", 5, "--sample",
       "--seed", 3, "--generations-per-prompt", 2, "--mode", "topk", "--top-k", 4]  # fmt: skip


@pytest.fixture(scope="module")
def local(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("genremote")
    _, tok = word_teacher(d)
    make_llama(d / "student", tok, hidden=16, layers=1, seed=1)
    write_jsonl(d / "prompts.jsonl", prompt_rows(5))
    run(*command(d), "--out", d / "local")
    return d


def command(d) -> list:
    return ["cache-teacher", "--teacher", d / "wteacher", "--data", d / "prompts.jsonl", "--teacher-prompt", PERSONA,
            *GEN]  # fmt: skip


def test_the_remote_cache_holds_the_local_answers_and_shards(local, s3):
    url = f"s3://{BUCKET}/gen"
    run(*command(local), "--out", url)
    got = objects(s3, "gen")
    want = {p.name: p.read_bytes() for p in (local / "local").iterdir() if p.is_file()}
    assert sorted(got) == sorted(want)  # answers.jsonl, shards, manifest; the .lock object is gone
    for name in want:
        if name != "manifest.json":
            assert got[name] == want[name], name
    remote, here = json.loads(got["manifest.json"]), json.loads(want["manifest.json"])
    assert remote["complete"] and remote["answers"] == here["answers"]
    assert remote["data"]["spec"] == f"{url}/answers.jsonl"
    assert remote["data"] | {"spec": None} == here["data"] | {"spec": None}  # train-student checks this fingerprint
    assert verify_cache(url).ok
    r = run(*command(local), "--out", url)
    assert "complete and up to date" in r.stderr
    # the answers copied out of the bucket train a student from the remote cache; an edited copy is refused
    copied = local / "copied.jsonl"
    copied.write_bytes(got["answers.jsonl"])
    train = ["train-student", "--student", local / "student", "--cache", url, "--epochs", 1, "--batch-size", 4]
    run(*train, "--data", copied, "--out", local / "run")
    rows = [json.loads(x) for x in got["answers.jsonl"].splitlines()]
    rows[1]["messages"][-1]["content"] = "to be"
    r = run(*train, "--data", write_jsonl(local / "edited.jsonl", rows), "--out", local / "run2", code=3)
    assert "does not match the data" in r.stderr


def test_an_interrupted_remote_run_has_no_answers_object_and_resumes(local, s3):
    url = f"s3://{BUCKET}/cut"
    r = run(*command(local), "--out", url, code=2, env={"KDCLI_TEST_KILL_AT": "teacher-batch:3:ENOSPC"})
    assert "no space left" in r.stderr
    left = objects(s3, "cut")
    assert "answers.jsonl" not in left and not json.loads(left["manifest.json"])["complete"]
    r = run(*command(local), "--out", url)
    assert "1 whole shard(s) found" in r.stderr
    assert objects(s3, "cut")["answers.jsonl"] == (local / "local" / "answers.jsonl").read_bytes()
