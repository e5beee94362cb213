"""Context distillation by generation: SmolLM2-135M-Instruct with a teacher-only persona answers questions; students
learn to answer in the persona without it.

    python examples/lm-context-distill/run.py [--out out/lm-context-distill] [--train-questions 48] ...

1. Questions from text that installs offline (the ``shakespeare`` package): for consecutive speeches of *Hamlet*
   (train) and *Macbeth* (held out), "What does this line from a play mean? <speech>", with the data's own answer:
   the speech that follows it in the play.
2. ``cache-teacher --generate --teacher-prompt PERSONA``: the prompted teacher (a pirate captain) answers the train
   questions (greedy, up to --max-new-tokens), and in the same pass the cache holds its distributions at exactly
   its answer tokens; the answers are written to CACHE_DIR/answers.jsonl without the persona (chat rows). The same
   on the held-out questions gives the eval set: the prompted teacher's own answers and distributions.
3. For comparison, today's path: ``cache-teacher --teacher-prompt PERSONA`` over the data's own answers (the
   prompted teacher's distributions at the play's next speech).
4. Students, each trained from (a) the data's own answers and (b) the teacher's generated answers at the same
   budget: LoRA on SmolLM2 itself (unprompted; saved merged) and a small Llama from scratch with the teacher's
   vocabulary.
5. ``eval`` against the prompted teacher on the held-out generated answers (KL, top-1 agreement), with the
   unprompted SmolLM2 as the "before" row; then transformers loads the LoRA students and the unprompted model and
   answers held-out questions (greedy): how many answers are in persona (hold a pirate word: arr, ahoy, matey ...).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_common import OUT, ensure_project_env, kdcli, shakespeare_dir, smollm2_gguf, write_jsonl  # noqa: E402

ensure_project_env("teacher", "text", "peft")  # kdcli, else the quick start's .venv (re-run with it), else what to run

PERSONA = "You are a pirate captain. Answer every question in pirate speak, starting with 'Arr!'"
QUESTION = 'What does this line from a play mean? "{speech}"'
SPEAKER = re.compile(r"^[A-Z][A-Za-z. ]{1,20}\.$")  # "Ham.", "First Clown." -- a speech's first line
PIRATE = re.compile(r"\b(arr+|ahoy|avast|matey|mateys|hearties|pirates?|aye)\b", re.IGNORECASE)  # in persona


def speeches(play: str, max_chars: int) -> list[str]:
    """The play's speeches in order (speaker line and stage directions dropped, cut at a word to max_chars)."""
    text = (shakespeare_dir() / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace")
    text = text[max(text.find("\nACT I"), 0) :]
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [x.strip() for x in block.strip().splitlines()]
        if len(lines) < 2 or not SPEAKER.match(lines[0]):
            continue
        speech = " ".join(x for x in lines[1:] if x and not x.startswith("["))
        if len(speech) > max_chars:
            speech = speech[:max_chars].rsplit(" ", 1)[0]
        if len(speech) >= 20:
            out.append(speech)
    return out


def questions(play: str, n: int, max_chars: int) -> list[tuple[str, str]]:
    """n (question, the data's own answer) pairs: a speech, and the speech that follows it."""
    s = speeches(play, max_chars)
    return [(QUESTION.format(speech=s[2 * i]), s[2 * i + 1]) for i in range(min(n, len(s) // 2))]


def has_chat_template(model: str) -> bool:
    from kdcli.lm.text import load_tokenizer

    return bool(getattr(load_tokenizer(model), "chat_template", None))


def data_rows(pairs: list[tuple[str, str]], chat: bool) -> list[dict]:
    """The data's own answers as rows the student reads like the answers file: chat rows where the teacher has a
    chat template (the answers file is then chat rows too), prompt/response rows otherwise."""
    if chat:
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    return [{"prompt": q, "response": a} for q, a in pairs]


def reply(model: str, prompts: list[str], chat: bool, max_new: int) -> list[str]:
    """transformers alone, as a user would after distillation: load the model (a run dir is a Hugging Face model
    directory; a .gguf file is read with ``gguf_file=``), ask each question, generate greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(model)
    src, kw = (str(p.parent), {"gguf_file": p.name}) if p.suffix == ".gguf" else (str(p), {})
    tok = AutoTokenizer.from_pretrained(src, **kw)
    lm = AutoModelForCausalLM.from_pretrained(src, **kw).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for q in prompts:
        text = (
            tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            if chat
            else q
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            gen = lm.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT / "lm-context-distill"))
    ap.add_argument(
        "--teacher",
        default=None,
        help="teacher MODEL (default: the packaged SmolLM2 GGUF file); the LoRA students start from the same model",
    )
    ap.add_argument("--train-questions", type=int, default=48)
    ap.add_argument("--heldout-questions", type=int, default=16)
    ap.add_argument("--speech-chars", type=int, default=160, help="longest speech kept (cut at a word)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lora-lr", default="1e-3")
    ap.add_argument("--full-lr", default="3e-3")
    ap.add_argument(
        "--full-student-args",
        default="hidden_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,intermediate_size=128",
    )
    ap.add_argument("--reply-questions", type=int, default=8, help="held-out questions answered by transformers")
    ap.add_argument("--reply-tokens", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    teacher = args.teacher or str(smollm2_gguf())
    t0 = time.perf_counter()
    chat = has_chat_template(teacher)

    train = questions("hamlet", args.train_questions, args.speech_chars)
    held = questions("macbeth", args.heldout_questions, args.speech_chars)
    prompts_train = write_jsonl(out / "train-questions.jsonl", [{"prompt": q} for q, _ in train])
    prompts_held = write_jsonl(out / "heldout-questions.jsonl", [{"prompt": q} for q, _ in held])
    own_train = write_jsonl(out / "train-own-answers.jsonl", data_rows(train, chat))

    common = ["--teacher", teacher, "--teacher-prompt", PERSONA, "--top-k", 64, "--max-length", args.max_length]
    common += ["--batch-size", 8]
    gen = ["--generate", "--max-new-tokens", args.max_new_tokens]
    times = {}
    for name, data in (("train", prompts_train), ("heldout", prompts_held)):
        t = time.perf_counter()
        kdcli("cache-teacher", *common, *gen, "--data", data, "--out", out / f"cache-{name}-generated", "--overwrite")
        times[f"cache-teacher --generate ({name})"] = time.perf_counter() - t
    t = time.perf_counter()
    kdcli("cache-teacher", *common, "--data", own_train, "--out", out / "cache-train-own", "--overwrite")
    times["cache-teacher (train, the data's own answers)"] = time.perf_counter() - t

    sources = {
        "a": (own_train, out / "cache-train-own"),
        "b": (out / "cache-train-generated" / "answers.jsonl", out / "cache-train-generated"),
    }
    full_args = sum([["--student-arg", kv] for kv in args.full_student_args.split(",")], [])
    budget = ["--alpha", 1, "--temperature", 1, "--epochs", args.epochs, "--batch-size", 4, "--overwrite"]
    for key, (data, cache) in sources.items():
        base = ["train-student", "--data", data, "--cache", cache, *budget]
        t = time.perf_counter()
        lora = ["--peft", "lora", "--peft-arg", "r=8", "--peft-arg", "target_modules=[q_proj,k_proj,v_proj,o_proj]"]
        kdcli(*base, "--student", teacher, *lora, "--lr", args.lora_lr, "--out", out / f"lora-{key}")
        times[f"train LoRA ({key})"] = time.perf_counter() - t
        kdcli(*base, "--student", "llama", *full_args, "--lr", args.full_lr, "--out", out / f"llama-{key}")

    names = {
        "before (SmolLM2, unprompted)": teacher,
        "LoRA, (a) data's own answers": out / "lora-a",
        "LoRA, (b) teacher's answers": out / "lora-b",
        "llama, (a) data's own answers": out / "llama-a",
        "llama, (b) teacher's answers": out / "llama-b",
    }
    heldout = out / "cache-heldout-generated"
    models = [a for spec in names.values() for a in ("--model", spec)]
    report = kdcli("eval", *models, "--data", heldout / "answers.jsonl", "--cache", heldout, "--latency-repeats", 0,
                   "--json", json_out=True)  # fmt: skip
    pick = lambda m: {k: m[k] for k in ("kl_to_teacher", "agreement", "perplexity", "num_parameters")}  # noqa: E731
    results_models = dict(zip(names, map(pick, report["models"])))

    asked = [q for q, _ in held[: args.reply_questions]]
    teacher_answers = [
        json.loads(line)["messages"][-1]["content"] if chat else json.loads(line)["response"]
        for line in (heldout / "answers.jsonl").read_text().splitlines()[: len(asked)]
    ]
    replies = {"prompted teacher (answers.jsonl)": teacher_answers}
    replies["before (SmolLM2, unprompted)"] = reply(teacher, asked, chat, args.reply_tokens)
    for key in ("a", "b"):
        replies[f"LoRA ({key})"] = reply(str(out / f"lora-{key}"), asked, chat, args.reply_tokens)
    in_persona = {name: sum(bool(PIRATE.search(r)) for r in rs) / max(len(rs), 1) for name, rs in replies.items()}
    manifest = json.loads((out / "cache-train-generated" / "manifest.json").read_text())
    results = {
        "persona (teacher only)": PERSONA,
        "train_questions": len(train),
        "heldout_questions": len(held),
        "answer_kind": manifest["settings"]["generate"]["answer_kind"],
        "train_answers": manifest["answers"],
        "heldout_answer_tokens": report["num_tokens"],
        "prompted_teacher": report["teacher"],
        "models (held-out teacher answers)": results_models,
        "answers with a pirate word (transformers.generate, greedy)": in_persona,
        "question": asked[0] if asked else None,
        "replies": {name: rs[:2] for name, rs in replies.items()},
        "seconds": times,
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
