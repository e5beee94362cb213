"""kdcli.lm.answers: prompt rows -> the teacher's answers file + the cache over exactly the answer tokens.

The reference for every cached row is today's path over the written answers file: ``load_text`` (the student's
sequences, as train-student reads them) + ``teacher_view`` (the teacher's) + one plain forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_helpers import make_llama, make_tokenizer, write_jsonl

from kdcli.infra.errors import UsageError
from kdcli.lm.answers import TeacherAnswers, chat_closer, load_prompts, write_answers
from kdcli.lm.generate import GenerationSettings
from kdcli.lm.text import TextSettings, load_text, loss_positions, pad_batch, teacher_view

# A ChatML-like template over the test tokenizer's own special tokens: a turn is "role\ncontent<eos>\n".
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)
PERSONA = "Answer like a poet."


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("gen-answers")
    tok_dir = make_tokenizer(d / "tok")
    model_dir = make_llama(d / "m", tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    chat_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    chat_tok.chat_template = TEMPLATE
    raw = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    words = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    make_word_teacher(words, tok)
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"quote {i}: the lady doth"} for i in range(5)])
    return {"dir": d, "tok": tok, "chat_tok": chat_tok, "raw": raw, "words": words, "prompts": prompts}


def make_word_teacher(model, tok) -> None:
    """A teacher that answers in whole words (space + letters, each its own canonical BPE token) or ends the turn:
    its decoded answers re-tokenize to exactly the generated ids. A bias on the output layer does it."""
    words = [
        i
        for i in range(len(tok))
        if (s := tok.decode([i])).startswith(" ")
        and s[1:].isalpha()
        and tok(s, add_special_tokens=False)["input_ids"] == [i]
    ]
    assert len(words) >= 8
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.fill_(-60.0)
        biased.bias[words] = 0.0
        biased.bias[tok.eos_token_id] = -1.0
    model.lm_head = biased


def reduce_full(z, y):
    """The cache's reduction for the tests: every log-prob (fp32) and the target's."""
    lp = torch.log_softmax(z.float(), -1)
    return {"logprobs": lp, "target_logprobs": lp.gather(1, y[:, None])[:, 0]}


def scoring_pass(model, tok, answers: Path, settings: TextSettings, teacher_prompt):
    """Today's cache-teacher path over the answers file: (student TokenData, (tokens, V) log-probs row-major)."""
    data = load_text(str(answers), tok, settings, target_masks=True)
    view = teacher_view(data, tok, teacher_prompt)
    ids, mask = pad_batch(view.seqs, tok.pad_token_id)
    idx, _ = loss_positions(view.seqs, view.first_target, ids.shape[1], view.target_mask)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    return data, torch.log_softmax(logits.reshape(-1, logits.shape[-1])[torch.from_numpy(idx)].float(), -1)


def answer_all(model, tok, prompts, gen, batch_size=None):
    ta = TeacherAnswers(model, tok, prompts, gen)
    step = batch_size or ta.num_rows
    with torch.no_grad():
        return [ta.batch(a, min(a + step, ta.num_rows), reduce_full, "cpu") for a in range(0, ta.num_rows, step)]


def check_cache_equals_scoring(batches, model, tok, path, settings, teacher_prompt, parquet=False):
    records = [r for b in batches for r in b.records]
    write_answers(path, records, parquet=parquet)
    data, ref = scoring_pass(model, tok, path, settings, teacher_prompt)
    assert np.array_equal(data.row_hash, np.concatenate([b.data.row_hash for b in batches]))  # what train reads
    assert all(np.array_equal(a, b) for a, b in zip(data.ids, [s for b in batches for s in b.data.ids]))
    got = torch.cat([b.reduced["logprobs"] for b in batches])
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # the same top-k ids wherever the k-th and (k+1)-th log-probs are not a near-tie
    k = 5
    rv, ri = torch.topk(ref, k + 1, dim=-1)
    clear = (rv[:, k - 1] - rv[:, k]) > 1e-3
    assert torch.equal(torch.topk(got, k, dim=-1).indices[clear], ri[clear, :k])
    tgt = np.concatenate(
        [
            s[m] if m is not None else s[f:]
            for s, f, m in zip(data.ids, data.first_target, data.target_mask or [None] * data.n)
        ]
    )
    torch.testing.assert_close(
        torch.cat([b.reduced["target_logprobs"] for b in batches]),
        ref.gather(1, torch.from_numpy(tgt.astype(np.int64))[:, None])[:, 0],
        atol=1e-4,
        rtol=0,
    )
    return data


def test_aligned_answers_reuse_the_generation_logits_and_equal_the_scoring_pass(env):
    tok, d = env["chat_tok"], env["dir"]
    s = TextSettings(max_length=64)
    prompts = load_prompts(str(env["prompts"]), tok, s, PERSONA)
    batches = answer_all(env["words"], tok, prompts, GenerationSettings(max_new_tokens=10))
    b = batches[0]
    assert not b.rescored.any()  # every answer re-tokenizes to its generated ids: no second pass
    assert "length" in b.generated.finish  # closed at the budget: the end-of-turn position is captured too
    data = check_cache_equals_scoring(batches, env["words"], tok, d / "answers.jsonl", s, PERSONA)
    for k in range(data.n):  # the student's predicted tokens are the generated ids and the end-of-turn
        assert data.ids[k][data.first_target[k] :].tolist() == b.generated.tokens[k].tolist() + [prompts.closer]
    rows = [json.loads(line) for line in (d / "answers.jsonl").read_text().splitlines()]
    assert rows[0]["messages"][0] == {"role": "user", "content": "quote 0: the lady doth"}  # no teacher prompt
    assert all(PERSONA not in json.dumps(r) for r in rows)
    assert rows[0]["messages"][-1]["role"] == "assistant" and rows[0]["generation"]["index"] == 0
    assert rows[0]["generation"]["finish_reason"] in ("stop", "length")


def test_rows_that_do_not_retokenize_are_rescored_and_still_equal_the_scoring_pass(env):
    """A random teacher writes byte soup (cut UTF-8, non-canonical BPE splits): its rows are rescored."""
    tok, d = env["chat_tok"], env["dir"]
    s = TextSettings(max_length=64)
    prompts = load_prompts(str(env["prompts"]), tok, s, PERSONA)
    batches = answer_all(env["raw"], tok, prompts, GenerationSettings(max_new_tokens=10), batch_size=3)
    assert any(b.rescored.any() for b in batches)
    check_cache_equals_scoring(batches, env["raw"], tok, d / "raw.jsonl", s, PERSONA)


def test_mixed_batches_parquet_and_several_generations(env):
    """Sampled, two answers per prompt, 8 of them rescored or not, written as Parquet: the same rows and cache."""
    tok, d = env["chat_tok"], env["dir"]
    s = TextSettings(max_length=48)
    prompts = load_prompts(str(env["prompts"]), tok, s, PERSONA)
    gen = GenerationSettings(
        max_new_tokens=8, sample=True, temperature=1.5, top_p=0.95, generations_per_prompt=2, seed=5
    )
    batches = answer_all(env["words"], tok, prompts, gen, batch_size=4)
    records = [r for b in batches for r in b.records]
    assert len(records) == 10 and [r["generation"]["index"] for r in records[:4]] == [0, 1, 0, 1]
    assert [r["generation"]["prompt_row"] for r in records[:4]] == [0, 0, 1, 1]
    assert any(records[2 * i]["messages"][-1] != records[2 * i + 1]["messages"][-1] for i in range(5))
    assert {r["generation"]["finish_reason"] for r in records} == {"stop", "length"}
    check_cache_equals_scoring(batches, env["words"], tok, d / "answers.parquet", s, PERSONA, parquet=True)
    again = answer_all(env["words"], tok, prompts, gen, batch_size=3)  # other batches: the same answers
    assert [r for b in again for r in b.records] == records


def test_plain_prompts_without_a_chat_template_become_prompt_response_rows(env):
    tok, d = env["tok"], env["dir"]
    s = TextSettings(max_length=40, prompt_template="Q: {prompt}\nA:")
    prompts = load_prompts(str(env["prompts"]), tok, s, "Be brief.")
    assert prompts.kind == "prompt" and prompts.closer == tok.eos_token_id
    batches = answer_all(env["words"], tok, prompts, GenerationSettings(max_new_tokens=6))
    assert not batches[0].rescored.any()
    data = check_cache_equals_scoring(batches, env["words"], tok, d / "pr.jsonl", s, "Be brief.")
    assert data.kind == "prompt"
    row = json.loads((d / "pr.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == "quote 0: the lady doth" and isinstance(row["response"], str) and "messages" not in row


def test_an_empty_answer_is_a_turn_with_only_its_end(env):
    """A teacher that ends the turn at once: the answer is "", the student predicts the end-of-turn alone."""
    tok, d = env["chat_tok"], env["dir"]
    s = TextSettings(max_length=64)
    prompts = load_prompts(str(env["prompts"]), tok, s)
    bias = env["words"].lm_head.bias
    with torch.no_grad():
        bias[tok.eos_token_id] = 8.0
    try:
        batches = answer_all(env["words"], tok, prompts, GenerationSettings(max_new_tokens=5))
        data = check_cache_equals_scoring(batches, env["words"], tok, d / "empty.jsonl", s, None)
    finally:
        with torch.no_grad():
            bias[tok.eos_token_id] = -1.0
    assert all(len(t) == 0 for t in batches[0].generated.tokens) and not batches[0].rescored.any()
    assert data.num_targets.tolist() == [1] * 5
    assert all(r["messages"][-1]["content"] == "" for r in batches[0].records)


def test_the_budget_keeps_every_answer_within_max_length(env):
    tok, d = env["chat_tok"], env["dir"]
    prompts0 = load_prompts(str(env["prompts"]), tok, TextSettings(max_length=64))
    room = 4
    s = TextSettings(max_length=max(len(x) for x in prompts0.student_ids) + 1 + room)
    prompts = load_prompts(str(env["prompts"]), tok, s)
    batches = answer_all(env["words"], tok, prompts, GenerationSettings(max_new_tokens=50))
    assert max(len(t) for t in batches[0].generated.tokens) <= room
    data = check_cache_equals_scoring(batches, env["words"], tok, d / "short.jsonl", s, None)
    assert max(data.lengths) <= s.max_length and "length" in batches[0].generated.finish
    tight = TextSettings(max_length=min(len(x) for x in prompts0.student_ids) + 1)
    with pytest.raises(UsageError, match="leaves no room for an answer"):
        TeacherAnswers(env["words"], tok, load_prompts(str(env["prompts"]), tok, tight), GenerationSettings())


def test_chat_rows_and_a_multi_turn_prompt(env):
    """Chat rows (messages and ShareGPT); an earlier assistant turn is predicted by the student too, so that row is
    rescored; the teacher prompt joins the row's own system message."""
    tok, d = env["chat_tok"], env["dir"]
    rows = [
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "to be or not"}]},
        {
            "messages": [
                {"role": "user", "content": "the quick"},
                {"role": "assistant", "content": " fox"},
                {"role": "user", "content": "and then"},
            ]
        },
        {"messages": [{"role": "user", "content": "a horse"}]},
    ]
    s = TextSettings(max_length=80)
    prompts = load_prompts(str(write_jsonl(d / "chat.jsonl", rows)), tok, s, PERSONA)
    assert tok.decode(prompts.contexts[0]).startswith(f"system\n{PERSONA}\n\nbe kind<eos>")
    assert tok.decode(prompts.student_ids[0]).startswith("system\nbe kind<eos>")
    batches = answer_all(env["words"], tok, prompts, GenerationSettings(max_new_tokens=6))
    assert batches[0].rescored.tolist() == [False, True, False]
    check_cache_equals_scoring(batches, env["words"], tok, d / "chat-answers.jsonl", s, PERSONA)
    share = [{"conversations": [{"from": "human", "value": "to be or not"}]}]
    p2 = load_prompts(str(write_jsonl(d / "sg.jsonl", share)), tok, s)
    assert p2.student[0] == [{"role": "user", "content": "to be or not"}]


@pytest.mark.parametrize(
    "rows, msg",
    [
        ([{"text": "a b c"}], "found a text row"),
        ([{"prompt": "  "}], "empty prompt"),
        ([{"prompt": None}], '"prompt" must be a string'),
        ([{"question": "x"}], "needs prompt rows"),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
            "the last turn is the assistant's",
        ),
        ([{"messages": [{"role": "user", "content": ""}]}], "the last user turn is empty"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], 'needs a known "role"'),
        ([{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}], "mixes prompt rows and chat rows"),
    ],
)
def test_bad_prompt_rows_are_one_line_usage_errors(env, rows, msg):
    p = write_jsonl(env["dir"] / "bad.jsonl", rows)
    with pytest.raises(UsageError) as e:
        load_prompts(str(p), env["chat_tok"], TextSettings())
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_settings_that_cannot_work_with_generation_are_refused(env):
    tok = env["chat_tok"]
    with pytest.raises(UsageError, match="--prompt-loss"):
        load_prompts(str(env["prompts"]), tok, TextSettings(prompt_loss=True))
    with pytest.raises(UsageError, match="drop the \\{prompt\\} placeholder"):
        load_prompts(str(env["prompts"]), tok, TextSettings(), "Persona: {prompt}")
    with pytest.raises(UsageError, match="chat answers need a chat template"):
        load_prompts(str(env["prompts"]), env["tok"], TextSettings(), answer_kind="chat")
    two = TEMPLATE.replace("<eos>\n{% endfor %}", "<eos><pad>\n{% endfor %}")  # a turn ends with 2 tokens
    assert two != TEMPLATE
    with pytest.raises(UsageError, match="one end-of-turn token"):
        chat_closer(tok, two)
    assert chat_closer(tok, None) == tok.eos_token_id


def test_resumed_and_split_runs_give_the_same_answers_and_cache_bit_for_bit(env):
    """The cache pass's batches never cross a shard and every run (fresh, resumed, a torchrun rank) starts at a
    shard boundary (kdcli.stages.cache.batch_ranges), and sampled cache modes seed a generator per batch: with the
    generation seeded per row, a run resumed after any shard or split over ranks repeats every batch exactly."""
    from kdcli.cache.reduce import reduce_logits
    from kdcli.stages.cache import batch_ranges

    tok = env["chat_tok"]
    prompts = load_prompts(str(env["prompts"]), tok, TextSettings(max_length=48), PERSONA)
    teacher = TeacherAnswers(
        env["raw"], tok, prompts, GenerationSettings(max_new_tokens=6, sample=True, seed=9, generations_per_prompt=2)
    )
    shard, bs, seed = 4, 3, 9

    def run(first_shard, last_shard):
        out = {}
        for a, b in batch_ranges(first_shard * shard, min(last_shard * shard, teacher.num_rows), bs, shard):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + a)  # as kdcli.stages.cache.run_teacher seeds it

            def reduce(z, y, gen=gen):
                return reduce_logits(torch.log_softmax(z, -1), "priority", samples=6, generator=gen)

            with torch.no_grad():
                batch = teacher.batch(a, b, reduce, "cpu")
            out[a] = (batch.records, batch.data.row_hash, {k: v.clone() for k, v in batch.reduced.items()})
        return out

    n_shards = -(-teacher.num_rows // shard)
    whole = run(0, n_shards)
    assert any(teacher.batch(a, a + 1, lambda z, y: {"x": z[:, :1]}, "cpu").rescored.any() for a in (0, 1))
    resumed = {**run(0, 1), **run(1, n_shards)}  # killed after shard 0, re-run
    ranks = {**run(0, 2), **run(2, n_shards)}  # two processes, contiguous runs of shards
    for other in (resumed, ranks):
        assert other.keys() == whole.keys()
        for a in whole:
            assert other[a][0] == whole[a][0] and np.array_equal(other[a][1], whole[a][1])
            assert all(torch.equal(other[a][2][k], whole[a][2][k]) for k in whole[a][2])


def test_parquet_prompt_rows_and_the_response_they_carry(env):
    """Parquet DATA goes through kdcli.lm.text.iter_rows like JSONL; a response column is ignored (noted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok, d = env["chat_tok"], env["dir"]
    rows = [{"prompt": f"quote {i}: the lady doth", "response": "ignored"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), d / "pr.parquet")
    from_parquet = load_prompts(str(d / "pr.parquet"), tok, TextSettings(), PERSONA)
    from_jsonl = load_prompts(str(write_jsonl(d / "pr3.jsonl", rows)), tok, TextSettings(), PERSONA)
    assert np.array_equal(from_parquet.row_hash, from_jsonl.row_hash)
    assert any("ignored" in n for n in from_parquet.notes)
    chats = [{"messages": [{"role": "user", "content": "to be or not"}]}]
    pq.write_table(pa.Table.from_pylist(chats), d / "chat.parquet")
    assert load_prompts(str(d / "chat.parquet"), tok, TextSettings()).student[0][0]["content"] == "to be or not"
