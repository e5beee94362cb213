"""kdcli.lm.generate: batched generation through transformers' generate with the raw logits captured each step.

References: transformers' own ``model.generate(do_sample=False)`` (token for token), the model's plain forward
pass over context + answer (each captured distribution), transformers' ``TopPLogitsWarper`` (the top-p set), and
exact frequencies of the inverse-CDF sampler on a grid of uniforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_helpers import make_llama, make_tokenizer

from kdcli.cache.reduce import reduce_logits
from kdcli.infra.errors import UsageError
from kdcli.lm.generate import (
    GenerationSettings,
    StepReducer,
    choose_tokens,
    generate_with_capture,
    left_pad,
    step_uniforms,
)

PROMPTS = ["the quick brown", "to be", "a horse a horse my kingdom for", "now is the winter of our", "friends"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("gen-core")
    tok_dir = make_tokenizer(d / "tok")
    model_dir = make_llama(d / "m", tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return model, tok, contexts


def hf_greedy(model, contexts, n, stops, pad):
    """transformers' own greedy generate over left-padded contexts: (b, n) new tokens (pad after a stop)."""
    ids, mask = left_pad(contexts, pad)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=list(stops),
            pad_token_id=pad,
        )
    return out[:, ids.shape[1] :].numpy()


def expected_from_hf(ref_row, stops, n):
    """Our (tokens, finish) for a row transformers generated: up to its first stop (excluded), or all n."""
    hits = [i for i, t in enumerate(ref_row[:n]) if t in stops]
    return (list(ref_row[: hits[0]]), "stop") if hits else (list(ref_row[:n]), "length")


def stops_with_an_early_one(model, tok, contexts, n):
    """EOS plus a token greedy decoding of row 0 emits at step 3 (so some rows stop early, others run out)."""
    free = hf_greedy(model, contexts, n, [tok.eos_token_id], tok.pad_token_id)
    t = int(free[0, 3])
    assert t not in free[0, :3]
    return sorted({tok.eos_token_id, t})


def test_greedy_equals_transformers_generate_batched_and_single(lm):
    model, tok, contexts = lm
    n = 8
    stops = stops_with_an_early_one(model, tok, contexts, n)
    pad = tok.pad_token_id
    ref = hf_greedy(model, contexts, n, stops, pad)  # batched, left-padded
    got = generate_with_capture(
        model, contexts, budgets=[n] * len(contexts), closer=tok.eos_token_id, stop_ids=stops, pad_id=pad
    )
    finishes = set()
    for r in range(len(contexts)):
        want, finish = expected_from_hf(ref[r], stops, n)
        assert got.tokens[r].tolist() == want, r
        assert got.finish[r] == finish
        assert got.positions[r] == len(want) + 1
        finishes.add(finish)
    assert finishes == {"stop", "length"}  # both ways of ending are exercised
    for r, c in enumerate(contexts):  # one row at a time (no padding), against transformers one row at a time
        one = generate_with_capture(model, [c], budgets=[n], closer=tok.eos_token_id, stop_ids=stops, pad_id=pad)
        want, finish = expected_from_hf(hf_greedy(model, [c], n, stops, pad)[0], stops, n)
        assert one.tokens[0].tolist() == want and one.finish[0] == finish
        assert one.tokens[0].tolist() == got.tokens[r].tolist()  # and the batch did not change the answer


def forward_logprobs(model, context, tokens):
    """log_softmax of the plain forward pass at every answer position: (len(tokens) + 1, V)."""
    ids = torch.tensor([list(context) + list(tokens)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (L, V)
    return torch.log_softmax(logits[len(context) - 1 :], dim=-1)


def test_each_captured_distribution_equals_the_forward_pass(lm):
    model, tok, contexts = lm
    n = 6
    stops = stops_with_an_early_one(model, tok, contexts, n)
    raw = {}

    def record(step, logits, targets, active):
        for r in torch.nonzero(active)[:, 0].tolist():
            raw[r, step] = (torch.log_softmax(logits[r], -1).clone(), int(targets[r]))

    def reduce(z, y):
        lp = torch.log_softmax(z, -1)
        return {**reduce_logits(lp, "topk", top_k=5), "target_logprobs": lp.gather(1, y[:, None])[:, 0]}

    reducers = [StepReducer(reduce, compact=True), StepReducer(reduce, compact=False)]

    def both(*a):
        record(*a)
        for red in reducers:
            red(*a)

    budgets = [n, 2, n, n, 3]  # rows 1 and 4 are closed early: their last position is the forced end-of-turn
    got = generate_with_capture(
        model, contexts, budgets=budgets, closer=tok.eos_token_id, stop_ids=stops, pad_id=tok.pad_token_id, on_step=both
    )
    assert got.finish[1] == "length" and got.positions[1] == 3 and got.stop_token[1] == tok.eos_token_id
    assert sorted(k for k in raw) == sorted((r, t) for r in range(len(contexts)) for t in range(got.positions[r]))
    flat = [red.gather(got.positions) for red in reducers]
    assert torch.equal(flat[0]["topk_ids"], flat[1]["topk_ids"])
    off = 0
    for r, c in enumerate(contexts):
        ref = forward_logprobs(model, c, got.tokens[r])  # (positions, V)
        assert ref.shape[0] == got.positions[r]
        for t in range(got.positions[r]):
            lp, target = raw[r, t]
            torch.testing.assert_close(lp, ref[t], atol=1e-4, rtol=0)
            want_target = got.tokens[r][t] if t < len(got.tokens[r]) else tok.eos_token_id
            assert target == want_target
        top = reduce_logits(ref, "topk", top_k=5)
        n_r = int(got.positions[r])
        for f in flat:
            assert torch.equal(f["topk_ids"][off : off + n_r], top["topk_ids"])
            torch.testing.assert_close(
                f["topk_logprobs"][off : off + n_r].float(), top["topk_logprobs"].float(), atol=2e-3, rtol=0
            )  # fp16 storage
            targets = torch.tensor(list(got.tokens[r]) + [tok.eos_token_id])
            torch.testing.assert_close(
                f["target_logprobs"][off : off + n_r], ref.gather(1, targets[:, None])[:, 0], atol=1e-4, rtol=0
            )
        off += n_r
    assert off == len(flat[0]["topk_ids"])


def test_a_checkpoints_generation_config_does_not_reach_the_driver(lm):
    """transformers 5 fills unset generate() fields from model.generation_config: a repetition penalty, suppressed
    tokens or sampling there would change the answer and the captured logits. They must not."""
    model, tok, contexts = lm
    n = 6
    kw = dict(
        budgets=[n] * len(contexts), closer=tok.eos_token_id, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id
    )
    plain = generate_with_capture(model, contexts, **kw)
    gc = model.generation_config
    old = gc.to_dict()
    first = int(plain.tokens[0][0])
    try:
        gc.repetition_penalty, gc.suppress_tokens, gc.do_sample, gc.temperature = 5.0, [first], True, 0.3
        # the checkpoint's config does change transformers' own answer ...
        changed = hf_greedy(model, contexts[:1], n, [tok.eos_token_id], tok.pad_token_id)
        assert changed[0, 0] != first
        again = generate_with_capture(model, contexts, **kw)  # ... and not ours
    finally:
        for k in ("repetition_penalty", "suppress_tokens", "do_sample", "temperature"):
            setattr(gc, k, old.get(k))
    assert all(np.array_equal(a, b) for a, b in zip(plain.tokens, again.tokens))
    assert model.generation_config is gc  # put back


def test_inverse_cdf_sampler_is_exact_on_a_grid():
    torch.manual_seed(0)
    logits = torch.randn(3, 11) * 2
    M = 20000
    u = (torch.arange(M, dtype=torch.float64) + 0.5) / M  # a grid: frequencies are exact up to 1 / M
    for T, P in ((1.0, 1.0), (0.5, 1.0), (2.0, 0.7)):
        for r in range(3):
            toks = choose_tokens(logits[r].expand(M, -1), u, T, P)
            freq = torch.bincount(toks, minlength=11).double() / M
            p = torch.softmax(logits[r].double() / T, -1)
            if P < 1:  # the kept set is transformers' TopPLogitsWarper's
                from transformers import TopPLogitsWarper

                kept = torch.isfinite(TopPLogitsWarper(P)(None, (logits[r : r + 1] / T).clone()))[0]
                p = torch.where(kept, p, torch.zeros_like(p))
                p = p / p.sum()
                assert (freq[~kept] == 0).all()
            assert (freq - p).abs().max() < 2.0 / M


def test_step_uniforms_depend_on_seed_key_and_index_only():
    a = step_uniforms(7, [11, 12, 11], [0, 0, 1], 5)
    assert a.shape == (3, 5) and ((a > 0) & (a < 1)).all()
    assert np.array_equal(a, step_uniforms(7, [11, 12, 11], [0, 0, 1], 5))
    assert np.array_equal(step_uniforms(7, [12], [0], 9)[0, :5], a[1])  # alone, longer: the same stream
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])
    assert not np.array_equal(a, step_uniforms(8, [11, 12, 11], [0, 0, 1], 5))


def test_a_sampled_run_is_the_same_whatever_the_batches(lm):
    model, tok, contexts = lm
    n = 8
    keys = [1000 + 17 * i for i in range(len(contexts))]
    u = step_uniforms(3, keys, [0] * len(contexts), n + 1)
    kw = dict(closer=tok.eos_token_id, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=1.3, top_p=0.9)

    def run(rows):
        g = generate_with_capture(model, [contexts[r] for r in rows], budgets=[n] * len(rows), uniforms=u[rows], **kw)
        return {r: g.tokens[k].tolist() for k, r in enumerate(rows)}

    whole = run(list(range(len(contexts))))
    assert whole == run(list(range(len(contexts))))  # re-run
    assert whole == {**run([0, 1]), **run([2, 3]), **run([4])}  # smaller batches
    assert whole == run([4, 2, 0, 3, 1])  # other order / padding
    assert whole == {**run([3, 0]), **run([1, 4, 2])}  # other company
    for r in range(len(contexts)):  # row by row
        assert whole[r] == run([r])[r]
    greedy = generate_with_capture(
        model,
        contexts,
        budgets=[n] * len(contexts),
        closer=tok.eos_token_id,
        stop_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
    )
    assert any(whole[r] != greedy.tokens[r].tolist() for r in whole)  # it does sample
    other = generate_with_capture(
        model, contexts, budgets=[n] * len(contexts), uniforms=step_uniforms(4, keys, [0] * len(contexts), n + 1), **kw
    )
    assert any(whole[r] != other.tokens[r].tolist() for r in whole)  # another seed, other answers


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(max_new_tokens=0), "--max-new-tokens must be >= 1"),
        (dict(generations_per_prompt=2), "add --sample"),
        (dict(temperature=0.7), "add --sample"),
        (dict(sample=True, temperature=0.0), "--gen-temperature must be > 0"),
        (dict(sample=True, top_p=0.0), "--top-p must be in (0, 1]"),
        (dict(sample=True, top_p=1.5), "--top-p must be in (0, 1]"),
    ],
)
def test_generation_settings_refuse_unusable_values(kw, msg):
    with pytest.raises(UsageError) as e:
        GenerationSettings(**kw).check()
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_greedy_identity_ignores_the_sampling_knobs():
    assert GenerationSettings(seed=1).identity() == GenerationSettings(seed=2).identity()
    assert GenerationSettings(seed=1, sample=True).identity() != GenerationSettings(seed=2, sample=True).identity()
    assert GenerationSettings(max_new_tokens=5).identity() != GenerationSettings(max_new_tokens=6).identity()


def test_a_model_without_generate_is_refused(lm):
    _, tok, contexts = lm
    with pytest.raises(UsageError, match="Hugging Face causal LM"):
        generate_with_capture(
            torch.nn.Linear(2, 2), contexts, budgets=[2] * len(contexts), closer=1, stop_ids=[1], pad_id=0
        )


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
