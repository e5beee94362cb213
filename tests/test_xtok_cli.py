"""Cross-tokenizer distillation through the CLI (train-student / eval --cross-tokenizer), on a tiny random Llama
teacher and BPE tokenizers trained here.

The identity property end to end: a student whose tokenizer IS the teacher's, sent through --cross-tokenizer
aligned, gets the same loss and the same gradient (one SGD step from the same seeded weights) as the ordinary
same-tokenizer path, for every cache mode (full, topk, sample, priority; T = 2, stored by the sparse caches), for
the fused output layer (built-in transformer, a Hugging Face llama) and the logits path (reverse KL, JSD). The
reference is kdcli's own same-tokenizer path, which tests/test_lm_*.py check against the teacher run directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.lm.hf import build_lm

runner = CliRunner()
STUDENT = ["--student-arg", "d_model=32", "--student-arg", "n_layers=1", "--student-arg", "n_heads=2"]
MODES = {
    "full": ["--mode", "full"],
    "topk": ["--top-k", "8", "--temperatures", "2"],
    "sample": ["--mode", "sample", "--samples", "16", "--temperatures", "2"],
    "priority": ["--mode", "priority", "--samples", "12", "--temperatures", "2"],
}
LR = 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def cli(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtok")
    tok = make_tokenizer(d / "tok")
    teacher = make_llama(d / "teacher", tok)
    text = write_jsonl(d / "text.jsonl", text_rows(24))
    for mode, extra in MODES.items():
        cli("cache-teacher", "--teacher", teacher, "--data", text, "--out", d / f"c-{mode}", "--max-length", 32, *extra)
    return {"dir": d, "tok": tok, "teacher": teacher, "text": text, "student_tok": make_tokenizer(d / "tok2", 270)}


def one_step(ws, out: Path, *extra) -> tuple[dict, dict]:
    """One SGD step (every row in one batch) from the seeded initial weights: (metrics, weights)."""
    cli(
        "train-student",
        "--data",
        ws["text"],
        "--out",
        out,
        "--epochs",
        1,
        "--batch-size",
        64,
        "--optimizer",
        "sgd",
        "--momentum",
        0,
        "--lr",
        LR,
        "--val-fraction",
        0,
        "--alpha",
        0.5,
        "--temperature",
        2,
        *extra,
    )
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return metrics, load_file(str(out / "model.safetensors"))


def initial(spec: str, args: dict | None, vocab: int) -> dict:
    torch.manual_seed(0)  # as train-student seeds before it builds the student
    model, _ = build_lm(spec, args, vocab_size=vocab)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_step(a: tuple, b: tuple, w0: dict) -> None:
    (ma, wa), (mb, wb) = a, b
    for key in ("train_loss", "train_soft", "train_hard"):
        assert mb[key] == pytest.approx(ma[key], rel=2e-5, abs=1e-7), key
    assert wa.keys() == wb.keys()
    moved = 0.0
    for k in wa:
        ga, gb = (w0[k] - wa[k]) / LR, (w0[k] - wb[k]) / LR  # the gradient each path took
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=2e-6)
        moved += float(ga.abs().sum())
    assert moved > 1e-2  # the step moved the weights: the gradients compared are not zero


@pytest.mark.parametrize("mode", list(MODES))
def test_identity_through_the_cli_per_cache_mode(ws, tmp_path, mode):
    cache = ws["dir"] / f"c-{mode}"
    student = ["--student", "transformer", *STUDENT]
    ref = one_step(ws, tmp_path / "same", "--cache", cache, *student)
    xt = one_step(
        ws, tmp_path / "cross", "--cache", cache, *student, "--cross-tokenizer", "aligned", "--tokenizer", ws["teacher"]
    )
    w0 = initial("transformer", {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_length": 1024}, 300)
    assert_same_step(ref, xt, w0)
    summary = json.loads((tmp_path / "cross" / "summary.json").read_text())
    assert summary["aligned_share"] == 1.0 and summary["vocab_map"]["num_matched"] == 300


@pytest.mark.parametrize("mode,divergence", [("topk", "reverse"), ("full", "jsd"), ("priority", "forward")])
def test_identity_hf_student_and_the_logits_path(ws, tmp_path, mode, divergence):
    """A Hugging Face llama student (fused output layer with forward KL; reverse KL and JSD take the logits of its
    forward pass on the ordinary path, the chunked layer on the cross-tokenizer one)."""
    student = make_llama(tmp_path / "student", ws["tok"], hidden=16, layers=1, seed=3)
    cache = ws["dir"] / f"c-{mode}"
    args = ["--cache", cache, "--student", student, "--divergence", divergence]
    ref = one_step(ws, tmp_path / "same", *args)
    xt = one_step(ws, tmp_path / "cross", *args, "--cross-tokenizer", "aligned")
    from transformers import AutoModelForCausalLM

    w0 = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(student)).state_dict().items()}
    assert_same_step(ref, xt, w0)


def test_another_tokenizer_trains_and_eval_reports_bits_per_byte(ws, tmp_path):
    """A student with its own 270-token BPE: refused without the flag; with it, each method trains; eval reports
    bits per byte for the students and the teacher (from the cache), the aligned share, KL and agreement on the
    aligned positions; the teacher measured against its own cache agrees everywhere."""
    base = [
        "--student",
        "transformer",
        *STUDENT,
        "--tokenizer",
        ws["student_tok"],
        "--data",
        ws["text"],
        "--temperature",
        2,
    ]
    r = runner.invoke(
        app, [str(a) for a in ["train-student", *base, "--cache", ws["dir"] / "c-topk", "--out", tmp_path / "x"]]
    )
    assert r.exit_code == 2 and "--cross-tokenizer" in r.stderr and not (tmp_path / "x").exists()
    terms = {  # the printed loss names the method's soft term, not a plain KL
        "aligned": "2^2 * KL(teacher_T || student_T)[string buckets]@aligned",
        "uld": "2^2 * ULD(teacher_T, student_T)@aligned",
        "hybrid": "2^2 * (KL(teacher_T || student_T)[string buckets] + 1 * ULD[rest])@aligned",
    }
    for method in ("aligned", "uld", "hybrid"):
        args = ["train-student", *base, "--cache", ws["dir"] / "c-topk", "--out", tmp_path / method, "--epochs", 1]
        r = runner.invoke(app, [str(a) for a in [*args, "--cross-tokenizer", method]])
        assert r.exit_code == 0 and terms[method] in r.stderr, r.stderr[-3000:]
        s = json.loads((tmp_path / method / "summary.json").read_text())
        assert s["cross_tokenizer"] == method and 0.3 < s["aligned_share"] < 1.0
        assert s["vocab_map"]["num_matched"] > 200 and math.isfinite(s["final_train_loss"])
    rep = json.loads(
        cli(
            "eval",
            "--model",
            tmp_path / "aligned",
            "--model",
            ws["teacher"],
            "--data",
            ws["text"],
            "--cache",
            ws["dir"] / "c-topk",
            "--cross-tokenizer",
            "hybrid",
            "--latency-repeats",
            0,
            "--json",
        )
    )
    student, teacher = rep["models"]
    assert rep["teacher"]["bits_per_byte"] > 0 and student["bits_per_byte"] > 0
    assert 0.3 < student["aligned_share"] < 1.0 and 0.3 < student["teacher_aligned_share"] <= 1.0
    assert student["kl_to_teacher"] > 0 and 0 <= student["agreement"] <= 1 and student["uld_to_teacher"] > 0
    assert teacher["aligned_share"] == teacher["teacher_aligned_share"] == 1.0 and teacher["agreement"] == 1.0
    # the teacher re-run and its cache: the same bits per byte (fp16 log-probs in the cache)
    assert teacher["bits_per_byte"] == pytest.approx(rep["teacher"]["bits_per_byte"], rel=2e-3)
    # the same-tokenizer eval reports bits per byte too (the teacher's from the cache, its covered bytes)
    same = json.loads(
        cli(
            "eval",
            "--model",
            ws["teacher"],
            "--data",
            ws["text"],
            "--cache",
            ws["dir"] / "c-topk",
            "--latency-repeats",
            0,
            "--json",
        )
    )
    assert same["models"][0]["bits_per_byte"] == pytest.approx(teacher["bits_per_byte"], rel=1e-5)
    assert same["teacher"]["bits_per_byte"] == pytest.approx(rep["teacher"]["bits_per_byte"], rel=1e-6)


def test_cache_records_spans_that_cover_the_text(ws):
    """Each cached position's span is the bytes its token covers in its document; verify checks the vocabulary."""
    from kdcli.cache.tokens import TokenCacheReader
    from kdcli.lm.xtok import read_teacher_vocab

    reader = TokenCacheReader(ws["dir"] / "c-topk")
    reader.read_spans = True
    rows = reader.read_rows(0, reader.num_rows)
    docs = [json.loads(line)["text"].encode() for line in ws["text"].read_text().splitlines()]
    vocab = read_teacher_vocab(reader)
    seg, a, b = rows["span_segment"], rows["span_start"], rows["span_end"]
    assert (seg >= 0).all()  # every predicted token of a text row has a key (same tokenizer: every one aligns)
    ids = rows["target_ids"] if "target_ids" in rows else None
    assert ids is None
    for s, x, y in zip(seg[:200], a[:200], b[:200]):
        assert 0 <= x <= y <= len(docs[s])
    widths = (b - a).astype(np.int64)
    assert int((widths == 0).sum()) == 24 - 1  # the EOS after each document but the last cached row's cut
    assert len(vocab) == 300 and vocab.surfaces[1] == "<eos>"
    r = runner.invoke(app, ["cache", "verify", str(ws["dir"] / "c-topk")])
    assert r.exit_code == 0, r.stderr


def test_chat_rows_align_on_assistant_content(ws, tmp_path):
    """Chat rows: each side renders with its own template; only assistant tokens are predicted and cached, and
    the keys are the assistant content's, so two templates over two tokenizers align on it."""
    chat = [
        {"messages": [{"role": "user", "content": "speak"}, {"role": "assistant", "content": r["text"]}]}
        for r in text_rows(8)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", chat)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>{% endfor %}")
    (tmp_path / "s.jinja").write_text("{% for m in messages %}## {{ m.role }}\n{{ m.content }}<eos>{% endfor %}")
    cli(
        "cache-teacher",
        "--teacher",
        ws["teacher"],
        "--data",
        data,
        "--out",
        tmp_path / "c",
        "--top-k",
        8,
        "--chat-template",
        tmp_path / "t.jinja",
        "--max-length",
        64,
    )
    cli(
        "train-student",
        "--student",
        "transformer",
        *STUDENT,
        "--tokenizer",
        ws["student_tok"],
        "--data",
        data,
        "--cache",
        tmp_path / "c",
        "--cross-tokenizer",
        "aligned",
        "--chat-template",
        tmp_path / "s.jinja",
        "--out",
        tmp_path / "run",
        "--epochs",
        1,
        "--max-length",
        64,
    )
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.3 < s["aligned_share"] < 1.0 and s["train_tokens"] < 8 * 64


def test_refusals_and_old_caches(ws, tmp_path):
    """An HF student with its own (other) tokenizer is refused without the flag; several caches are not fused across
    tokenizers; a cache without the token spans (made before them) still serves the teacher's own tokenizer."""
    import shutil

    other = make_llama(tmp_path / "other", ws["student_tok"], hidden=16, layers=1)
    base = ["train-student", "--data", ws["text"], "--temperature", 2, "--epochs", 1]
    c = ws["dir"] / "c-topk"
    r = runner.invoke(app, [str(a) for a in [*base, "--student", other, "--cache", c, "--out", tmp_path / "a"]])
    assert r.exit_code == 2 and "other's tokenizer differs" in r.stderr and "--cross-tokenizer" in r.stderr
    shutil.copytree(ws["dir"] / "c-full", tmp_path / "full2")  # full caches fuse exactly at every T
    fused = ["--cache", ws["dir"] / "c-full", "--cache", tmp_path / "full2"]
    argv = [*base, "--student", other, *fused, "--cross-tokenizer", "aligned"]
    r = runner.invoke(app, [str(a) for a in [*argv, "--out", tmp_path / "b"]])
    assert r.exit_code == 2 and "one --cache" in r.stderr
    old = tmp_path / "old"
    shutil.copytree(c, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["xtok"]
    (old / "manifest.json").write_text(json.dumps(m))
    cli(*base, "--student", "transformer", *STUDENT, "--cache", old, "--out", tmp_path / "same")
    r = runner.invoke(
        app,
        [
            str(a)
            for a in [*base, "--student", other, "--cache", old, "--cross-tokenizer", "uld", "--out", tmp_path / "c"]
        ],
    )
    assert r.exit_code == 2 and "records no token spans" in r.stderr and "--overwrite" in r.stderr


def test_prefix_vocabulary_map_trains(ws, tmp_path):
    """--vocab-map prefix: fewer ids in the rest bucket than the strict map, and a run that trains."""
    cli(
        "train-student",
        "--student",
        "transformer",
        *STUDENT,
        "--tokenizer",
        ws["student_tok"],
        "--data",
        ws["text"],
        "--cache",
        ws["dir"] / "c-full",
        "--cross-tokenizer",
        "hybrid",
        "--vocab-map",
        "prefix",
        "--uld-weight",
        0.3,
        "--epochs",
        1,
        "--out",
        tmp_path / "p",
    )
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["vocab_map"]["projected"] and s["vocab_map"]["student_matched_share"] > 0.9


@pytest.mark.parametrize(
    "peft,args", [("lora", ["--peft-arg", "r=4"]), ("prompt", ["--peft-arg", "num_virtual_tokens=3"])]
)
def test_peft_students_train_across_tokenizers(ws, tmp_path, peft, args):
    """A LoRA and a prompt-tuned Hugging Face student with its own tokenizer, from the teacher's cache."""
    base = make_llama(tmp_path / "base", ws["student_tok"], hidden=16, layers=1, seed=2)
    cli(
        "train-student",
        "--student",
        base,
        "--peft",
        peft,
        *args,
        "--data",
        ws["text"],
        "--cache",
        ws["dir"] / "c-topk",
        "--temperature",
        2,
        "--cross-tokenizer",
        "aligned",
        "--epochs",
        1,
        "--out",
        tmp_path / "r",
    )
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["trainable_parameters"] < s["student_parameters"] and 0.3 < s["aligned_share"] < 1.0
    assert math.isfinite(s["final_train_loss"])
