"""Prompt (context) distillation: teach SmolLM2-135M-Instruct to behave, unprompted, as it does with a system prompt.

    python examples/lm-prompt-distill/run.py [--out out/lm-prompt-distill] [--train-prompts 48] ...

The teacher is SmolLM2-135M-Instruct *with* a system prompt (a pirate persona) that the student never sees; the
student is the same model without it. kdcli caches the prompted teacher's log-probs at the response positions only
(`--teacher-prompt`), aligned one to one with the student's positions, and trains the student on them.

1. Prompts: questions about topics; the held-out prompts are about topics never trained on. Responses are written
   by the prompted teacher (greedy decoding; this data-preparation step uses transformers directly).
2. `cache-teacher --teacher-prompt SYSTEM_TEMPLATE --prompt-template USER_TEMPLATE` on train and held-out prompts.
3. `eval` before: the unprompted model vs the prompted teacher on held-out prompts (KL, top-1 agreement).
4. `train-student` from the cache (alpha 1, T 1), then `eval` after on the same held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_common import OUT, ensure_project_env, kdcli, smollm2_gguf, write_jsonl  # noqa: E402

ensure_project_env("teacher")  # kdcli, else the quick start's .venv (re-run with it), else the command to run

SYSTEM = "You are a pirate captain. Answer every question in pirate speak, starting with 'Arr!'"
USER = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
TEACHER = "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n" + USER
TOPICS = [
    "the ocean",
    "bread",
    "the moon",
    "rain",
    "music",
    "gold",
    "maps",
    "birds",
    "winter",
    "cats",
    "coffee",
    "trees",
    "books",
    "stars",
    "boats",
    "fire",
    "mountains",
    "gardens",
    "clocks",
    "honey",
]
HELDOUT_TOPICS = ["volcanoes", "bicycles", "chess", "apples", "bridges", "snow", "libraries", "wolves"]
FORMS = [
    "Tell me about {t}.",
    "What do you think of {t}?",
    "Give me one fact about {t}.",
    "Describe {t} in two sentences.",
    "Why do people like {t}?",
    "Write a short note about {t}.",
]


def prompts(topics: list[str], n: int) -> list[str]:
    out = [f.format(t=t) for f in FORMS for t in topics]
    return out[:n]


def generate(teacher: str, questions: list[str], max_new: int, batch: int = 16) -> list[str]:
    """Responses of the *prompted* teacher (greedy)."""
    import torch

    from kdcli.lm.hf import build_lm
    from kdcli.lm.text import load_tokenizer

    tok = load_tokenizer(teacher)
    model, _ = build_lm(teacher)
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    for a in range(0, len(questions), batch):
        texts = [TEACHER.format(prompt=q) for q in questions[a : a + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        out += [tok.decode(g[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for g in gen]
        print(f"generated {len(out)}/{len(questions)} responses", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT / "lm-prompt-distill"))
    ap.add_argument("--teacher", default=None, help="teacher MODEL (default: the packaged SmolLM2 GGUF file)")
    ap.add_argument("--train-prompts", type=int, default=48)
    ap.add_argument("--heldout-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", default="5e-5")
    args = ap.parse_args()
    out = Path(args.out)
    teacher = args.teacher or str(smollm2_gguf())
    t0 = time.perf_counter()

    train_q = prompts(TOPICS, args.train_prompts)
    held_q = prompts(HELDOUT_TOPICS, args.heldout_prompts)
    answers = generate(teacher, train_q + held_q, args.max_new_tokens)
    rows = [{"prompt": q, "response": r} for q, r in zip(train_q + held_q, answers)]
    train = write_jsonl(out / "train.jsonl", rows[: len(train_q)])
    heldout = write_jsonl(out / "heldout.jsonl", rows[len(train_q) :])

    common = [
        "--teacher",
        teacher,
        "--teacher-prompt",
        TEACHER,
        "--prompt-template",
        USER,
        "--top-k",
        64,
        "--max-length",
        128,
        "--batch-size",
        8,
    ]
    kdcli("cache-teacher", *common, "--data", train, "--out", out / "cache-train", "--overwrite")
    kdcli("cache-teacher", *common, "--data", heldout, "--out", out / "cache-heldout", "--overwrite")

    before = kdcli(
        "eval", "--model", teacher, "--data", heldout, "--cache", out / "cache-heldout", "--json", json_out=True
    )
    kdcli(
        "train-student",
        "--student",
        teacher,
        "--cache",
        out / "cache-train",
        "--data",
        train,
        "--alpha",
        1,
        "--temperature",
        1,
        "--epochs",
        args.epochs,
        "--batch-size",
        8,
        "--lr",
        args.lr,
        "--out",
        out / "student",
        "--overwrite",
    )
    after = kdcli(
        "eval", "--model", out / "student", "--data", heldout, "--cache", out / "cache-heldout", "--json", json_out=True
    )
    pick = lambda m: {k: m[k] for k in ("kl_to_teacher", "agreement", "perplexity")}  # noqa: E731
    results = {
        "system_prompt": SYSTEM,
        "train_prompts": len(train_q),
        "heldout_prompts": len(held_q),
        "heldout_response_tokens": after["num_tokens"],
        "before": pick(before["models"][0]),
        "after": pick(after["models"][0]),
        "prompted_teacher_perplexity": after["teacher"]["perplexity"],
        "example": rows[len(train_q)],
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
