"""Distil SmolLM2-135M-Instruct (GGUF, vocabulary 49,152) into a student with ANOTHER tokenizer: a 4,096-token BPE
trained here on the Shakespeare training text.

    python examples/lm-cross-tokenizer/run.py [--out out/lm-cross-tokenizer] [--train-chars 90000] ...

Steps (each kdcli step a command, printed as it runs):
1. JSONL text from the `shakespeare` package: four tragedies for training, The Tempest held out.
2. The student's tokenizer: a byte-level BPE (`tokenizers`, vocabulary --student-vocab) trained on the training
   text only, saved as a Hugging Face tokenizer directory.
3. `cache-teacher`: SmolLM2 once over the training text (top-64 log-probs per token, with each token's place in the
   text) and over the held-out text, with SmolLM2's own tokenizer.
4. `train-student` with the student's tokenizer, same student, same steps: on the next tokens alone (alpha 0, the
   baseline), then from the cache with `--cross-tokenizer METHOD` for each of --methods.
5. `eval --cross-tokenizer` on the held-out play: bits per byte (the tokenizer-free yardstick) of every student and
   of the teacher (from the held-out cache), the share of aligned positions, KL and top-1 agreement on them.

Everything runs on the CPU. Re-running reuses complete caches and finished runs. results.json holds the numbers.
Measured at these defaults on 2 shared CPU cores (23 min, most of it caching): held-out bits per byte labels only
3.806, aligned 3.595, hybrid 3.606, uld 3.881, the teacher 2.030 (docs/lm.md, "Any teacher, any student").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_common import OUT, ensure_project_env, kdcli, play_rows, smollm2_gguf, write_jsonl  # noqa: E402

ensure_project_env("teacher", "text")  # kdcli, else the quick start's .venv (re-run with it), else the command to run

TRAIN_PLAYS = ["hamlet", "macbeth", "othello", "lear"]
HELDOUT_PLAY = "tempest"


def train_tokenizer(rows: list[dict], vocab_size: int, out: Path) -> Path:
    """A GPT-2 style byte-level BPE trained on ``rows`` (``<pad>``, ``<eos>``), saved as a Hugging Face tokenizer
    directory (tokenizer.json: a fast tokenizer, with the character offsets cross-tokenizer distillation needs)."""
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([r["text"] for r in rows], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(str(out))
    return out


def train_once(run_dir: Path, *args) -> None:
    """train-student into run_dir, unless a re-run finds it finished (a killed run resumes from its checkpoint)."""
    if (run_dir / "summary.json").exists():
        print(f"reusing the finished run {run_dir} (delete it to train again)", file=sys.stderr)
        return
    kdcli("train-student", *args, "--out", run_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT / "lm-cross-tokenizer"))
    ap.add_argument("--teacher", default=None, help="teacher MODEL (default: the packaged SmolLM2 GGUF file)")
    ap.add_argument("--train-chars", type=int, default=90_000, help="characters of training text (all plays)")
    ap.add_argument("--heldout-chars", type=int, default=12_000)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per sequence (each tokenizer its own)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--student-vocab", type=int, default=4096, help="vocabulary of the student's BPE")
    ap.add_argument("--methods", default="aligned,uld,hybrid", help="--cross-tokenizer methods to train with")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher term (the rest: labels)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", default="2e-3")
    ap.add_argument("--student-args", default="d_model=128,n_layers=4,n_heads=4")
    args = ap.parse_args()
    out = Path(args.out)
    teacher = args.teacher or str(smollm2_gguf())
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()

    per_play = args.train_chars // len(TRAIN_PLAYS)
    train_rows = [r for p in TRAIN_PLAYS for r in play_rows(p, per_play)]
    train = write_jsonl(out / "train.jsonl", train_rows)
    heldout = write_jsonl(out / "heldout.jsonl", play_rows(HELDOUT_PLAY, args.heldout_chars))
    student_tok = train_tokenizer(train_rows, args.student_vocab, out / "student-tokenizer")

    common = ["--teacher", teacher, "--max-length", args.max_length, "--top-k", args.top_k, "--batch-size", 8]
    kdcli("cache-teacher", *common, "--data", train, "--out", out / "cache-train", "--overwrite")
    kdcli("cache-teacher", *common, "--data", heldout, "--out", out / "cache-heldout", "--overwrite")

    student = []
    for kv in args.student_args.split(","):
        student += ["--student-arg", kv]
    budget = [
        "--student",
        "transformer",
        *student,
        "--tokenizer",
        student_tok,
        "--max-length",
        args.max_length,
        "--data",
        train,
        "--epochs",
        args.epochs,
        "--batch-size",
        8,
        "--lr",
        args.lr,
        "--schedule",
        "cosine",
        "--warmup-steps",
        10,
    ]
    train_once(out / "labels-only", *budget, "--alpha", 0)
    for m in methods:
        train_once(
            out / m,
            *budget,
            "--cache",
            out / "cache-train",
            "--cross-tokenizer",
            m,
            "--alpha",
            args.alpha,
            "--temperature",
            args.temperature,
        )

    names = ["labels-only", *methods]
    models = [a for n in names for a in ("--model", out / n)]
    rep = kdcli(
        "eval",
        *models,
        "--model",
        teacher,
        "--data",
        heldout,
        "--cache",
        out / "cache-heldout",
        "--cross-tokenizer",
        methods[0] if methods else "aligned",
        "--max-length",
        args.max_length,
        "--json",
        json_out=True,
    )
    manifest = json.loads((out / "cache-train" / "manifest.json").read_text())
    summaries = {n: json.loads((out / n / "summary.json").read_text()) for n in names}
    results = {
        "train_tokens_teacher": manifest["data"]["num_targets"],
        "student_vocab": args.student_vocab,
        "heldout_teacher_tokens": rep["num_tokens"],
        "teacher_bits_per_byte_from_cache": rep["teacher"]["bits_per_byte"],
        "teacher_perplexity_from_cache": rep["teacher"]["perplexity"],
        "steps": {n: s["steps"] for n, s in summaries.items()},
        "train_aligned_share": {n: summaries[n].get("aligned_share") for n in methods},
        "models": {
            name: {
                k: m[k]
                for k in (
                    "bits_per_byte",
                    "perplexity",
                    "accuracy",
                    "aligned_share",
                    "teacher_aligned_share",
                    "agreement",
                    "kl_to_teacher",
                    "num_parameters",
                    "num_tokens",
                )
            }
            for name, m in zip([*names, "teacher"], rep["models"])
        },
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
