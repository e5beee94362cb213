"""Chat distillation with LoRA and full students: SmolLM2-135M-Instruct, prompted to play Hamlet, taught to two
students.
    python examples/lm-chat-distill/run.py [--out out/lm-chat-distill] [--train-rows 24] [--heldout-rows 8] ...

1. Chat rows from a dataset that ships in a package: consecutive speeches of Shakespeare's *Hamlet* (the
   ``shakespeare`` package) as multi-turn conversations -- the user says one speech, the assistant answers with the
   next -- with the tokenizer's own chat template (SmolLM2's ChatML). Held-out rows come from *Macbeth*.
2. ``cache-teacher`` on the chat rows with a teacher-only system prompt (``--teacher-prompt``): the teacher reads
   "You are Hamlet ..." before each conversation; the students never do. Only the assistant turns are cached.
3. Two students from the same cache, at the same budget:
   - LoRA: SmolLM2 itself without the prompt, ``--peft lora`` (r 8 on the attention projections), saved merged;
   - full: a small Llama trained from scratch (``--student llama``) with the teacher's vocabulary.
4. ``eval`` of the unprompted SmolLM2 (before), the LoRA student and the full student against the prompted teacher
   on the held-out conversations; then transformers loads each run dir as it is (``from_pretrained(RUN)``) and
   generates a reply.
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

PERSONA = "You are Hamlet, Prince of Denmark: brooding, witty and suspicious. Stay in character."
SYSTEM = "You are an actor in a play. Answer each speech with the next one."
# For teachers whose tokenizer has no chat template (the test suite's tiny random Llama): ChatML, as SmolLM2 uses
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPEAKER = re.compile(r"^[A-Z][A-Za-z. ]{1,20}\.$")  # "Ham.", "First Clown." -- a speech's first line


def speeches(play: str, max_chars: int = 300) -> list[str]:
    """The play's speeches in order (the speaker line dropped, stage directions removed, trimmed to max_chars)."""
    text = (shakespeare_dir() / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace")
    text = text[max(text.find("\nACT I"), 0) :]
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [x.strip() for x in block.strip().splitlines()]
        if len(lines) < 2 or not SPEAKER.match(lines[0]):
            continue
        speech = " ".join(x for x in lines[1:] if x and not x.startswith("["))
        if speech:
            out.append(speech[:max_chars].rsplit(" ", 1)[0] if len(speech) > max_chars else speech)
    return out


def chat_rows(play: str, n: int, turns: int = 2, max_chars: int = 300) -> list[dict]:
    """n conversations of ``turns`` exchanges each, from consecutive speeches (each cut to ``max_chars``)."""
    s = speeches(play, max_chars)
    rows = []
    for i in range(n):
        part = s[i * 2 * turns : (i + 1) * 2 * turns]
        if len(part) < 2 * turns:
            break
        msgs = [{"role": "system", "content": SYSTEM}]
        for a in range(0, len(part), 2):
            msgs += [{"role": "user", "content": part[a]}, {"role": "assistant", "content": part[a + 1]}]
        rows.append({"messages": msgs})
    return rows


def has_chat_template(model: str) -> bool:
    from kdcli.lm.text import load_tokenizer

    return bool(getattr(load_tokenizer(model), "chat_template", None))


def generate(run: Path, messages: list[dict], max_new: int) -> str:
    """transformers alone, as a user would after distillation: load the run dir, chat, generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run))
    model = AutoModelForCausalLM.from_pretrained(str(run)).eval()
    enc = tok.apply_chat_template(
        messages,
        chat_template=None if tok.chat_template else CHATML,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT / "lm-chat-distill"))
    ap.add_argument(
        "--teacher",
        default=None,
        help="teacher MODEL (default: the packaged SmolLM2 GGUF file); the LoRA student starts from the same model",
    )
    ap.add_argument("--train-rows", type=int, default=24)
    ap.add_argument("--heldout-rows", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--speech-chars", type=int, default=200, help="longest speech kept (cut at a word)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lora-lr", default="1e-3")
    ap.add_argument("--full-lr", default="3e-3")
    ap.add_argument(
        "--full-student-args",
        default="hidden_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,intermediate_size=128",
    )
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    out = Path(args.out)
    teacher = args.teacher or str(smollm2_gguf())
    t0 = time.perf_counter()

    train = write_jsonl(out / "train.jsonl", chat_rows("hamlet", args.train_rows, max_chars=args.speech_chars))
    heldout_rows = chat_rows("macbeth", args.heldout_rows, max_chars=args.speech_chars)
    heldout = write_jsonl(out / "heldout.jsonl", heldout_rows)
    template = []
    if not has_chat_template(teacher):
        (out / "chatml.jinja").write_text(CHATML)
        template = ["--chat-template", out / "chatml.jinja"]

    common = [
        "--teacher",
        teacher,
        "--teacher-prompt",
        PERSONA,
        "--top-k",
        64,
        "--max-length",
        args.max_length,
        "--batch-size",
        8,
        *template,
    ]
    for name, data in (("train", train), ("heldout", heldout)):
        kdcli("cache-teacher", *common, "--data", data, "--out", out / f"cache-{name}", "--overwrite")
    budget = [
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
        4,
        "--overwrite",
    ]
    kdcli(
        "train-student",
        "--student",
        teacher,
        "--peft",
        "lora",
        "--peft-arg",
        "r=8",
        "--peft-arg",
        "target_modules=[q_proj,k_proj,v_proj,o_proj]",
        "--lr",
        args.lora_lr,
        "--out",
        out / "lora",
        *budget,
    )
    full_args = sum([["--student-arg", kv] for kv in args.full_student_args.split(",")], [])
    kdcli("train-student", "--student", "llama", *full_args, "--lr", args.full_lr, "--out", out / "full", *budget)

    report = kdcli(
        "eval",
        "--model",
        teacher,
        "--model",
        out / "lora",
        "--model",
        out / "full",
        "--data",
        heldout,
        "--cache",
        out / "cache-heldout",
        "--latency-repeats",
        0,
        "--json",
        json_out=True,
    )
    pick = lambda m: {k: m[k] for k in ("kl_to_teacher", "agreement", "perplexity", "num_parameters")}  # noqa: E731
    models = dict(zip(("before (SmolLM2, unprompted)", "LoRA student", "full student"), map(pick, report["models"])))
    question = heldout_rows[0]["messages"][:2]  # the system message and the first speech
    replies = {name: generate(out / name, question, args.max_new_tokens) for name in ("lora", "full")}
    results = {
        "persona (teacher only)": PERSONA,
        "train_rows": args.train_rows,
        "heldout_rows": len(heldout_rows),
        "heldout_assistant_tokens": report["num_tokens"],
        "prompted_teacher": report["teacher"],
        "models": models,
        "question": question[1]["content"],
        "replies (transformers.generate)": replies,
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
