"""Full vs LoRA vs prompt-tuned students at the same budget on the same cache (tiny, CPU). One run.

    python benchmarks/bench_lm_peft.py [--out /tmp/kd-bench-peft] [--epochs 3] [--seed 0] [--reuse]
        [--lrs full=1e-3:3e-3,lora=1e-2:3e-2:1e-1,prompt=3e-2:3e-1:1]

All models are Hugging Face Llamas made by kdcli itself (`--student llama`), on a byte-level BPE tokenizer (V = 512)
trained here on Shakespeare (the `shakespeare` package):
1. teacher: llama (hidden 128, 4 layers) trained on labels over several plays (--teacher-chars)
2. base student: llama (hidden 64, 2 layers) pretrained on labels over other plays (the "pretrained" model that
   LoRA and prompt tuning adapt)
3. a full cache of the teacher over the distillation text (Hamlet) and a held-out full cache (The Tempest)
4. from the base: full fine-tuning, LoRA (r 8 on every attention and MLP projection) and a 16-token soft prompt
   (initialised from a hard prompt), each distilled with the same cache, steps, batch, alpha and T, at each of its
   learning rates (--lrs); evaluated on the held-out text against the held-out cache (exact KL)

--reuse keeps the teacher, base and caches of an earlier run in --out (only the students are trained again).

Prints a table and writes bench_lm_peft.json in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lm_common import play_rows, write_jsonl  # noqa: E402


def tokenizer(directory: Path, texts: list[str], vocab: int = 512) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(str(directory))
    return directory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/kd-bench-peft")
    ap.add_argument("--teacher-chars", type=int, default=60000)
    ap.add_argument("--base-chars", type=int, default=30000)
    ap.add_argument("--distill-chars", type=int, default=30000)
    ap.add_argument("--heldout-chars", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lrs", default="full=1e-3:3e-3,lora=1e-2:3e-2:1e-1,prompt=3e-2:3e-1:1")
    ap.add_argument("--reuse", action="store_true")
    a = ap.parse_args()

    from kdcli.config import EvalConfig, TrainConfig, resolve
    from kdcli.stages.evaluate import evaluate
    from kdcli.stages.train import train_student

    out = Path(a.out)
    reuse = a.reuse and (out / "heldout-cache" / "manifest.json").is_file()
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    per = a.teacher_chars // 3
    t_rows = play_rows("macbeth", per) + play_rows("lear", per) + play_rows("othello", per)
    b_rows = play_rows("julius_caesar", a.base_chars // 2) + play_rows("romeo_and_juliet", a.base_chars // 2)
    d_rows, h_rows = play_rows("hamlet", a.distill_chars), play_rows("tempest", a.heldout_chars)
    files = {
        n: write_jsonl(out / f"{n}.jsonl", r)
        for n, r in (("teacher", t_rows + d_rows), ("base", b_rows), ("distill", d_rows), ("heldout", h_rows))
    }
    tok = out / "tok" if reuse else tokenizer(out / "tok", [r["text"] for r in t_rows + b_rows + d_rows])
    common = dict(max_length=64, batch_size=16, seed=a.seed)
    t0 = time.perf_counter()
    if not reuse:
        pretrain(out, files, tok, common)
    lrs = {k: [float(x) for x in v.split(":")] for k, v in (kv.split("=") for kv in a.lrs.split(","))}
    methods = {
        "full": {},
        "lora": {
            "peft": "lora",
            "peft_args": {
                "r": 8,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            },
        },
        "prompt": {
            "peft": "prompt",
            "peft_args": {"num_virtual_tokens": 16, "init_text": "A scene from a play by William Shakespeare."},
        },
    }
    runs = {f"{m}-lr{lr:g}": (lr, extra) for m, extra in methods.items() for lr in lrs.get(m, [])}
    results = {"setup": vars(a), "students": {}}
    for name, (lr, extra) in runs.items():
        t = time.perf_counter()
        shutil.rmtree(out / name, ignore_errors=True)
        s = train_student(
            resolve(
                TrainConfig,
                None,
                dict(
                    student=str(out / "base"),
                    data=str(files["distill"]),
                    cache=str(out / "cache"),
                    out=str(out / name),
                    epochs=a.epochs,
                    lr=lr,
                    alpha=1.0,
                    temperature=1.0,
                    schedule="cosine",
                    **common,
                    **extra,
                ),
            )
        )
        results["students"][name] = {
            "lr": lr,
            "steps": s.steps,
            "train_tokens": s.train_tokens,
            "trainable_parameters": s.trainable_parameters or s.student_parameters,
            "seconds": time.perf_counter() - t,
        }
    rep = evaluate(
        resolve(
            EvalConfig,
            None,
            {
                "model": [str(out / n) for n in ("teacher", "base", *runs)],
                "data": str(files["heldout"]),
                "cache": str(out / "heldout-cache"),
                "temperature": 1.0,
            },
        )
    )
    results["teacher_perplexity_from_cache"] = rep.teacher["perplexity"]
    results["heldout_tokens"] = rep.num_tokens
    for m, name in zip(rep.models, ("teacher", "base", *runs)):
        results["students"].setdefault(name, {}).update(
            {
                "perplexity": m.perplexity,
                "kl_to_teacher": m.kl_to_teacher,
                "agreement": m.agreement,
                "parameters": m.num_parameters,
            }
        )
    results["seconds"] = time.perf_counter() - t0
    (out / "bench_lm_peft.json").write_text(json.dumps(results, indent=2))
    print(f"{'model':16} {'trainable':>10} {'params':>9} {'steps':>5} {'ppl':>8} {'KL':>7} {'agree':>6}")
    for name, r in results["students"].items():
        print(
            f"{name:16} {r.get('trainable_parameters', r['parameters']):>10,} {r['parameters']:>9,} "
            f"{r.get('steps', '-'):>5} {r['perplexity']:>8.2f} {r['kl_to_teacher']:>7.4f} {r['agreement']:>6.3f}"
        )


def pretrain(out: Path, files: dict, tok: Path, common: dict) -> None:
    from kdcli.config import CacheConfig, TrainConfig, resolve
    from kdcli.stages.cache import cache_teacher
    from kdcli.stages.train import train_student

    train_student(
        resolve(
            TrainConfig,
            None,
            dict(
                student="llama",
                student_args={"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
                data=str(files["teacher"]),
                tokenizer=str(tok),
                out=str(out / "teacher"),
                epochs=4,
                lr=3e-3,
                schedule="cosine",
                **common,
            ),
        )
    )
    train_student(
        resolve(
            TrainConfig,
            None,
            dict(
                student="llama",
                student_args={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
                data=str(files["base"]),
                tokenizer=str(tok),
                out=str(out / "base"),
                epochs=3,
                lr=3e-3,
                schedule="cosine",
                **common,
            ),
        )
    )
    for name, data in (("cache", "distill"), ("heldout-cache", "heldout")):
        cache_teacher(
            resolve(
                CacheConfig,
                None,
                dict(
                    teacher=str(out / "teacher"), data=str(files[data]), out=str(out / name), mode="full", max_length=64
                ),
            )
        )


if __name__ == "__main__":
    main()
