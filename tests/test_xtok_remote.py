"""Cross-tokenizer caches in object storage: cache-teacher --out s3://... writes the token spans and
teacher_vocab.json as a local run does (byte for byte), and a student with another tokenizer trains from the remote
cache to the weights it reaches from the local one. Against a moto S3 server (tests/remote_helpers.py)."""

from __future__ import annotations

import json

import pytest
import remote_helpers
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl
from remote_helpers import BUCKET, objects
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcli.cache.tokens import SPAN_KEYS
from kdcli.cache.verify import verify_cache
from kdcli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
s3 = remote_helpers.s3  # the moto server fixture (module scope)
runner = CliRunner()


def cli(*args) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr[-3000:]


def test_remote_cache_records_spans_and_trains_a_cross_tokenizer_student(s3, tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    teacher = make_llama(tmp_path / "teacher", tok)
    text = write_jsonl(tmp_path / "text.jsonl", text_rows(12))
    url = f"s3://{BUCKET}/xtok"
    common = ["--teacher", teacher, "--data", text, "--max-length", 32, "--top-k", 8]
    cli("cache-teacher", *common, "--out", tmp_path / "local")
    cli("cache-teacher", *common, "--out", url)
    got = objects(s3, "xtok")
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert "teacher_vocab.json" in got and sorted(got) == sorted(local)
    assert all(got[n] == local[n] for n in got if n.startswith("shard-") or n == "teacher_vocab.json")
    manifest = json.loads(got["manifest.json"])
    assert manifest["xtok"]["span_keys"] == list(SPAN_KEYS) and verify_cache(url).ok

    student_tok = make_tokenizer(tmp_path / "tok2", 270)
    weights = {}
    for name, cache in (("from-local", tmp_path / "local"), ("from-s3", url)):
        cli("train-student", "--student", "transformer", "--student-arg", "d_model=32", "--student-arg", "n_layers=1",
            "--student-arg", "n_heads=2", "--tokenizer", student_tok, "--data", text, "--cache", cache,
            "--cross-tokenizer", "hybrid", "--epochs", 1, "--batch-size", 4, "--out", tmp_path / name)  # fmt: skip
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert weights["from-local"].keys() == weights["from-s3"].keys()
    for k, v in weights["from-local"].items():
        assert (v == weights["from-s3"][k]).all(), k  # the same cache read from either place: the same run
