"""Multi-prompt fusion: one teacher under several system prompts, fused into one student.

    python examples/multi-prompt-fusion/run.py [--out out/multi-prompt-fusion] [--train 40] [--heldout 20] [--epochs 2]

The teacher is SmolLM2-135M-Instruct (the packaged GGUF file, nothing is downloaded) reading a system prompt the
student never sees; the student is the same model without one. Each of three system prompts gives one cache
(`cache-teacher --teacher-prompt ...`, full log-probs at the answer tokens only: small); the student is distilled
from each cache alone and from the three fused (`--cache A --cache B --cache C`, the mixture of the prompted
teachers, and `--combine geometric`). Every student is measured on held-out questions against the *true* answers
(perplexity and next-token accuracy on the answer tokens), and the prompted teachers themselves are measured the
same way from their caches. The rows are "What is the capital of X?" -> "Y." (true answers, written here).
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

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Austria", "Vienna"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Colombia", "Bogota"),
    ("Kenya", "Nairobi"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Cuba", "Havana"),
    ("Ukraine", "Kyiv"),
    ("the Czech Republic", "Prague"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Iceland", "Reykjavik"),
    ("Switzerland", "Bern"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Indonesia", "Jakarta"),
    ("Malaysia", "Kuala Lumpur"),
    ("Saudi Arabia", "Riyadh"),
    ("Israel", "Jerusalem"),
    ("Lebanon", "Beirut"),
    ("Syria", "Damascus"),
    ("Morocco", "Rabat"),
    ("Tunisia", "Tunis"),
    ("Algeria", "Algiers"),
    ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"),
    ("Ghana", "Accra"),
    ("Venezuela", "Caracas"),
    ("Uruguay", "Montevideo"),
]
USER = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
SYSTEMS = {
    "terse": "Answer with the name of the city only.",
    "geographer": "You are a geography teacher. Reply with just the capital city.",
    "assistant": "You are a helpful assistant. Be correct and brief.",
}


def hf_copy(gguf: str, out: Path) -> str:
    """The GGUF teacher dequantised once into a Hugging Face directory (safetensors + tokenizer): every kdcli
    command then loads it in seconds instead of dequantising the GGUF file again (minutes on 2 busy cores)."""
    if (out / "config.json").is_file():
        return str(out)
    from transformers import LlamaForCausalLM

    from kdcli.lm.hf import build_lm
    from kdcli.lm.text import load_tokenizer

    print(f"converting {gguf} to {out} (once)", file=sys.stderr, flush=True)
    model, _ = build_lm(gguf)
    plain = LlamaForCausalLM(
        model.config.__class__.from_dict(
            {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        )
    )
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(gguf).save_pretrained(str(out))
    return str(out)


def rows(pairs) -> list[dict]:
    return [{"prompt": f"What is the capital of {c}?", "response": f"{a}."} for c, a in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT / "multi-prompt-fusion"))
    ap.add_argument(
        "--teacher",
        default=None,
        help="teacher MODEL (default: the packaged SmolLM2 GGUF file, "
        "converted once to a Hugging Face dir under --out)",
    )
    ap.add_argument("--train", type=int, default=32, help="training questions")
    ap.add_argument("--heldout", type=int, default=16, help="held-out questions")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", default="2e-5")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    teacher = args.teacher or hf_copy(str(smollm2_gguf()), out / "smollm2-hf")
    pairs = CAPITALS[: args.train + args.heldout]
    train = write_jsonl(out / "train.jsonl", rows(pairs[: args.train]))
    heldout = write_jsonl(out / "heldout.jsonl", rows(pairs[args.train :]))

    caches: dict[str, dict[str, Path]] = {}
    for name, system in SYSTEMS.items():
        template = "<|im_start|>system\n" + system + "<|im_end|>\n" + USER
        common = [
            "--teacher",
            teacher,
            "--teacher-prompt",
            template,
            "--prompt-template",
            USER,
            "--mode",
            "full",
            "--max-length",
            64,
            "--batch-size",
            8,
        ]
        caches[name] = {}
        for split, data in (("train", train), ("heldout", heldout)):
            caches[name][split] = out / f"cache-{name}-{split}"
            kdcli("cache-teacher", *common, "--data", data, "--out", caches[name][split], "--overwrite")

    def heldout_eval(model, cache_args) -> dict:
        r = kdcli("eval", "--model", model, "--data", heldout, *cache_args, "--json", json_out=True)
        m = r["models"][0]
        return {
            "perplexity": m["perplexity"],
            "accuracy": m["accuracy"],
            "kl_to_teacher": m["kl_to_teacher"],
            "teacher_perplexity": r["teacher"]["perplexity"],
        }

    def cache_args(names, split, combine="mean"):
        a = [x for n in names for x in ("--cache", caches[n][split])]
        return a + (["--combine", combine] if len(names) > 1 else [])

    results: dict = {
        "teacher": Path(teacher).name,
        "train_questions": args.train,
        "heldout_questions": len(pairs) - args.train,
        "systems": SYSTEMS,
        "students": {},
    }
    # the unprompted model before any training, measured against the fused held-out teacher
    results["before"] = heldout_eval(teacher, cache_args(list(SYSTEMS), "heldout"))
    runs = [([n], "mean") for n in SYSTEMS] + [(list(SYSTEMS), "mean"), (list(SYSTEMS), "geometric")]
    for names, combine in runs:
        label = names[0] if len(names) == 1 else f"fused-{combine}"
        student = out / f"student-{label}"
        kdcli(
            "train-student",
            "--student",
            teacher,
            *cache_args(names, "train", combine),
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
            student,
            "--overwrite",
        )
        results["students"][label] = heldout_eval(student, cache_args(names, "heldout", combine))
    singles = {n: results["students"][n]["perplexity"] for n in SYSTEMS}
    results["best_single_prompt"] = min(singles, key=singles.get)
    results["wall_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
