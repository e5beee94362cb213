"""Generation + cache in one pass vs generation alone and vs generation then a separate scoring pass.

    python benchmarks/bench_generate.py                      # tiny random llama (answers in whole words), CPU
    python benchmarks/bench_generate.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf --prompts 4 --max-new-tokens 32

Each variant answers the same prompt rows, greedy, in batches of --batch-size, with the same stop ids and the same
number of decoding steps (max_new_tokens + 1: the cache pass closes an answer that ran out with one forced
end-of-turn step, whose distribution the student needs; the baseline gets that step too):

- ``generate``: transformers' ``model.generate`` (its generation_config neutralised as the cache pass does), no
  logits processor, nothing kept but the tokens;
- ``capture``: :meth:`kdcli.lm.answers.TeacherAnswers.batch` with the cache's top-k reduction (the topk mode's
  ``Mode.reduce`` through ``reduce_logits``, k = --top-k, the tail statistics at --temperatures as cache-teacher
  stores them by default, plus the target's log-prob) on every step: generation, the step reductions, the answer rows,
  the student's and the teacher's views, and the rescoring of rows whose answer does not re-tokenize (counted);
- ``capture-core``: the same generation and step reductions alone (:func:`kdcli.lm.generate.generate_with_capture`
  + :class:`~kdcli.lm.generate.StepReducer`): the overhead of capturing, without building answer rows or rescoring;
- ``two-pass``: ``generate`` then one scoring forward pass over teacher context + answer + end-of-turn with the
  same reduction (what a glue script does today).

Timings interleave the variants (--repeats rounds, the order rotated every round; medians reported), as wall
time and as the process's CPU time (the headline on the CPU with --threads 1: a shared machine's other processes
inflate the wall time, not it). Prints and writes JSON (--out): seconds per variant, capture ÷ generate (target
<= 1.05), capture ÷ two-pass, rows rescored, cached positions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from lm_helpers import CORPUS, make_llama, make_tokenizer, smollm2_gguf, write_jsonl  # noqa: E402

from kdcli.cache.reduce import reduce_logits  # noqa: E402
from kdcli.lm.answers import TeacherAnswers, load_prompts, score_rows  # noqa: E402
from kdcli.lm.generate import GenerationSettings, left_pad, neutral_generation_config  # noqa: E402
from kdcli.lm.text import TextSettings, load_tokenizer  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sea salty?",
    "How do bees make honey?",
    "What is a prime number?",
    "Who wrote Hamlet?",
    "Why is the sky blue?",
    "How far away is the Moon?",
]
TINY_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)


def tiny_teacher(d: Path):
    """A random tiny llama whose answers are whole words (a bias on its output layer keeps it to space + letters
    tokens, which re-tokenize to themselves) and a chat template over its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = make_tokenizer(d / "tok")
    model = AutoModelForCausalLM.from_pretrained(str(make_llama(d / "m", tok_dir, hidden=64, layers=2))).eval()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = TINY_TEMPLATE
    words = [
        i
        for i in range(len(tok))
        if (s := tok.decode([i])).startswith(" ")
        and s[1:].isalpha()
        and tok(s, add_special_tokens=False)["input_ids"] == [i]
    ]
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.fill_(-60.0)
        biased.bias[words] = 0.0
        biased.bias[tok.eos_token_id] = -1.0
    model.lm_head = biased
    return model, tok, [f"quote {i}: {CORPUS[i % len(CORPUS)]}" for i in range(64)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="a .gguf / HF dir teacher (default: a tiny random llama)")
    ap.add_argument("--smollm2", action="store_true", help="the packaged SmolLM2-135M-Instruct GGUF as --teacher")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument(
        "--temperatures",
        default="1,2,4",
        help="the temperatures the top-k reduction stores tail statistics for (cache-teacher's default: 1,2,4)",
    )
    ap.add_argument("--teacher-prompt", default="You are a pirate. Answer like one.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--variants",
        default="generate,capture-core,capture,two-pass",
        help="which variants to time (comma-separated; ratios need their two variants)",
    )
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    if args.smollm2:
        args.teacher = str(smollm2_gguf())
    if args.teacher:
        from kdcli.lm.hf import build_lm

        model, _ = build_lm(args.teacher)
        model.eval()
        tok = load_tokenizer(args.teacher)
        questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
        name = Path(args.teacher).name
    else:
        model, tok, questions = tiny_teacher(tmp)
        questions = questions[: args.prompts]
        name = "tiny random llama (hidden 64, 2 layers, V 300), word answers"
    model.to(device)
    data = write_jsonl(tmp / "prompts.jsonl", [{"prompt": q} for q in questions])
    prompts = load_prompts(str(data), tok, TextSettings(max_length=512), args.teacher_prompt)
    teacher = TeacherAnswers(model, tok, prompts, GenerationSettings(max_new_tokens=args.max_new_tokens))
    V = model.get_output_embeddings().out_features
    temperatures = [float(t) for t in args.temperatures.split(",")]

    def reduce(z, y):
        lp = torch.log_softmax(z.float(), dim=-1)
        return {
            **reduce_logits(lp, "topk", top_k=min(args.top_k, V - 1), temperatures=temperatures),
            "target_logprobs": lp.gather(1, y[:, None])[:, 0].half(),
        }

    from transformers import GenerationConfig

    batches = [(a, min(a + args.batch_size, prompts.n)) for a in range(0, prompts.n, args.batch_size)]
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens + 1,
        do_sample=False,
        num_beams=1,
        eos_token_id=list(teacher.stop_ids),
        pad_token_id=teacher.pad_id,
        use_cache=True,
    )

    def generate_only():
        out = []
        for a, b in batches:
            ids, mask = left_pad(prompts.contexts[a:b], teacher.pad_id)
            with neutral_generation_config(model):
                seqs = model.generate(
                    input_ids=torch.from_numpy(ids).to(device),
                    attention_mask=torch.from_numpy(mask).to(device),
                    generation_config=config,
                )
            for r, s in enumerate(seqs[:, ids.shape[1] :].cpu().tolist()):
                stop = next((k for k, t in enumerate(s) if t in teacher.stop_ids), len(s))
                out.append((a + r, s[:stop]))
        return out

    stats = {}

    def capture():
        rescored = tokens = 0
        for a, b in batches:
            batch = teacher.batch(a, b, reduce, device)
            rescored += int(batch.rescored.sum())
            tokens += int(batch.lengths.sum())
        stats.update(rescored=rescored, cached_positions=tokens)

    from kdcli.lm.generate import StepReducer, generate_with_capture

    def capture_core():
        for a, b in batches:
            collector = StepReducer(reduce)
            out = generate_with_capture(
                model,
                prompts.contexts[a:b],
                budgets=teacher.budgets[a:b],
                closer=prompts.closer,
                stop_ids=teacher.stop_ids,
                pad_id=teacher.pad_id,
                device=device,
                on_step=collector,
            )
            collector.gather(out.positions)

    def two_pass():
        answers = generate_only()
        for a, b in batches:
            seqs = [
                torch.tensor(list(prompts.contexts[r]) + s[: args.max_new_tokens] + [prompts.closer]).numpy()
                for r, s in answers[a:b]
            ]
            firsts = torch.tensor([len(prompts.contexts[r]) for r, _ in answers[a:b]]).numpy()
            score_rows(model, seqs, firsts, None, reduce, device, teacher.pad_id)

    variants = {"generate": generate_only, "capture-core": capture_core, "capture": capture, "two-pass": two_pass}
    variants = {k: variants[k] for k in args.variants.split(",")}
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    names = list(variants)
    with torch.inference_mode():
        generate_only()  # warm-up
        for i in range(args.repeats):
            for k in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order every round
                fn = variants[k]
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)

    def ratios(times):
        med = {k: statistics.median(v) for k, v in times.items()}
        out = {"seconds_median": med, "seconds_all": times}
        for name, (a, b) in {
            "capture_over_generate": ("capture", "generate"),
            "capture_core_over_generate": ("capture-core", "generate"),
            "capture_over_two_pass": ("capture", "two-pass"),
        }.items():
            if a in med and b in med:
                out[name] = med[a] / med[b]
        return out

    # On the CPU the headline is process CPU time: with --threads 1 it is what the pass itself computes, and other
    # processes on a shared machine do not inflate it as they do the wall time. On CUDA: wall time.
    result = {
        "teacher": name,
        "device": str(device),
        "threads": args.threads,
        "prompts": prompts.n,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "top_k": args.top_k,
        "temperatures": temperatures,
        "repeats": args.repeats,
        "cpu_time": ratios(cpu),
        "wall_time": ratios(wall),
        **stats,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
