"""Pre-tokenized LM DATA (``{"input_ids": [...], "labels": [...]}``): read from JSONL, Parquet and save_to_disk the
same way, the same row hashes as the text they came from (so a cache built from text matches its token ids), labels
in Hugging Face's unshifted convention, padding, truncation, and one-line refusals; cache-teacher reads it."""

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from format_helpers import kdcli
from lm_helpers import make_llama, make_tokenizer, prompt_rows, text_rows, write_jsonl

from kdcli.infra.errors import UsageError
from kdcli.lm.text import TextSettings, load_text, load_tokenizer, teacher_view


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, one_thread):
    return make_tokenizer(tmp_path_factory.mktemp("pt") / "tok")


def token_rows(td, with_labels: bool = True) -> list[dict]:
    """TokenData -> pre-tokenized rows (labels: the token where predicted, -100 elsewhere)."""
    rows = []
    for i, s in enumerate(td.ids):
        mask = td.target_mask[i] if td.target_mask is not None else np.arange(len(s)) >= td.first_target[i]
        row = {"input_ids": s.tolist()}
        if with_labels:
            row["labels"] = np.where(mask, s, -100).tolist()
        rows.append(row)
    return rows


def test_token_rows_hash_as_the_text_they_came_from(tok_dir, tmp_path):
    tok = load_tokenizer(str(tok_dir))
    settings = TextSettings(max_length=16)
    for name, rows in (("text", text_rows(6)), ("prompt", prompt_rows(5))):
        td = load_text(str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), tok, settings)
        pre = token_rows(td)
        jsonl = write_jsonl(tmp_path / f"{name}-tok.jsonl", pre)
        pq.write_table(pa.Table.from_pylist(pre), tmp_path / f"{name}-tok.parquet")
        datasets.Dataset.from_list(pre).save_to_disk(str(tmp_path / f"{name}-saved"))
        for spec in (jsonl, tmp_path / f"{name}-tok.parquet", tmp_path / f"{name}-saved"):
            got = load_text(str(spec), tok, settings)
            assert got.kind == "tokens" and got.target_mask is None
            np.testing.assert_array_equal(got.row_hash, td.row_hash)  # the same fingerprint: caches match
            np.testing.assert_array_equal(got.first_target, td.first_target)
            assert all(np.array_equal(a, b) for a, b in zip(got.ids, td.ids))
    # without labels every token after the first is predicted: a text row's identity
    text = load_text(str(tmp_path / "text.jsonl"), tok, settings)
    bare = load_text(str(write_jsonl(tmp_path / "bare.jsonl", token_rows(text, False))), tok, settings)
    np.testing.assert_array_equal(bare.row_hash, text.row_hash)


def test_labels_padding_truncation_and_several_runs(tok_dir, tmp_path):
    tok = load_tokenizer(str(tok_dir))
    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 7, 8, -100, 10]},  # two runs (two turns)
        {"input_ids": [5, 6, 7, 0, 0], "labels": [5, 6, 7, -100, -100], "attention_mask": [1, 1, 1, 0, 0]},
        {"input_ids": [5, 6], "labels": [-100, -100]},  # nothing predicted: skipped
        {"input_ids": list(range(3, 30)), "labels": list(range(3, 30))},  # longer than max_length: cut
    ]
    spec = str(write_jsonl(tmp_path / "r.jsonl", rows))
    td = load_text(spec, tok, TextSettings(max_length=16), target_masks=True)
    assert td.n == 3 and [len(s) for s in td.ids] == [6, 3, 16]
    assert td.target_mask[0].tolist() == [False, False, True, True, False, True]
    assert td.target_mask[1].tolist() == [False, True, True]  # token 0 is never predicted
    assert td.num_targets.tolist() == [3, 2, 15]
    assert any("right-padded" in n for n in td.notes) and any("cut at --max-length 16" in n for n in td.notes)
    assert any("predict no token" in n for n in td.notes)
    with pytest.raises(UsageError, match="several runs"):
        load_text(spec, tok, TextSettings(max_length=16))
    with pytest.raises(UsageError, match="--teacher-prompt needs prompt/response rows"):
        teacher_view(td, tok, "Be brief.")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input_ids": [5, 6, 7], "labels": [6, 7, -100]}, r"labels\[0\] = 6 but input_ids\[0\] = 5"),  # shifted
        ({"input_ids": [5, 6, 7], "labels": [5, 6]}, "2 entries for 3 input_ids"),
        ({"input_ids": [5, -1, 7]}, "negative id -1"),
        ({"input_ids": "5 6 7"}, "must be a list of token ids"),
        ({"input_ids": [5.5, 6.0]}, "flat list of integers"),
        ({"input_ids": [5, 6, 7], "attention_mask": [0, 1, 1]}, "left padding"),
        ({"input_ids": [5, 6, 999]}, "token id 999 is out of range"),
    ],
)
def test_bad_rows_are_one_line(tok_dir, tmp_path, row, message):
    tok = load_tokenizer(str(tok_dir))
    with pytest.raises(UsageError, match=message) as e:
        load_text(str(write_jsonl(tmp_path / "bad.jsonl", [row])), tok, TextSettings(max_length=16))
    assert "\n" not in str(e.value)


def test_parquet_columns_of_another_type_are_refused(tok_dir, tmp_path):
    tok = load_tokenizer(str(tok_dir))
    pq.write_table(pa.table({"input_ids": ["5 6 7"]}), tmp_path / "s.parquet")
    with pytest.raises(UsageError, match='column "input_ids" holds string, not lists of integers'):
        load_text(str(tmp_path / "s.parquet"), tok, TextSettings(max_length=16))


def test_cache_teacher_reads_pre_tokenized_data(tok_dir, tmp_path):
    """The teacher caches token rows as it caches text: the same tokens give the same cache (same fingerprint,
    same arrays), so a cache built from text trains with its token ids as DATA."""
    teacher = make_llama(tmp_path / "teacher", tok_dir)
    text = write_jsonl(tmp_path / "text.jsonl", text_rows(6))
    td = load_text(str(text), load_tokenizer(str(tok_dir)), TextSettings(max_length=16))
    toks = write_jsonl(tmp_path / "tokens.jsonl", token_rows(td))
    for name, data in (("a", text), ("b", toks)):
        kdcli("cache-teacher", "--teacher", teacher, "--data", data, "--out", tmp_path / name, "--top-k", 4,
              "--max-length", 16)  # fmt: skip
    ma, mb = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in "ab")
    assert ma["data"]["fingerprint"] == mb["data"]["fingerprint"] and mb["text"]["data_kind"] == "tokens"
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    kdcli("train-student", "--cache", tmp_path / "a", "--data", toks, "--student", teacher, "--epochs", 1,
          "--temperature", 1, "--out", tmp_path / "run")  # fmt: skip
