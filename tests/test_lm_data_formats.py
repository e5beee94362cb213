"""LM data formats: chat rows (messages / ShareGPT) rendered with a chat template, the teacher-only system prompt,
and the same rows read from Parquet files, Parquet directories and ``datasets.save_to_disk`` directories.

References are independent of kdcli's renderer: ``tokenizer.apply_chat_template`` (token ids), the template's own
``{% generation %}`` assistant mask, hand-checked positions, and the JSONL reader for the Arrow formats.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from lm_helpers import CORPUS, make_llama, make_tokenizer, prompt_rows, text_rows, write_jsonl
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.infra.errors import UsageError
from kdcli.lm import is_text_spec
from kdcli.lm.text import (
    TextSettings,
    load_text,
    load_tokenizer,
    loss_positions,
    pad_batch,
    read_chat_template,
    render_chat,
    target_counts,
    teacher_sequences,
    teacher_view,
    token_row_hashes,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The same rendering with the assistant part marked for transformers' return_assistant_tokens_mask.
CHATML_GEN = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# No generation prompt at all: a turn is "role: content<eos>".
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<eos>\\n' }}{% endfor %}"

runner = CliRunner()


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """A tiny BPE tokenizer with ChatML control tokens and a ChatML template, and the same without a template."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chattok")
    plain = make_tokenizer(root / "plain")
    t = AutoTokenizer.from_pretrained(str(plain))
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.save_pretrained(str(root / "bare"))
    t.chat_template = CHATML
    t.save_pretrained(str(root / "chat"))
    return {
        "chat": load_tokenizer(str(root / "chat")),
        "bare": load_tokenizer(str(root / "bare")),
        "dir": root / "chat",
        "root": root,
    }


def messages(i: int, multi: bool) -> list[dict]:
    m = [{"role": "system", "content": "you are a player"}] if i % 3 == 0 else []
    m += [{"role": "user", "content": f"quote {i}"}, {"role": "assistant", "content": CORPUS[i % len(CORPUS)]}]
    if multi and i % 2:
        m += [{"role": "user", "content": "and then"}, {"role": "assistant", "content": CORPUS[(i + 3) % 8]}]
    return m


def chat_rows(n: int = 10, multi: bool = False) -> list[dict]:
    rows = [{"messages": messages(i, multi)} for i in range(n)]
    rows[1]["messages"][0]["name"] = "someone"  # extra keys never reach the template (Arrow adds them as nulls)
    return rows


def sharegpt(rows: list[dict]) -> list[dict]:
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in r["messages"]]} for r in rows]


def pieces(tok, *parts: tuple[str, bool]) -> tuple[list[int], list[bool]]:
    ids, mask = [], []
    for text, predicted in parts:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        mask += [predicted] * len(t)
    return ids, mask


# -- chat rows ---------------------------------------------------------------------------------------------------

MULTI = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "to be or not"},
    {"role": "assistant", "content": "the question"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "a horse"},
]


def test_multi_turn_predicts_exactly_the_assistant_turns(toks, tmp_path):
    tk = toks["chat"]
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": MULTI}])
    data = load_text(str(p), tk, TextSettings(max_length=128), target_masks=True)
    ids, mask = data.ids[0], data.target_mask[0]
    # hand-checked: the tokens of "the question<|im_end|>" and "a horse<|im_end|>", nothing of the headers, the
    # system or user turns, or the newline after each <|im_end|>; the sequence ends at the last <|im_end|>
    assert [tk.decode([t]) for t in ids[mask]] == [
        "th",
        "e",
        " ",
        "qu",
        "est",
        "i",
        "o",
        "n",
        "<|im_end|>",
        "a",
        " horse",
        "<|im_end|>",
    ]
    assert np.flatnonzero(mask).tolist() == list(range(40, 49)) + [70, 71, 72] and len(ids) == 73
    assert data.first_target[0] == 40 and data.num_targets[0] == 12
    # ids: what apply_chat_template tokenizes, minus the trailing "\n" (after the last predicted token)
    ref = tk.apply_chat_template(MULTI, tokenize=True, return_dict=True)["input_ids"]
    assert ids.tolist() == ref[:-1] and tk.decode(ref[-1:]) == "\n"
    expect_ids, expect_mask = pieces(
        tk,
        (
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nto be or not<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("the question<|im_end|>", True),
        ("\n<|im_start|>user\nand then<|im_end|>\n<|im_start|>assistant\n", False),
        ("a horse<|im_end|>", True),
    )
    assert ids.tolist() == expect_ids and mask.tolist() == expect_mask
    # loss positions: the logit at t - 1 predicts token t, for exactly the masked tokens
    batch, _ = pad_batch(data.ids)
    idx, tgt = loss_positions(data.ids, data.first_target, batch.shape[1], data.masks([0]))
    assert (idx + 1).tolist() == np.flatnonzero(mask).tolist() and (batch.reshape(-1)[idx + 1] == tgt).all()
    assert target_counts(data.ids, data.first_target, data.masks([0])).tolist() == [12]


def test_mask_matches_the_templates_own_generation_mask(toks):
    """Against transformers' {% generation %} mask (an independent implementation), turn by turn."""
    tk = toks["chat"]
    for i in range(10):
        msgs = messages(i, multi=True)
        ids, mask = render_chat(tk, msgs, CHATML_GEN)
        ref = tk.apply_chat_template(
            msgs, chat_template=CHATML_GEN, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ids == ref["input_ids"] and mask.astype(int).tolist() == ref["assistant_masks"]
        ids2, mask2 = render_chat(tk, msgs, CHATML)  # the same rendering without the markers: the same answer
        assert ids2 == ids and np.array_equal(mask2, mask)


def test_single_turn_rows_are_one_run_and_work_without_masks(toks, tmp_path):
    tk = toks["chat"]
    rows = chat_rows(6)
    data = load_text(str(write_jsonl(tmp_path / "c.jsonl", rows)), tk, TextSettings(max_length=128))
    assert data.kind == "chat" and data.target_mask is None and data.n == 6
    for i, r in enumerate(rows):
        msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        head = tk.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        answer = tk(msgs[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert data.ids[i].tolist() == head + answer and data.first_target[i] == len(head)
    seqs, first = teacher_sequences(data, tk, None)
    assert seqs is data.ids and first is data.first_target
    # --prompt-loss: the same tokens, every one after the first predicted
    pl = load_text(str(tmp_path / "c.jsonl"), tk, TextSettings(max_length=128, prompt_loss=True))
    assert all(a.tolist() == b.tolist() for a, b in zip(pl.ids, data.ids)) and (pl.first_target == 1).all()
    assert not (pl.row_hash == data.row_hash).any()


def test_multi_turn_rows_need_a_mask_aware_caller(toks, tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", chat_rows(4, multi=True))
    with pytest.raises(UsageError, match=r"line 2: 2 assistant turns .* give each assistant turn its own row"):
        load_text(str(p), toks["chat"], TextSettings())
    data = load_text(str(p), toks["chat"], TextSettings(), target_masks=True)
    assert data.target_mask is not None and len(data.target_mask) == 4
    with pytest.raises(ValueError, match="teacher_view"):
        teacher_sequences(data, toks["chat"], None)


def test_sharegpt_rows_equal_messages_rows(toks, tmp_path):
    tk = toks["chat"]
    rows = chat_rows(8, multi=True)
    a = load_text(str(write_jsonl(tmp_path / "m.jsonl", rows)), tk, TextSettings(), target_masks=True)
    b = load_text(str(write_jsonl(tmp_path / "s.jsonl", sharegpt(rows))), tk, TextSettings(), target_masks=True)
    assert (a.row_hash == b.row_hash).all() and a.fingerprint == b.fingerprint


def test_template_without_generation_prompt_starts_at_the_content(toks, tmp_path):
    tk = toks["chat"]
    ids, mask = render_chat(tk, MULTI, PLAIN)
    full = tk.apply_chat_template(MULTI, chat_template=PLAIN, tokenize=True, return_dict=True)["input_ids"]
    assert ids == full
    got = tk.decode(np.asarray(ids)[mask])
    assert got.replace(" ", "") == "thequestion<eos>ahorse<eos>"  # no "assistant:" header, no user text


def test_chat_row_hash_covers_ids_and_mask(toks, tmp_path):
    tk = toks["chat"]
    rows = chat_rows(6, multi=True)
    a = load_text(str(write_jsonl(tmp_path / "a.jsonl", rows)), tk, TextSettings(), target_masks=True)
    rows[2]["messages"][-1]["content"] += " indeed"
    b = load_text(str(write_jsonl(tmp_path / "b.jsonl", rows)), tk, TextSettings(), target_masks=True)
    assert (a.row_hash == b.row_hash).sum() == 5 and a.row_hash[2] != b.row_hash[2]
    # the same token ids with another mask hash differently; a mask that is one run to the end adds nothing
    ids, first = [a.ids[1]] * 3, np.full(3, a.first_target[1])
    other = a.target_mask[1].copy()
    other[-1] = False
    one_run = np.arange(len(ids[0])) >= first[0]
    h = token_row_hashes(ids, first, [a.target_mask[1], other, one_run])
    assert h[0] == a.row_hash[1] and len(set(h.tolist())) == 3 and h[2] == token_row_hashes(ids[:1], first[:1])[0]


def test_max_length_cuts_the_end_and_skips_rows_without_an_answer(toks, tmp_path):
    tk = toks["chat"]
    long = [{"role": "user", "content": "x"}, {"role": "assistant", "content": " ".join(CORPUS)}]
    no_room = [{"role": "user", "content": " ".join(CORPUS)}, {"role": "assistant", "content": "yes"}]
    short = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yes"}]
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": long}, {"messages": no_room}, {"messages": short}])
    data = load_text(str(p), tk, TextSettings(max_length=32))
    assert data.n == 2 and len(data.ids[0]) == 32 and len(data.ids[1]) < 32
    assert data.target_mask is None and data.num_targets[0] == 32 - data.first_target[0]
    assert any("1 of 3 chat rows were cut" in n for n in data.notes)
    assert any("1 of 3 chat rows had no assistant token" in n for n in data.notes)


def test_chat_template_file_overrides_and_is_read(toks, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(PLAIN)
    assert read_chat_template(str(f)) == PLAIN and read_chat_template(None) is None
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": MULTI[1:3]}])
    data = load_text(str(p), toks["bare"], TextSettings(chat_template=PLAIN))
    assert toks["bare"].decode(data.ids[0]) == "user: to be or not<eos>\nassistant: the question<eos>"
    assert TextSettings(chat_template=PLAIN).as_dict()["chat_template"] == PLAIN
    assert "chat_template" not in TextSettings().as_dict()  # manifests of non-chat caches are unchanged
    assert TextSettings.from_dict({**TextSettings(chat_template=PLAIN).as_dict(), "x": 1}).chat_template == PLAIN


# -- the teacher-only system prompt ------------------------------------------------------------------------------


def test_teacher_system_prompt_precedes_the_rows_own(toks, tmp_path):
    tk = toks["chat"]
    rows = chat_rows(6, multi=True)
    data = load_text(str(write_jsonl(tmp_path / "c.jsonl", rows)), tk, TextSettings(), target_masks=True)
    view = teacher_view(data, tk, "Be terse.\n")
    for i, r in enumerate(rows):
        msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        if msgs[0]["role"] == "system":  # rows 0 and 3: one system message, the teacher prompt first
            t_msgs = [{"role": "system", "content": "Be terse.\n\n" + msgs[0]["content"]}] + msgs[1:]
        else:
            t_msgs = [{"role": "system", "content": "Be terse."}] + msgs
        ref = tk.apply_chat_template(t_msgs, tokenize=True, return_dict=True)["input_ids"]
        assert view.seqs[i].tolist() == ref[:-1]  # the teacher's rendering, cut after its last predicted token
        t_pred = view.seqs[i][view.target_mask[i]]
        assert t_pred.tolist() == data.ids[i][data.target_mask[i]].tolist()  # the same predicted tokens
        assert len(view.seqs[i]) > len(data.ids[i])
    b, _ = pad_batch(view.seqs)
    idx, tgt = loss_positions(view.seqs, view.first_target, b.shape[1], view.masks(range(data.n)))
    s, _ = pad_batch(data.ids)
    s_idx, s_tgt = loss_positions(data.ids, data.first_target, s.shape[1], data.masks(range(data.n)))
    assert (tgt == s_tgt).all() and len(idx) == data.num_targets.sum()


def test_teacher_prompt_on_single_turn_rows_keeps_the_one_run_interface(toks, tmp_path):
    tk = toks["chat"]
    data = load_text(str(write_jsonl(tmp_path / "c.jsonl", chat_rows(5))), tk, TextSettings())
    seqs, first = teacher_sequences(data, tk, "Be terse.")
    for i in range(data.n):
        assert seqs[i][first[i] :].tolist() == data.ids[i][data.first_target[i] :].tolist()
        assert tk.decode(seqs[i][: first[i]]).startswith("<|im_start|>system\nBe terse.")
    with pytest.raises(UsageError, match="drop the \\{prompt\\} placeholder"):
        teacher_view(data, tk, "Be terse. {prompt}")
    pl = load_text(str(tmp_path / "c.jsonl"), tk, TextSettings(prompt_loss=True))
    with pytest.raises(UsageError, match="--prompt-loss"):
        teacher_view(pl, tk, "Be terse.")


def test_teacher_prompt_without_placeholder_for_prompt_rows_keeps_the_students_template(toks, tmp_path):
    tk = toks["chat"]
    rows = prompt_rows(4)
    data = load_text(str(write_jsonl(tmp_path / "p.jsonl", rows)), tk, TextSettings(prompt_template="Q: {prompt}\nA:"))
    seqs, first = teacher_sequences(data, tk, "@" + str(write_file(tmp_path / "tp.txt", "Be terse.\n")))
    for i, r in enumerate(rows):
        prefix = tk(f"Be terse.\n\nQ: {r['prompt']}\nA:", add_special_tokens=False)["input_ids"]
        assert seqs[i].tolist() == prefix + data.ids[i][data.first_target[i] :].tolist() and first[i] == len(prefix)


def write_file(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


# -- Parquet and saved datasets ----------------------------------------------------------------------------------


def write_formats(root: Path, rows: list[dict]) -> dict[str, str]:
    """The same rows as JSONL, one Parquet file (row groups of 3, an extra column), a directory of two Parquet
    files, and a two-shard save_to_disk directory."""
    datasets = pytest.importorskip("datasets")
    root.mkdir(parents=True, exist_ok=True)
    out = {"jsonl": str(write_jsonl(root / "d.jsonl", rows))}
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.append_column("id", pa.array(range(len(rows)))), root / "d.parquet", row_group_size=3)
    (root / "shards").mkdir()
    half = len(rows) // 2 + 1
    pq.write_table(table.slice(0, half), root / "shards" / "part-0.parquet")
    pq.write_table(table.slice(half), root / "shards" / "part-1.parquet")
    (root / "shards" / "README.md").write_text("not data")
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "saved"), num_shards=2)
    out.update(parquet=str(root / "d.parquet"), parquet_dir=str(root / "shards"), saved=str(root / "saved"))
    return out


def same(a, b) -> bool:
    masks_equal = (a.target_mask is None) == (b.target_mask is None) and all(
        np.array_equal(x, y) for x, y in zip(a.target_mask or [], b.target_mask or [])
    )
    return (
        a.kind == b.kind
        and a.n == b.n
        and masks_equal
        and (a.row_hash == b.row_hash).all()
        and (a.first_target == b.first_target).all()
        and all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids))
    )


@pytest.mark.parametrize("kind", ["text", "prompt", "messages", "conversations"])
def test_jsonl_parquet_and_saved_dataset_give_identical_sequences(toks, tmp_path, kind):
    tk = toks["chat"]
    rows = {
        "text": text_rows(11),
        "prompt": prompt_rows(11),
        "messages": chat_rows(11, multi=True),
        "conversations": sharegpt(chat_rows(11, multi=True)),
    }[kind]
    specs = write_formats(tmp_path / kind, rows)
    settings = TextSettings(max_length=24 if kind == "text" else 128)
    for sl in ("", "[2:9]", "[-4:]", "[:5]", "[7:]", "[3:-3]", "[10:99]"):
        ref = load_text(specs["jsonl"] + sl, tk, settings, target_masks=True)
        for name in ("parquet", "parquet_dir", "saved"):
            got = load_text(specs[name] + sl, tk, settings, target_masks=True)
            assert same(ref, got), (name, sl)
            assert is_text_spec(specs[name] + sl)
    if kind == "text":
        assert load_text(specs["saved"] + "[2:9]", tk, TextSettings(max_length=24, pack=False)).n == 7


def test_identical_caches_from_jsonl_and_parquet(toks, tmp_path):
    """The whole cache pass (the unchanged stages) on single-turn chat rows: the same shards from every format,
    and the teacher-only system prompt reaches the teacher."""
    import h5py
    import torch

    from kdcli.config import CacheConfig, resolve
    from kdcli.stages.cache import cache_teacher

    teacher = make_llama(tmp_path / "teacher", toks["dir"])
    specs = write_formats(tmp_path / "rows", chat_rows(7))
    arrays = {}
    for name in ("jsonl", "parquet", "saved"):
        out = tmp_path / f"cache-{name}"
        cache_teacher(
            resolve(
                CacheConfig,
                None,
                dict(
                    teacher=str(teacher),
                    data=specs[name] + "[1:7]",
                    out=str(out),
                    top_k=4,
                    max_length=128,
                    teacher_prompt="Be terse.",
                ),
            )
        )
        m = json.loads((out / "manifest.json").read_text())
        with h5py.File(out / m["shards"][0]["name"]) as f:
            arrays[name] = ({k: f[k][()] for k in f}, m["data"]["fingerprint"], m["data"]["kind"])
    ref = arrays["jsonl"]
    assert ref[2] == "chat"
    for name in ("parquet", "saved"):
        assert arrays[name][1] == ref[1] and arrays[name][0].keys() == ref[0].keys()
        assert all(np.array_equal(arrays[name][0][k], ref[0][k]) for k in ref[0])
    # row 0 of the slice is data row 1: the teacher ran on its conversation with the system prompt first
    from transformers import AutoModelForCausalLM

    msgs = [{"role": m["role"], "content": m["content"]} for m in chat_rows(7)[1]["messages"]]
    t_ids = toks["chat"].apply_chat_template(
        [{"role": "system", "content": "Be terse."}] + msgs, tokenize=True, return_dict=True
    )["input_ids"][:-1]
    n = int(np.diff(ref[0]["offsets"])[0])
    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([t_ids])).logits[0].float(), -1)
    pos = np.arange(len(t_ids) - n - 1, len(t_ids) - 1)
    want = logp[pos, torch.tensor(t_ids[-n:])].numpy()
    assert np.allclose(ref[0]["target_logprobs"][:n].astype(np.float32), want, atol=2e-2)


def test_is_text_spec(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "empty").mkdir()
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "pq" / "x.parquet")
    ds = datasets.Dataset.from_list([{"text": "a"}])
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    for spec in (
        "a.jsonl",
        "a.jsonl[1:2]",
        "x.parquet",
        "x.parquet[:5]",
        str(tmp_path / "pq"),
        str(tmp_path / "pq") + "[0:1]",
        str(tmp_path / "saved"),
        str(tmp_path / "dd"),
    ):
        assert is_text_spec(spec), spec
    for spec in (None, "", "mnist:train", "x.npz", "x.h5", "m.py:make", str(tmp_path / "empty"), "nope/dir"):
        assert not is_text_spec(spec), spec


# -- bad input ---------------------------------------------------------------------------------------------------


def bad_chat(tmp_path: Path, rows) -> str:
    return str(write_jsonl(tmp_path / "bad.jsonl", rows))


def bad_parquet(tmp_path: Path, table) -> str:
    pq.write_table(table, tmp_path / "bad.parquet")
    return str(tmp_path / "bad.parquet")


def junk_parquet_dir(d: Path) -> str:
    (d / "pq").mkdir()
    (d / "pq" / "x.parquet").write_bytes(b"junk")
    return str(d / "pq")


CASES = {
    "no assistant turn": (lambda d: bad_chat(d, [{"messages": MULTI[:2]}]), r"bad.jsonl line 1: no assistant turn"),
    "unknown role": (
        lambda d: bad_chat(d, [{"messages": MULTI[1:3]}, {"messages": [{"role": "tool", "content": "x"}]}]),
        r"bad.jsonl line 2: turn 1 has unknown role 'tool'; use one of system, user, assistant",
    ),
    "unknown sharegpt speaker": (
        lambda d: bad_chat(d, [{"conversations": [{"from": "bot", "value": "x"}]}]),
        r"line 1: turn 1 has unknown from 'bot'",
    ),
    "content not a string": (
        lambda d: bad_chat(d, [{"messages": [{"role": "user", "content": ["x"]}]}]),
        r"line 1: turn 1 \(user\) needs a string \"content\", got list",
    ),
    "messages not a list": (lambda d: bad_chat(d, [{"messages": "hi"}]), r"\"messages\" must be a non-empty list"),
    "chat mixed with prompt rows": (
        lambda d: bad_chat(d, [{"messages": MULTI[1:3]}, {"prompt": "p", "response": "r"}]),
        r"mixes chat rows and prompt/response rows \(.*line 2\)",
    ),
    "no usable columns": (
        lambda d: bad_parquet(d, pa.table({"question": ["a"], "answer": ["b"]})),
        r"bad.parquet: no usable columns: need \"text\", .*; found columns \['question', "
        r"'answer'\]",
    ),
    "text column of ints": (
        lambda d: bad_parquet(d, pa.table({"text": [1, 2]})),
        r"column \"text\" holds int64, not strings; found columns \['text'\]",
    ),
    "messages as JSON strings": (
        lambda d: bad_parquet(d, pa.table({"messages": [json.dumps(MULTI)]})),
        r"column \"messages\" holds string, not lists of \{role, content\}",
    ),
    "null text": (lambda d: bad_parquet(d, pa.table({"text": ["a", None]})), r"bad.parquet row 1: \"text\" is null"),
    "no assistant turn (parquet)": (
        lambda d: bad_parquet(d, pa.Table.from_pylist([{"messages": MULTI[1:3]}, {"messages": MULTI[:2]}])),
        r"bad.parquet row 1: no assistant turn",
    ),
    "corrupt file in a parquet dir": (lambda d: junk_parquet_dir(d), r"x.parquet is not a Parquet file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_usage_error(toks, tmp_path, case):
    make, match = CASES[case]
    with pytest.raises(UsageError, match=match):
        load_text(make(tmp_path), toks["chat"], TextSettings())


def test_tokenizer_without_chat_template_and_failing_templates(toks, tmp_path):
    p = bad_chat(tmp_path, [{"messages": MULTI}])
    with pytest.raises(UsageError, match="has none; pass --chat-template FILE"):
        load_text(p, toks["bare"], TextSettings())
    with pytest.raises(UsageError, match=r"line 1: --chat-template failed: roles must alternate"):
        load_text(p, toks["bare"], TextSettings(chat_template="{{ raise_exception('roles must alternate') }}"))
    with pytest.raises(UsageError, match="--prompt-template is for prompt/response rows"):
        load_text(p, toks["chat"], TextSettings(prompt_template="Q: {prompt}"))
    (tmp_path / "t.txt").write_text("just words")
    with pytest.raises(UsageError, match="not a Jinja template"):
        read_chat_template(str(tmp_path / "t.txt"))
    with pytest.raises(UsageError, match="cannot read --chat-template"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_dataset_dict_asks_for_a_split_and_missing_pyarrow_names_the_extra(toks, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "a b"}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        UsageError,
        match=r"holds several splits \(train, test\); pass one of them as DATA, e\.g\. "
        r".*dd/train",
    ):
        load_text(str(tmp_path / "dd"), toks["chat"], TextSettings())
    assert load_text(str(tmp_path / "dd" / "train"), toks["chat"], TextSettings()).n == 1
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UsageError, match=r"pyarrow.*pip install 'kdcli\[data-lm\]'"):
        load_text(str(tmp_path / "dd" / "train"), toks["chat"], TextSettings())


def test_cli_bad_parquet_exits_2_with_one_line_and_writes_nothing(toks, tmp_path):
    teacher = make_llama(tmp_path / "teacher", toks["dir"])
    data = bad_parquet(tmp_path, pa.table({"question": ["a"]}))
    out = tmp_path / "cache"
    r = runner.invoke(app, ["cache-teacher", "--teacher", str(teacher), "--data", data, "--out", str(out)])
    assert r.exit_code == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "found columns ['question']" in lines[0]
    assert not out.exists()
    p = bad_chat(tmp_path, [{"messages": MULTI[:2]}])
    r = runner.invoke(app, ["cache-teacher", "--teacher", str(teacher), "--data", p, "--out", str(out)])
    assert r.exit_code == 2 and "line 1: no assistant turn" in r.stderr and not out.exists()


def test_multi_turn_chat_parquet_through_cache_train_and_eval(toks, tmp_path):
    """Multi-turn chat rows (per-token target masks) through the one pipeline: the cache holds exactly the
    assistant tokens of every turn, the teacher's log-prob at each equals the teacher run directly, train-student
    trains on the same positions (row hashes and counts checked per batch) and eval reads the run."""
    import torch

    from kdcli.cache.tokens import TokenCacheReader
    from kdcli.config import CacheConfig, EvalConfig, TrainConfig, resolve
    from kdcli.stages.cache import cache_teacher
    from kdcli.stages.evaluate import evaluate
    from kdcli.stages.train import train_student

    teacher = make_llama(tmp_path / "teacher", toks["root"] / "bare")  # its tokenizer has no chat template
    template = write_file(tmp_path / "chatml.jinja", CHATML)
    rows = chat_rows(8, multi=True)
    spec = write_formats(tmp_path / "rows", rows)["parquet"]
    cache_teacher(
        resolve(
            CacheConfig,
            None,
            dict(
                teacher=str(teacher),
                data=spec,
                out=str(tmp_path / "c"),
                top_k=4,
                max_length=128,
                chat_template=str(template),
            ),
        )
    )
    reader = TokenCacheReader(tmp_path / "c")
    cached = reader.read_rows(0, reader.num_rows)
    tok = toks["bare"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    at = 0
    for i, row in enumerate(rows):
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        ids, mask = render_chat(tok, msgs, CHATML)
        targets = np.flatnonzero(mask)
        assert cached["lengths"][i] == len(targets)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = logp[torch.tensor(targets - 1), torch.tensor(np.asarray(ids)[targets])].numpy()
        got = cached["target_logprobs"][at : at + len(targets)].astype(np.float32)
        assert np.allclose(got, want, atol=2e-2), i
        at += len(targets)
    assert sum(len(m["content"]) > 0 for r in rows for m in r["messages"] if m["role"] == "assistant") > len(rows)
    summary = train_student(
        resolve(
            TrainConfig,
            None,
            dict(
                cache=str(tmp_path / "c"),
                data=spec,
                out=str(tmp_path / "run"),
                student="transformer",
                student_args={"d_model": 16, "n_layers": 1, "n_heads": 2},
                epochs=1,
                batch_size=4,
                temperature=2.0,
            ),
        )
    )
    assert summary.train_tokens == int(cached["lengths"].sum())
    report = evaluate(
        resolve(EvalConfig, None, dict(model=[str(tmp_path / "run")], data=spec, cache=str(tmp_path / "c")))
    )
    assert report.models[0].num_tokens == int(cached["lengths"].sum()) and 0 <= report.models[0].agreement <= 1
