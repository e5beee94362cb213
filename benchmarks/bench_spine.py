"""Spine benchmark: what kdcli's machinery costs over the bare PyTorch loops it wraps. Ratios from one run.

1. cache-teacher wall time / a bare inference loop (same teacher, data, batch size; the bare loop also loads the
   data and copies log-probs to the host, but writes nothing).                                     target <= 1.05
2. train-student epoch time (from the cache, KD loss) / the same student trained on labels from in-memory arrays
   with a plain PyTorch loop (same batch size, optimizer).                                       target <= 1.05
3. Bytes per row of the cache in each mode.

    python benchmarks/bench_spine.py [--rows 60000] [--repeats 2]

Repeats alternate the two sides and keep each side's best time, so background load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcli.config import CacheConfig, TrainConfig
from kdcli.data import _load_mnist, split_slice
from kdcli.models import MLP, load_run_model
from kdcli.teacher import cache_teacher
from kdcli.train import train_student


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
            outs.append(torch.log_softmax(model(x[a:a + batch_size]).float(), -1).half().numpy())
    return time.perf_counter() - t0


def bare_train_epoch(x: torch.Tensor, y: torch.Tensor, hidden: list[int], batch_size: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = MLP(tuple(x.shape[1:]), 10, hidden=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(x))
    t0 = time.perf_counter()
    for a in range(0, len(x), batch_size):
        idx = perm[a:a + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--teacher", choices=("mlp", "cnn"), default="mlp",
                    help="mlp: 784-1200-1200-10 (cheap per row); cnn: the built-in cnn (a costlier, more typical teacher)")
    ap.add_argument("--student-hidden", type=int, nargs="+", default=[128],
                    help="student MLP hidden sizes (128: per-step overhead dominates; 800 800: Hinton's student)")
    args = ap.parse_args()
    spec = f"mnist:train[:{args.rows}]"
    work = Path(tempfile.mkdtemp(prefix="kdcli-bench-"))
    teacher = work / "teacher"
    # One short epoch: the teacher's cost per row is what matters, not its accuracy.
    teacher_args = {"hidden": [1200, 1200]} if args.teacher == "mlp" else {"channels": [32, 64], "hidden": 256}
    train_student(TrainConfig(student=args.teacher, student_args=teacher_args, data="mnist:train[:5000]",
                              out=str(teacher), epochs=1))

    cache_times, bare_times = [], []
    for r in range(args.repeats):
        bare_times.append(bare_inference(teacher, spec, args.batch_size))
        t0 = time.perf_counter()
        cache_teacher(CacheConfig(teacher=str(teacher), data=spec, out=str(work / f"cache-full-{r}"),
                                  batch_size=args.batch_size))
        cache_times.append(time.perf_counter() - t0)

    sizes = {}
    for mode, extra in (("full", {}), ("topk", {"top_k": 5}), ("sample", {"mode": "sample", "samples": 16})):
        out = work / f"cache-{mode}"
        s = cache_teacher(CacheConfig(teacher=str(teacher), data=spec, out=str(out), batch_size=args.batch_size,
                                      **extra)) if mode != "full" else None
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
        train_student(TrainConfig(student="mlp", student_args={"hidden": hidden}, data=spec, out=str(run),
                                  cache=str(work / "cache-full-0"), epochs=1, batch_size=bs, seed=r))
        kd_epoch.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["seconds"])

    res = {
        "rows": args.rows, "teacher": args.teacher, "student_hidden": hidden,
        "cache_teacher_s": min(cache_times), "bare_inference_s": min(bare_times),
        "cache_over_bare": min(cache_times) / min(bare_times),
        "train_epoch_s": min(kd_epoch), "bare_train_epoch_s": min(bare_epoch),
        "train_over_bare": min(kd_epoch) / min(bare_epoch),
        "bytes_per_row": sizes,
    }
    print(json.dumps(res, indent=2))
    print(f"cache-teacher / bare inference : {res['cache_over_bare']:.3f}  ({res['cache_teacher_s']:.2f} s vs "
          f"{res['bare_inference_s']:.2f} s, {args.rows} rows, {args.teacher} teacher, target <= 1.05)")
    print(f"train epoch / bare label epoch : {res['train_over_bare']:.3f}  ({res['train_epoch_s']:.2f} s vs "
          f"{res['bare_train_epoch_s']:.2f} s, student 784-{'-'.join(map(str, hidden))}-10, target <= 1.05)")
    print("bytes per row: " + ", ".join(f"{k} {v:.1f} B" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
