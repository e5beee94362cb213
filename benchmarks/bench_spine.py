"""Spine benchmark: what kdcli's machinery costs over the bare PyTorch loops it wraps. Ratios from one run.

1. cache-teacher wall time / a bare inference loop (same teacher, data, batch size; the bare loop also loads the
   data and copies log-probs to the host, but writes nothing).                                     target <= 1.05
2. train-student epoch time (from the cache, KD loss) / the same student trained on labels from in-memory arrays
   with a plain PyTorch loop (same batch size, optimizer).                                       target <= 1.10
3. Bytes per row of the cache in each mode.

    python benchmarks/bench_spine.py [--rows 60000] [--repeats 2] [--threads N] [--train-only]

Repeats alternate the two sides and keep each side's best time, so background load hits both alike. On a shared
machine pass --threads 1: with more intra-op threads than free cores a (128, 10) op can wait milliseconds for a
descheduled thread, and the ratio then measures the machine's load instead of kdcli (an epoch of the 784-128-10
student took 41.6 s with the default threads under a load of 8 on 2 cores, 1.3 s with one thread).
--train-only skips part 1 (the cache-teacher timing) and times only the training epochs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kdcli.config import CacheConfig, TrainConfig
from kdcli.data import _load_mnist, split_slice
from kdcli.models.classifiers import MLP, load_run_model
from kdcli.stages.cache import cache_teacher
from kdcli.stages.train import train_student


def bare_inference(run_dir: Path, spec: str, batch_size: int) -> float:
    t0 = time.perf_counter()
    base, sl = split_slice(spec)
    x, _ = _load_mnist(base.split(":")[1])
    x = torch.from_numpy(x[sl] if sl else x)
    model, _ = load_run_model(run_dir)
    model.eval()
    outs = []
    with torch.inference_mode():
        for a in range(0, len(x), batch_size):
            outs.append(torch.log_softmax(model(x[a : a + batch_size]).float(), -1).half().numpy())
    return time.perf_counter() - t0


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process; see main)


def bare_train_epoch(x: torch.Tensor, y: torch.Tensor, hidden: list[int], batch_size: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = MLP(tuple(x.shape[1:]), 10, hidden=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(x))
    t0 = CLOCK()
    for a in range(0, len(x), batch_size):
        idx = perm[a : a + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return CLOCK() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument(
        "--teacher",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp: 784-1200-1200-10 (cheap per row); cnn: the built-in cnn (a costlier, more typical teacher)",
    )
    ap.add_argument(
        "--student-hidden",
        type=int,
        nargs="+",
        default=[128],
        help="student MLP hidden sizes (128: per-step overhead dominates; 800 800: Hinton's student)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--train-only", action="store_true", help="skip the cache-teacher timing (part 1)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: time both training epochs in CPU seconds of this process (time.process_time; with "
        "--threads 1 what a busy shared machine cannot inflate by descheduling us)",
    )
    args = ap.parse_args()
    if args.clock == "cpu":  # kdcli's epoch timer (metrics.jsonl "seconds") reads the same clock as the bare loop
        global CLOCK
        CLOCK = time.process_time
        import kdcli.stages.train

        kdcli.stages.train.time = SimpleNamespace(perf_counter=time.process_time)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = f"mnist:train[:{args.rows}]"
    work = Path(tempfile.mkdtemp(prefix="kdcli-bench-"))
    teacher = work / "teacher"
    # One short epoch: the teacher's cost per row is what matters, not its accuracy.
    teacher_args = {"hidden": [1200, 1200]} if args.teacher == "mlp" else {"channels": [32, 64], "hidden": 256}
    train_student(
        TrainConfig(
            student=args.teacher, student_args=teacher_args, data="mnist:train[:5000]", out=str(teacher), epochs=1
        )
    )

    cache_times, bare_times = [], []
    for r in range(args.repeats if not args.train_only else 1):
        bare_times.append(bare_inference(teacher, spec, args.batch_size))
        t0 = time.perf_counter()
        cache_teacher(
            CacheConfig(teacher=str(teacher), data=spec, out=str(work / f"cache-full-{r}"), batch_size=args.batch_size)
        )
        cache_times.append(time.perf_counter() - t0)

    sizes = {}
    for mode, extra in (("full", {}), ("topk", {"top_k": 5}), ("sample", {"mode": "sample", "samples": 16}))[
        : 1 if args.train_only else 3
    ]:
        out = work / f"cache-{mode}"
        s = (
            cache_teacher(
                CacheConfig(teacher=str(teacher), data=spec, out=str(out), batch_size=args.batch_size, **extra)
            )
            if mode != "full"
            else None
        )
        m = json.loads(((work / "cache-full-0") if mode == "full" else out).joinpath("manifest.json").read_text())
        total = sum(sh["bytes"] for sh in m["shards"])
        sizes[mode] = total / m["num_rows"]
        del s

    # training: kdcli epoch (KD from the full cache) vs a plain in-memory label loop, same student and batch
    hidden, bs = args.student_hidden, 128
    base, sl = split_slice(spec)
    x, y = _load_mnist("train")
    x, y = torch.from_numpy(x[sl]), torch.from_numpy(y[sl])
    kd_epoch, bare_epoch = [], []
    for r in range(args.repeats):
        bare_epoch.append(bare_train_epoch(x, y, hidden, bs, seed=r))
        run = work / f"student-{r}"
        train_student(
            TrainConfig(
                student="mlp",
                student_args={"hidden": hidden},
                data=spec,
                out=str(run),
                cache=str(work / "cache-full-0"),
                epochs=1,
                batch_size=bs,
                seed=r,
            )
        )
        kd_epoch.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["seconds"])

    ratios = sorted(k / b for k, b in zip(kd_epoch, bare_epoch))
    res = {
        "rows": args.rows,
        "teacher": args.teacher,
        "student_hidden": hidden,
        "cache_teacher_s": min(cache_times),
        "bare_inference_s": min(bare_times),
        "cache_over_bare": min(cache_times) / min(bare_times),
        "train_epoch_s": min(kd_epoch),
        "bare_train_epoch_s": min(bare_epoch),
        "train_over_bare": min(kd_epoch) / min(bare_epoch),
        "train_over_bare_per_repeat": ratios,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "bytes_per_row": sizes,
    }
    print(json.dumps(res, indent=2))
    print(
        f"cache-teacher / bare inference : {res['cache_over_bare']:.3f}  ({res['cache_teacher_s']:.2f} s vs "
        f"{res['bare_inference_s']:.2f} s, {args.rows} rows, {args.teacher} teacher, target <= 1.05)"
    )
    print(
        f"train epoch / bare label epoch : {res['train_over_bare']:.3f}  ({res['train_epoch_s']:.2f} s vs "
        f"{res['bare_train_epoch_s']:.2f} s, student 784-{'-'.join(map(str, hidden))}-10, target <= 1.10; per "
        f"repeat {ratios[0]:.3f}..{ratios[-1]:.3f}, {res['threads']} thread(s), {args.clock} clock)"
    )
    print("bytes per row: " + ", ".join(f"{k} {v:.1f} B" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
