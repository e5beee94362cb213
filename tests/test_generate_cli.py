"""``cache-teacher --generate`` end to end, through the CLI as a user runs it (in-process).

References: transformers' own ``generate(do_sample=False)`` over the teacher's prompted context (the answers), a
plain ``cache-teacher`` over the written answers file with the same ``--teacher-prompt`` (the cache, in every
mode: today's scoring path, a second forward pass), ``train-student`` / ``eval`` reading the answers file, and a
re-run (sampled answers, interrupted after several numbers of shards and resumed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from generate_helpers import PERSONA, prompt_rows, run, word_teacher, write_jsonl
from lm_helpers import make_llama

from kdcli.cache.manifest import read_manifest

pytest.importorskip("transformers")

GEN_BASE = ["--generate", "--max-length", 64, "--shard-size", 4, "--batch-size", 3]
GEN = [*GEN_BASE, "--max-new-tokens", 6]
SAMPLED = ["--sample", "--gen-temperature", 1.5, "--top-p", 0.95, "--seed", 3, "--generations-per-prompt", 2]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("gencli")
    teacher, tok = word_teacher(d)
    make_llama(d / "student", tok, hidden=16, layers=1, seed=1)
    write_jsonl(d / "prompts.jsonl", prompt_rows(10))
    run("cache-teacher", "--teacher", teacher, "--data", d / "prompts.jsonl", "--out", d / "greedy", "--top-k", 8,
        "--teacher-prompt", PERSONA, *GEN)  # fmt: skip
    return d


def plain_full(ws: Path) -> Path:
    """A full cache over the greedy answers by today's scoring pass (made once)."""
    out = ws / "plain-full-ref"
    if not (out / "manifest.json").exists():
        run("cache-teacher", "--teacher", ws / "wteacher", "--data", ws / "greedy" / "answers.jsonl", "--out", out,
            "--teacher-prompt", PERSONA, "--max-length", 64)  # fmt: skip
    return out


def answers(cache: Path) -> list[dict]:
    return [json.loads(line) for line in (cache / "answers.jsonl").read_text().splitlines()]


def shard_arrays(cache: Path) -> dict[str, np.ndarray]:
    """Every dataset of the cache's shards, concatenated in row order (``offsets`` as tokens per row)."""
    m = read_manifest(cache)
    out: dict[str, list] = {}
    for s in m["shards"]:
        with h5py.File(cache / s["name"], "r") as f:
            for k in f:
                out.setdefault(k, []).append(np.diff(f[k][()]) if k == "offsets" else f[k][()])
    return {k: np.concatenate(v) for k, v in out.items()}


def test_the_answers_file_holds_chat_rows_without_the_teacher_prompt(ws):
    rows = answers(ws / "greedy")
    assert len(rows) == 10
    for i, r in enumerate(rows):
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"] == prompt_rows(10)[i]["prompt"]
        g = r["generation"]
        assert g["prompt_row"] == i and g["index"] == 0 and g["finish_reason"] in ("stop", "length")
        assert g["max_new_tokens"] == 6 and g["sample"] is False and g["seed"] is None
    assert PERSONA not in (ws / "greedy" / "answers.jsonl").read_text()
    m = read_manifest(ws / "greedy")
    gen = m["settings"]["generate"]
    assert gen["max_new_tokens"] == 6 and gen["sample"] is False and gen["answer_kind"] == "chat"
    assert gen["num_prompts"] == 10 and len(gen["prompts_fingerprint"]) == 64
    assert m["answers"]["rows"] == 10 and m["answers"]["rescored"] == 0 and m["answers"]["files"] == ["answers.jsonl"]
    assert m["data"]["spec"].endswith("greedy/answers.jsonl") and m["data"]["num_samples"] == 10
    assert m["settings"]["teacher_prompt"] == PERSONA and m["extra_row_keys"] == ["answer_json"]
    run("cache", "verify", ws / "greedy")  # the answers dataset is part of what verify expects


def test_greedy_answers_equal_transformers_generate(ws):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ws / "wteacher"))
    model = AutoModelForCausalLM.from_pretrained(str(ws / "wteacher")).eval()
    for row, p in zip(answers(ws / "greedy"), prompt_rows(10)):
        msgs = [{"role": "system", "content": PERSONA}, {"role": "user", "content": p["prompt"]}]
        ctx = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(ctx, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()  # fmt: skip
        want = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        got = tok(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        assert got == want
        assert row["generation"]["finish_reason"] == ("stop" if tok.eos_token_id in out else "length")


@pytest.mark.parametrize("mode", ["full", "topk", "sample", "priority"])
def test_the_cache_equals_a_scoring_pass_over_the_answers_in_every_mode(ws, mode, monkeypatch):
    """The generated cache vs today's cache-teacher over answers.jsonl with the same teacher prompt (a second
    forward pass): the same rows and positions; full/topk: the same log-probs (fp16) and top-k ids; sample/priority
    (their draws differ: one reduction per step vs one per batch): every stored log-prob is the full distribution's
    at that id. No row needed rescoring here, so nothing came from a second pass (score_rows is never called)."""
    import kdcli.lm.answers

    def no_second_pass(*a, **k):
        raise AssertionError("a row was rescored")

    size = {"full": [], "topk": ["--top-k", 8], "sample": ["--samples", 6], "priority": ["--samples", 6]}[mode]
    gen, plain = ws / f"gen-{mode}", ws / f"plain-{mode}"
    with monkeypatch.context() as mp:
        mp.setattr(kdcli.lm.answers, "score_rows", no_second_pass)
        run("cache-teacher", "--teacher", ws / "wteacher", "--data", ws / "prompts.jsonl", "--out", gen,
            "--teacher-prompt", PERSONA, "--mode", mode, *size, *GEN)  # fmt: skip
    assert answers(gen) == answers(ws / "greedy")
    run("cache-teacher", "--teacher", ws / "wteacher", "--data", gen / "answers.jsonl", "--out", plain,
        "--teacher-prompt", PERSONA, "--mode", mode, *size, "--max-length", 64)  # fmt: skip
    a, b = shard_arrays(gen), shard_arrays(plain)
    for k in ("row_hash", "offsets"):  # the same rows, the same positions per row
        np.testing.assert_array_equal(a[k], b[k])
    tol = dict(atol=4e-3, rtol=2e-3)  # two fp16 roundings of log-probs of magnitude <= ~8
    np.testing.assert_allclose(a["target_logprobs"].astype(np.float32), b["target_logprobs"].astype(np.float32), **tol)
    if mode == "full":
        np.testing.assert_allclose(a["logprobs"].astype(np.float32), b["logprobs"].astype(np.float32), **tol)
    elif mode == "topk":
        v = b["topk_logprobs"].astype(np.float32)
        clear = np.all(np.diff(-v, axis=1) > 1e-2, axis=1)  # no near-tie inside the top k
        assert clear.mean() > 0.5
        np.testing.assert_array_equal(a["topk_ids"][clear], b["topk_ids"][clear])
        np.testing.assert_allclose(a["topk_logprobs"].astype(np.float32), v, **tol)
    else:
        full = shard_arrays(plain_full(ws))["logprobs"].astype(np.float32)  # the scoring pass, every id
        assert full.shape[0] == len(a["target_logprobs"])
        key = "sample" if mode == "sample" else "priority"
        ids, lp = a[f"{key}_ids"].astype(np.int64), a[f"{key}_logprobs"].astype(np.float32)
        used = lp > -np.inf if mode == "priority" else a["sample_counts"] > 0
        ref = np.take_along_axis(full, ids, axis=1)
        np.testing.assert_allclose(lp[used], ref[used], **tol)


def test_train_student_reads_the_answers_and_refuses_other_answers(ws):
    c = ws / "greedy"
    common = ["--student", ws / "student", "--cache", c, "--epochs", 1, "--batch-size", 4]
    run("train-student", "--data", c / "answers.jsonl", "--out", ws / "run", *common)
    r = run("eval", "--model", ws / "run", "--data", c / "answers.jsonl", "--cache", c, "--json",
            "--latency-repeats", 0)  # fmt: skip
    assert json.loads(r.stdout)["models"][0]["num_tokens"] == read_manifest(c)["data"]["num_targets"]
    rows = answers(c)
    rows[3]["messages"][-1]["content"] = "to be"  # another answer: another row
    other = write_jsonl(ws / "other.jsonl", rows)
    r = run("train-student", "--data", other, "--out", ws / "run2", *common, code=3)
    assert "does not match the data" in r.stderr


def test_a_sampled_run_repeats_after_interruptions_at_several_shard_counts(ws):
    """Sampled answers (2 per prompt) and a sampled cache mode: a re-run, and runs interrupted after 1, 3 and 5
    teacher batches (0, 1 and 2 whole shards: 3-row batches within 4-row shards) then resumed, write the same
    answers and the same shards, byte for byte."""
    cmd = ["cache-teacher", "--teacher", ws / "wteacher", "--data", ws / "prompts.jsonl", "--teacher-prompt",
           PERSONA, "--mode", "priority", "--samples", 4, *GEN, *SAMPLED]  # fmt: skip
    run(*cmd, "--out", ws / "s-ref")
    ref = shard_arrays(ws / "s-ref")
    ref_answers = (ws / "s-ref" / "answers.jsonl").read_bytes()
    rows = answers(ws / "s-ref")
    assert len(rows) == 20 and [r["generation"]["index"] for r in rows[:4]] == [0, 1, 0, 1]
    assert rows[0]["generation"] | {"finish_reason": None, "answer_tokens": None} == {
        "prompt_row": 0, "index": 0, "finish_reason": None, "answer_tokens": None, "max_new_tokens": 6,
        "sample": True, "gen_temperature": 1.5, "top_p": 0.95, "seed": 3,
    }  # fmt: skip
    assert any(rows[2 * i]["messages"][-1] != rows[2 * i + 1]["messages"][-1] for i in range(10))
    greedy = [r["messages"][-1]["content"] for r in answers(ws / "greedy")]
    assert [r["messages"][-1]["content"] for r in rows[::2]] != greedy  # it does sample
    for batches in (1, 3, 5):
        out = ws / f"s-{batches}"
        r = run(*cmd, "--out", out, code=2, env={"KDCLI_TEST_KILL_AT": f"teacher-batch:{batches}:ENOSPC"})
        assert "no space left" in r.stderr and not (out / "answers.jsonl").exists()
        kept = len(read_manifest(out, require_complete=False)["shards"]) if out.exists() else 0
        r = run(*cmd, "--out", out)
        assert (f"{kept} whole shard(s) found" in r.stderr) == (kept > 0)
        assert (out / "answers.jsonl").read_bytes() == ref_answers
        got = shard_arrays(out)
        assert set(got) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    r = run(*cmd, "--out", ws / "s-ref")
    assert "complete and up to date" in r.stderr


def test_other_generation_settings_make_another_cache(ws):
    out = ws / "over"
    shutil.copytree(ws / "greedy", out)
    base = ["cache-teacher", "--teacher", ws / "wteacher", "--data", ws / "prompts.jsonl", "--out", out, "--top-k",
            8, "--teacher-prompt", PERSONA, *GEN_BASE]  # fmt: skip
    r = run(*base, "--max-new-tokens", 4, code=3)
    assert "setting generate differs" in r.stderr
    run(*base, "--max-new-tokens", 4, "--overwrite")
    assert read_manifest(out)["settings"]["generate"]["max_new_tokens"] == 4
    assert max(r["generation"]["answer_tokens"] for r in answers(out)) <= 4
    r = run(*base, "--max-new-tokens", 4, "--seed", 7)  # the seed does not change greedy answers
    assert "complete and up to date" in r.stderr


def test_chat_prompt_rows_and_a_parquet_copy(ws):
    from kdcli.lm.text import load_text, load_tokenizer

    rows = [
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "to be or not"}]},
        {"messages": [{"role": "user", "content": "the quick"}]},
    ]
    out = ws / "chat"
    run("cache-teacher", "--teacher", ws / "wteacher", "--data", write_jsonl(ws / "chat.jsonl", rows), "--out", out,
        "--top-k", 4, "--teacher-prompt", PERSONA, "--answers-parquet", *GEN)  # fmt: skip
    got = answers(out)
    assert got[0]["messages"][:2] == rows[0]["messages"] and got[0]["messages"][2]["role"] == "assistant"
    tok = load_tokenizer(str(ws / "wteacher"))
    from kdcli.lm.text import TextSettings

    s = TextSettings(max_length=64)
    a = load_text(str(out / "answers.jsonl"), tok, s, target_masks=True)
    b = load_text(str(out / "answers.parquet"), tok, s, target_masks=True)
    assert a.fingerprint == b.fingerprint == read_manifest(out)["data"]["fingerprint"]


@pytest.mark.parametrize(
    "data, extra, message",
    [
        ("text", [], "needs prompt rows"),
        ("empty", [], "empty prompt"),
        ("prompts", ["--max-new-tokens", 0], "'max_new_tokens' must be >= 1"),
        ("prompts", ["--gen-temperature", 0.5], "add --sample"),
        ("prompts", ["--max-new-tokens", 6, "--no-pack"], "--no-pack shapes text rows"),
    ],
)
def test_bad_generation_input_writes_nothing(ws, data, extra, message):
    write_jsonl(ws / "text.jsonl", [{"text": "the quick brown fox"}])
    write_jsonl(ws / "empty.jsonl", [{"prompt": "to be"}, {"prompt": "  "}])
    out = ws / f"bad-{data}-{len(extra)}"
    r = run("cache-teacher", "--teacher", ws / "wteacher", "--data", ws / f"{data}.jsonl", "--out", out, *GEN_BASE,
            *(extra or ["--max-new-tokens", 6]), code=2)  # fmt: skip
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_prompt_response_answers_with_a_teacher_template(ws):
    """A tokenizer without a chat template: the answers are prompt/response rows (the response tokenized on its
    own, then EOS); a --teacher-prompt TEMPLATE with {prompt} replaces the prompt for the teacher only."""
    from generate_helpers import make_word_tokenizer

    tok = make_word_tokenizer(ws / "plain-tok", chat_template=None)
    teacher = make_llama(ws / "plain-teacher", tok)
    template = "Answer like a poet: {prompt}"
    out, plain = ws / "pr-gen", ws / "pr-plain"
    common = ["--teacher", teacher, "--teacher-prompt", template, "--top-k", 8]
    run("cache-teacher", *common, "--data", ws / "prompts.jsonl", "--out", out, *GEN)
    rows = answers(out)
    assert set(rows[0]) == {"prompt", "response", "generation"} and rows[0]["prompt"] == prompt_rows(1)[0]["prompt"]
    assert "poet" not in (out / "answers.jsonl").read_text()
    assert read_manifest(out)["settings"]["generate"]["answer_kind"] == "prompt"
    run("cache-teacher", *common, "--data", out / "answers.jsonl", "--out", plain, "--max-length", 64)
    a, b = shard_arrays(out), shard_arrays(plain)
    np.testing.assert_array_equal(a["row_hash"], b["row_hash"])
    np.testing.assert_array_equal(a["offsets"], b["offsets"])
    v = b["topk_logprobs"].astype(np.float32)
    clear = np.all(np.diff(-v, axis=1) > 1e-2, axis=1)
    np.testing.assert_array_equal(a["topk_ids"][clear], b["topk_ids"][clear])
    np.testing.assert_allclose(a["topk_logprobs"].astype(np.float32), v, atol=4e-3, rtol=2e-3)


def test_a_parquet_export_carries_the_cache_over_the_answers_file(ws):
    """cache export --format parquet of a --generate cache: the per-row answers stay behind (one warning line; the
    answers file holds them), every other array crosses, and the import is the token cache over answers.jsonl."""
    c = ws / "greedy"
    r = run("cache", "export", c, "--format", "parquet", "--out", ws / "exported")
    assert "the per-row answers (answer_json)" in r.stderr
    run("cache", "import", ws / "exported", "--format", "parquet", "--out", ws / "imported")
    run("cache", "verify", ws / "imported")
    got, want = shard_arrays(ws / "imported"), shard_arrays(c)
    assert set(want) - set(got) == {"answer_json"}
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    run("train-student", "--data", c / "answers.jsonl", "--cache", ws / "imported", "--student", ws / "student",
        "--epochs", 1, "--batch-size", 4, "--out", ws / "run-imported")  # fmt: skip


def test_a_student_with_another_tokenizer_is_sent_to_a_cache_over_the_answers(ws):
    """A --generate cache records no token spans: --cross-tokenizer refuses it with one line naming the fix (a plain
    cache over answers.jsonl, which does record them), and writes nothing."""
    from lm_helpers import make_tokenizer

    other_tok = make_tokenizer(ws / "bpe")
    make_llama(ws / "xstudent", other_tok, hidden=16, layers=1, seed=2)
    c = ws / "greedy"
    r = run("train-student", "--student", ws / "xstudent", "--data", c / "answers.jsonl", "--cache", c,
            "--cross-tokenizer", "aligned", "--out", ws / "xrun", "--epochs", 1, code=2)  # fmt: skip
    line = r.stderr.strip().splitlines()[-1]
    assert "cache-teacher --generate" in line and "answers.jsonl" in line, r.stderr
    assert not (ws / "xrun").exists()


def test_a_teacher_tokenizer_kdcli_cannot_spell_still_caches_without_spans(ws):
    """The word-level (WordPiece-decoder) tokenizer has offsets but no spelling kdcli reads: cache-teacher writes a
    same-tokenizer cache (no spans, no teacher_vocab.json) and says so, instead of refusing the whole cache."""
    out = ws / "wordpiece-plain"
    r = run("cache-teacher", "--teacher", ws / "wteacher", "--data", ws / "greedy" / "answers.jsonl", "--out", out,
            "--max-length", 64, "--top-k", 4)  # fmt: skip
    assert "no token spans: cannot spell the vocabulary" in r.stderr
    assert "xtok" not in read_manifest(out) and not (out / "teacher_vocab.json").exists()
