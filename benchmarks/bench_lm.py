"""LM benchmark: cache size per token, student quality per cache mode, offline vs online step time. One run.

    python benchmarks/bench_lm.py [--teacher SmolLM2.gguf] [--train-chars 12000] [--out /tmp/kd-bench-lm]

Prints (and writes bench_lm.json in --out):
1. bytes/token on disk of the training cache (as cache-teacher writes it: every sparse mode gzip-compressed by
   default) for full, top-k with each of --top-k (8, 64), sample with each of --samples draws (12, 24, 50) and
   priority with each of --priority K (8, 15, 30), how much smaller each is than full fp16 log-probs, and for sample
   and priority the mean number of distinct ids stored per token.
2. student quality for each cache vs the full-logit reference: the same student (built-in transformer), seeds,
   budget (alpha 1, T 1) and batches (train-student --block-rows, so every mode reads the same blocks of
   sequences), measured on held-out text against a held-out *full* teacher cache (exact KL): perplexity,
   KL(teacher || student), top-1 agreement, and each as a ratio to the full-logit student. Every cache trains once
   per --seeds seed (default 0,1,2), ratios use the means, and the full-logit students' spread across seeds is
   printed as the noise floor.
3. step time, per --precisions (fp32, bf16), in a fresh process: offline steps (read a batch from the top-64 cache +
   student forward/backward/update) vs online steps that run the teacher on the same batch (teacher forward +
   top-64 reduction + the same student step), each kind timed as a block of --steps.

Defaults use the packaged SmolLM2-135M-Instruct GGUF teacher and ~3.4k training tokens from Hamlet (held out:
The Tempest): 11 teacher passes and 30 student runs, well over 15 minutes on 2 shared CPU cores; docs/lm.md says
which reduced settings produced its CPU table. --train-plays draws the
training text from several plays (the GPU runs in docs/lm.md used 6 and 12).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lm_common import kdcli, play_rows, smollm2_gguf, write_jsonl  # noqa: E402

from kdcli.cache.reader import mean_unique_ids  # noqa: E402


def step_times(
    teacher: str,
    cache_dir: Path,
    data_path: Path,
    student_args: dict,
    batch: int,
    steps: int,
    top_k: int,
    precision: str = "fp32",
) -> dict:
    import numpy as np
    import torch

    from kdcli.cache.modes import targets_from_arrays
    from kdcli.cache.reduce import reduce_logits, to_host
    from kdcli.cache.tokens import TokenCacheReader
    from kdcli.lm.hf import build_lm, lm_logits
    from kdcli.lm.text import load_text, loss_positions, pad_batch
    from kdcli.stages.train import build_optimizer
    from kdcli.tasks.lm import settings_from_manifest, student_loss, tokenizer_for_cache

    reader = TokenCacheReader(cache_dir)
    tok, _ = tokenizer_for_cache(reader.manifest, None, cache_dir)
    data = load_text(str(data_path), tok, settings_from_manifest(reader.manifest), vocab_size=reader.vocab_size)
    V = reader.vocab_size
    torch.manual_seed(0)
    student, sinfo = build_lm("transformer", student_args, vocab_size=V)
    opt = build_optimizer("adamw", list(student.parameters()), lr=1e-3)  # as train-student builds it
    t_model, tinfo = build_lm(teacher)
    t_model.eval()

    def student_step(seqs, rows, targets):  # what train-student does per step (kdcli.tasks.lm.student_loss)
        ids, mask = pad_batch(seqs)
        idx, y = loss_positions(seqs, data.first_target[rows], ids.shape[1])
        parts, _ = student_loss(
            student,
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            torch.from_numpy(idx),
            targets,
            torch.from_numpy(y),
            temperature=1.0,
            alpha=1.0,
            precision=precision,
        )
        opt.zero_grad()
        parts.total.backward()
        opt.step()
        return len(y)

    batches = list(reader.iter_batches(batch_size=batch, seed=0, epoch=0))[: steps + 1]
    # each kind of step runs as a block, as it would in training (interleaving them would hand every offline step
    # caches just flushed by the 135M-parameter teacher); the first step of each block warms up allocators
    off, on, teacher_s = [], [], []
    for i, b in enumerate(batches):
        rows = b["sample_index"]
        seqs = [data.ids[r] for r in rows]
        t0 = time.perf_counter()
        student_step(seqs, rows, targets_from_arrays(b, reader.mode, V))
        if i:
            off.append(time.perf_counter() - t0)
    for i, b in enumerate(batches):
        rows = b["sample_index"]
        seqs = [data.ids[r] for r in rows]
        t1 = time.perf_counter()
        with torch.inference_mode():  # online: the teacher runs on this batch first
            ids, mask = pad_batch(seqs)
            idx, _ = loss_positions(seqs, data.first_target[rows], ids.shape[1])
            tl = lm_logits(t_model, torch.from_numpy(ids), torch.from_numpy(mask))
            logp = torch.log_softmax(tl.reshape(-1, V)[torch.from_numpy(idx)].float(), -1)
            red = to_host(reduce_logits(logp, "topk", top_k=top_k), V)
        t_teacher = time.perf_counter() - t1
        student_step(seqs, rows, targets_from_arrays(red, "topk", V))
        if i:
            on.append(time.perf_counter() - t1)
            teacher_s.append(t_teacher)
    # the offline timing above excludes the cache read; time the reads of the same batches separately
    t0 = time.perf_counter()
    n_read = sum(1 for _ in reader.iter_batches(batch_size=batch, seed=1, epoch=0))
    read_per_batch = (time.perf_counter() - t0) / max(1, n_read)
    offline = float(np.mean(off)) + read_per_batch
    online = float(np.mean(on))
    return {
        "precision": precision,
        "steps": len(off),
        "offline_step_median_s": float(np.median(off)) + read_per_batch,
        "online_step_median_s": float(np.median(on)),
        "batch_sequences": batch,
        "tokens_per_batch": int(np.mean([b["lengths"].sum() for b in batches])),
        "offline_step_s": offline,
        "online_step_s": online,
        "cache_read_s_per_batch": read_per_batch,
        "teacher_forward_and_reduce_s": float(np.mean(teacher_s)),
        "speedup": online / offline,
        "student_parameters": sinfo.num_parameters,
        "teacher_parameters": tinfo.num_parameters,
    }


def print_timing(timing: dict) -> None:
    for precision, t in timing.items():
        print(
            f"--precision {precision}: offline step {t['offline_step_s'] * 1000:.0f} ms vs online step (teacher in "
            f"the loop) {t['online_step_s'] * 1000:.0f} ms: {t['speedup']:.1f}x faster offline "
            f"({t['tokens_per_batch']} tokens/batch, student {t['student_parameters']:,} params, teacher "
            f"{t['teacher_parameters']:,}; teacher forward + top-k "
            f"{t['teacher_forward_and_reduce_s'] * 1000:.0f} ms)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--out", default="/tmp/kd-bench-lm")
    ap.add_argument("--train-chars", type=int, default=12_000)
    ap.add_argument(
        "--train-plays",
        default="hamlet",
        help="comma-separated plays the training text is drawn from, an equal share of --train-chars each",
    )
    ap.add_argument("--heldout-chars", type=int, default=4_000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--top-k", default="8,64", help="comma-separated k, one topk cache each")
    ap.add_argument("--samples", default="12,24,50", help="comma-separated draws per token, one sample cache each")
    ap.add_argument("--priority", default="8,15,30", help="comma-separated K, one priority cache each")
    ap.add_argument(
        "--temperatures",
        default="1",
        help="cache-teacher --temperatures for the sparse caches; the students train at T = 1, so the "
        "default stores no per-temperature statistics (each extra T adds 2-4 bytes per token)",
    )
    ap.add_argument(
        "--block-rows",
        type=int,
        default=8,
        help="train-student --block-rows for every mode: the same read blocks, so the same batches",
    )
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", default="3e-3")
    ap.add_argument("--student-args", default="d_model=64,n_layers=2,n_heads=4")
    ap.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated student seeds; every cache mode is trained with each, ratios use the means "
        "and the spread of the full-logit runs is printed as the noise floor",
    )
    ap.add_argument("--steps", type=int, default=4, help="timed steps for offline vs online")
    ap.add_argument("--skip-timing", action="store_true", help="skip the offline vs online step timing")
    ap.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="student --precision values to time (the same for the offline and the online step)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the caches and runs in --out")
    ap.add_argument(
        "--timing-only",
        action="store_true",
        help="only the offline vs online step timing, on the top-64 cache a --keep run left in --out",
    )
    args = ap.parse_args()
    teacher = args.teacher or str(smollm2_gguf())
    out = Path(args.out)  # re-running reuses complete caches (cache-teacher is a no-op on an identical cache)
    if args.timing_only:
        student_args = {k: int(v) for k, v in (kv.split("=") for kv in args.student_args.split(","))}
        timing = {
            p: step_times(
                teacher,
                out / "cache-topk64",
                out / "train.jsonl",
                student_args,
                batch=8,
                steps=args.steps,
                top_k=64,
                precision=p,
            )
            for p in args.precisions.split(",")
        }
        (out / "timing.json").write_text(json.dumps(timing, indent=2))
        print(json.dumps(timing, indent=2))
        print_timing(timing)
        return
    plays = args.train_plays.split(",")
    train = write_jsonl(out / "train.jsonl", [r for p in plays for r in play_rows(p, args.train_chars // len(plays))])
    heldout = write_jsonl(out / "heldout.jsonl", play_rows("tempest", args.heldout_chars))
    common = ["--teacher", teacher, "--max-length", args.max_length, "--batch-size", 8]
    split = lambda v: [x for x in v.split(",") if x]  # noqa: E731
    modes = {
        "full": ["--mode", "full"],
        **{f"topk{k}": ["--top-k", k] for k in split(args.top_k)},
        **{f"sample{n}": ["--mode", "sample", "--samples", n] for n in split(args.samples)},
        **{f"priority{k}": ["--mode", "priority", "--samples", k] for k in split(args.priority)},
    }
    sizes = {}
    for name, flags in modes.items():
        temps = [] if name == "full" else ["--temperatures", args.temperatures]
        kdcli("cache-teacher", *common, *flags, *temps, "--data", train, "--out", out / f"cache-{name}")
        m = json.loads((out / f"cache-{name}" / "manifest.json").read_text())
        bpt = sum(s["bytes"] for s in m["shards"]) / m["data"]["num_targets"]
        sizes[name] = {
            "bytes_per_token": bpt,
            "smaller_than_full_fp16": 2 * m["vocab_size"] / bpt,
            "tokens": m["data"]["num_targets"],
            "unique_ids_per_token": mean_unique_ids(out / f"cache-{name}", m),
        }
    kdcli("cache-teacher", *common, "--mode", "full", "--data", heldout, "--out", out / "cache-heldout-full")
    student = []
    for kv in args.student_args.split(","):
        student += ["--student-arg", kv]
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed: dict[str, list[dict]] = {name: [] for name in modes}
    for seed in seeds:  # seed-major, so a cut-short run still has every mode at the first seed
        for name in modes:
            run = out / (f"run-{name}" if len(seeds) == 1 else f"run-{name}-seed{seed}")
            kdcli(
                "train-student",
                "--student",
                "transformer",
                *student,
                "--cache",
                out / f"cache-{name}",
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
                "--schedule",
                "cosine",
                "--seed",
                seed,
                "--block-rows",
                args.block_rows,
                "--out",
                run,
                "--overwrite",
            )
            rep = kdcli(
                "eval",
                "--model",
                run,
                "--data",
                heldout,
                "--cache",
                out / "cache-heldout-full",
                "--json",
                json_out=True,
            )
            m = rep["models"][0]
            per_seed[name].append(
                {
                    "seed": seed,
                    "perplexity": m["perplexity"],
                    "kl_to_teacher": m["kl_to_teacher"],
                    "agreement": m["agreement"],
                }
            )
            (out / "bench_lm.partial.json").write_text(json.dumps({"sizes": sizes, "per_seed": per_seed}, indent=2))
    quality = {
        name: {k: float(sum(r[k] for r in runs) / len(runs)) for k in ("perplexity", "kl_to_teacher", "agreement")}
        for name, runs in per_seed.items()
    }
    ref = quality["full"]
    for q in quality.values():
        q["perplexity_ratio"] = q["perplexity"] / ref["perplexity"]
        q["kl_ratio"] = q["kl_to_teacher"] / ref["kl_to_teacher"]
    full_runs = per_seed["full"]  # the noise floor: how far apart full-logit students of different seeds land
    noise = {k: (max(r[k] for r in full_runs) / min(r[k] for r in full_runs)) for k in ("perplexity", "kl_to_teacher")}
    timing = None
    if not args.skip_timing:  # in a fresh process: this one has read GBs of full-logit caches and trained 4 students
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--timing-only",
                "--teacher",
                teacher,
                "--out",
                str(out),
                "--steps",
                str(args.steps),
                "--precisions",
                args.precisions,
                "--student-args",
                args.student_args,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        timing = json.loads((out / "timing.json").read_text())
    result = {
        "teacher": teacher,
        "train_tokens": sizes["full"]["tokens"],
        "max_length": args.max_length,
        "epochs": args.epochs,
        "seeds": seeds,
        "block_rows": args.block_rows,
        "temperatures": args.temperatures,
        "sizes": sizes,
        "quality": quality,
        "per_seed": per_seed,
        "full_seed_spread": noise,
        "timing": timing,
    }
    (out / "bench_lm.json").write_text(json.dumps(result, indent=2))
    print(f"\nteacher {Path(teacher).name}, {sizes['full']['tokens']} training tokens, max length {args.max_length}")
    print(
        f"{'cache':10} {'B/token':>9} {'ids/tok':>8} {'x smaller':>10} {'ppl':>9} {'ppl/full':>9} {'KL':>8} "
        f"{'KL/full':>8} {'agree':>7}"
    )
    for name in modes:
        s, q = sizes[name], quality[name]
        ids = f"{s['unique_ids_per_token']:8.1f}" if s["unique_ids_per_token"] is not None else f"{'':8}"
        print(
            f"{name:10} {s['bytes_per_token']:9.1f} {ids} {s['smaller_than_full_fp16']:10.1f} "
            f"{q['perplexity']:9.2f} {q['perplexity_ratio']:9.4f} {q['kl_to_teacher']:8.4f} {q['kl_ratio']:8.4f} "
            f"{q['agreement']:7.4f}"
        )
    if len(seeds) > 1:
        print(
            f"means over seeds {seeds}; full-logit students of different seeds differ by up to "
            f"x{noise['perplexity']:.4f} in perplexity and x{noise['kl_to_teacher']:.4f} in KL (the noise floor)"
        )
    if timing:
        print_timing(timing)
    if not args.keep:
        for p in out.glob("cache-*"):
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
