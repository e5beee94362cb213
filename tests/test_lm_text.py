"""JSONL -> token sequences: packing, truncation, loss positions, row hashes, teacher-prompt alignment, errors."""

import json

import numpy as np
import pytest
from lm_helpers import make_tokenizer, prompt_rows, text_rows, write_jsonl

from kdcli.infra.errors import UsageError
from kdcli.lm.text import (
    TextSettings,
    load_text,
    load_tokenizer,
    loss_positions,
    pad_batch,
    teacher_sequences,
    tokenizer_identity,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")
    return load_tokenizer(str(d)), d


def test_packing_covers_every_token_once(tok, tmp_path):
    tk, _ = tok
    rows = text_rows(10)
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    data = load_text(str(p), tk, TextSettings(max_length=16))
    flat = np.concatenate(data.ids)
    expect = [t for r in rows for t in tk(r["text"], add_special_tokens=False)["input_ids"] + [tk.eos_token_id]]
    assert len(data.ids[-1]) <= 16 and all(len(s) == 16 for s in data.ids[:-1])
    assert flat.tolist() == expect[: len(flat)] and len(expect) - len(flat) <= 1  # a 1-token tail is dropped
    assert (data.first_target == 1).all()
    assert data.num_targets.sum() == sum(len(s) - 1 for s in data.ids)


def test_no_pack_truncates_each_row(tok, tmp_path):
    tk, _ = tok
    p = write_jsonl(tmp_path / "t.jsonl", text_rows(6))
    data = load_text(str(p), tk, TextSettings(max_length=8, pack=False))
    assert data.n == 6 and all(len(s) <= 8 for s in data.ids)
    assert any("truncated" in n for n in data.notes)


def test_prompt_response_positions_are_the_response(tok, tmp_path):
    tk, _ = tok
    rows = prompt_rows(4)
    p = write_jsonl(tmp_path / "pr.jsonl", rows)
    data = load_text(str(p), tk, TextSettings(max_length=64, prompt_template="Q: {prompt}\nA:"))
    for i, r in enumerate(rows):
        prompt = tk("Q: " + r["prompt"] + "\nA:", add_special_tokens=False)["input_ids"]
        resp = tk(r["response"], add_special_tokens=False)["input_ids"] + [tk.eos_token_id]
        assert data.ids[i].tolist() == prompt + resp
        assert data.first_target[i] == len(prompt)
    ids, _ = pad_batch(data.ids)
    idx, tgt = loss_positions(data.ids, data.first_target, ids.shape[1])
    assert len(idx) == data.num_targets.sum()
    assert (ids.reshape(-1)[idx + 1] == tgt).all()  # logit at position t predicts the token at t + 1
    with_prompt = load_text(str(p), tk, TextSettings(max_length=64, prompt_loss=True))
    assert (with_prompt.first_target == 1).all()


def test_teacher_prompt_aligns_response_tokens(tok, tmp_path):
    tk, _ = tok
    p = write_jsonl(tmp_path / "pr.jsonl", prompt_rows(5))
    data = load_text(str(p), tk, TextSettings(max_length=64))
    seqs, first = teacher_sequences(data, tk, "You are a poet. Answer in verse.\n{prompt}")
    for i in range(data.n):
        assert len(seqs[i]) - first[i] == data.num_targets[i]
        assert seqs[i][first[i] :].tolist() == data.ids[i][data.first_target[i] :].tolist()
        assert len(seqs[i]) > len(data.ids[i])  # the teacher reads more context
    text = write_jsonl(tmp_path / "t.jsonl", text_rows(3))
    with pytest.raises(UsageError, match="prompt/response rows"):
        teacher_sequences(load_text(str(text), tk, TextSettings()), tk, "sys {prompt}")
    # without a {prompt} placeholder the text is a teacher-only system prompt: text, a blank line, the prompt
    seqs, first = teacher_sequences(data, tk, "Be terse. {not a field}\n")
    for i in range(data.n):
        prefix = tk("Be terse. {not a field}\n\n" + prompt_rows(5)[i]["prompt"], add_special_tokens=False)
        assert seqs[i].tolist() == prefix["input_ids"] + data.ids[i][data.first_target[i] :].tolist()
        assert first[i] == len(prefix["input_ids"])
    with pytest.raises(UsageError, match="placeholder"):  # the student's template still needs one
        load_text(str(p), tk, TextSettings(prompt_template="no placeholder here"))


def test_row_hashes_cover_token_ids_and_positions(tok, tmp_path):
    tk, _ = tok
    rows = prompt_rows(6)
    a = load_text(str(write_jsonl(tmp_path / "a.jsonl", rows)), tk, TextSettings(max_length=64))
    rows[3] = {**rows[3], "response": rows[3]["response"] + " indeed"}
    b = load_text(str(write_jsonl(tmp_path / "b.jsonl", rows)), tk, TextSettings(max_length=64))
    same = a.row_hash == b.row_hash
    assert same.sum() == 5 and not same[3] and a.fingerprint != b.fingerprint
    c = load_text(str(tmp_path / "a.jsonl"), tk, TextSettings(max_length=64, prompt_loss=True))
    assert not (a.row_hash == c.row_hash).any()  # same tokens, other positions: other rows
    d = load_text(str(tmp_path / "a.jsonl") + "[1:4]", tk, TextSettings(max_length=64))
    assert d.n == 3 and (d.row_hash == a.row_hash[1:4]).all()


def test_tokenizer_identity_is_content_based(tok, tmp_path):
    tk, d = tok
    tk.save_pretrained(str(tmp_path / "copy"))
    a = tokenizer_identity(tk, str(d))
    b = tokenizer_identity(load_tokenizer(str(tmp_path / "copy")), str(tmp_path / "copy"))
    assert a["sha256"] == b["sha256"] and a["vocab_size"] == len(tk)


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"text": "a"}\nnot json\n', "line 2: not valid JSON"),
        ('{"text": "a"}\n{"prompt": "p", "response": "r"}\n', "mixes"),
        ('{"question": "a"}\n', 'needs "text"'),
        ('{"text": 3}\n', "must be a string"),
        ("[1, 2]\n", "JSON object"),
        ("\n\n", "no rows"),
    ],
)
def test_bad_jsonl_is_a_usage_error(tok, tmp_path, content, match):
    tk, _ = tok
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UsageError, match=match):
        load_text(str(p), tk, TextSettings())


def test_missing_file_and_tokenizer(tok, tmp_path):
    tk, _ = tok
    with pytest.raises(UsageError, match="not found"):
        load_text(str(tmp_path / "nope.jsonl"), tk, TextSettings())
    with pytest.raises(UsageError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def test_prompt_longer_than_max_length_keeps_its_end(tok, tmp_path):
    tk, _ = tok
    p = write_jsonl(tmp_path / "long.jsonl", [{"prompt": " ".join(["word"] * 40), "response": "yes"}])
    data = load_text(str(p), tk, TextSettings(max_length=10))
    assert len(data.ids[0]) == 10 and data.num_targets[0] == 1
    assert any("prompts were longer" in n for n in data.notes)
    json.dumps(data.identity())  # the identity is JSON-serialisable (it goes into the manifest)
