"""Scale-out benchmark: flat memory, reader speed, and the cost of caching on 1 vs 2 processes. Ratios from one run.

1. Peak RSS of a `kdcli train-student` process (one epoch, DataLoader workers off so every byte is in that process)
   from a cache of N rows and from one of 10 x N rows (same data: 10 augmented views per sample), full mode over
   --classes classes so the 10x cache is large next to the process (--classes 1000: 2 kB of log-probs per row).
                                                                                      target: growth <= 10%
2. Rows/s of the cache reader alone (one epoch of shuffled batches, with the per-block checks) vs rows/s of the
   student's training step alone (targets, forward, KD loss, backward, update) on the same batches.
                                                                      target: reader / step >> 1 (not the bottleneck)
3. cache-teacher wall / bare teacher inference (the same forward + log-softmax + copy to numpy, writing nothing),
   on 1 process (--threads threads) and on 2 processes under torchrun (1 thread each), each process taking the
   same contiguous slice of rows as cache-teacher gives it.                                 target: <= 1.05
   Also printed: the time every process spends hashing all data rows (the manifest's row hashes and fingerprint),
   and the ratio without it.

    python benchmarks/bench_scale.py [--rows 10000] [--classes 1000] [--mnist-rows 30000] [--repeats 2]

Each side of 3 is measured --repeats times, alternating, and the best kept, so background load hits both alike.
Writes bench_scale.json next to the printout (in --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RSS_WRAPPER = (
    "import resource, runpy, sys\n"
    "sys.argv = ['kdcli'] + sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module('kdcli', run_name='__main__')\n"
    "finally:\n"
    "    sys.stderr.write('PEAK_RSS_KB=%d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def kdcli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "kdcli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if p.returncode:
        raise SystemExit(f"kdcli {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    return p


def peak_rss_train(*args) -> tuple[int, float]:
    """(peak RSS in KiB, rows/s) of one `kdcli train-student` process."""
    p = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, "train-student", *map(str, args)], capture_output=True, text=True
    )
    if p.returncode:
        raise SystemExit(f"train-student failed:\n{p.stderr[-2000:]}")
    kb = int(p.stderr.rsplit("PEAK_RSS_KB=", 1)[1].split()[0])
    out = Path(args[list(args).index("--out") + 1])
    rps = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["rows_per_second"]
    return kb, rps


def memory_and_reader(work: Path, rows: int, classes: int, batch: int) -> dict:
    import torch

    from kdcli.cache.modes import targets_from_arrays
    from kdcli.cache.reader import CacheReader
    from kdcli.losses import kd_loss
    from kdcli.models.classifiers import MLP

    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, size=rows)
    protos = rng.normal(size=(classes, 1, 8, 8)).astype(np.float32)
    x = (protos[y] + rng.normal(scale=0.5, size=(rows, 1, 8, 8))).astype(np.float32)
    np.savez(work / "syn.npz", x=x, y=y)
    data = str(work / "syn.npz")
    if not (work / "syn-teacher" / "summary.json").exists():  # a re-run into the same --out reuses it
        kdcli(
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[256]",
            "--data",
            data,
            "--out",
            work / "syn-teacher",
            "--epochs",
            "1",
            "--batch-size",
            "256",
        )
    caches = {}
    for views in (1, 10):
        c = work / f"syn-cache-{views}x"
        extra = ["--views", views, "--augment", "shift:1"] if views > 1 else []
        kdcli(
            "cache-teacher", "--teacher", work / "syn-teacher", "--data", data, "--out", c, "--shard-size", 8192, *extra
        )
        caches[views] = c
    res = {"classes": classes, "rows_1x": rows, "rows_10x": rows * 10}
    for views, c in caches.items():
        m = json.loads((c / "manifest.json").read_text())
        res[f"cache_mib_{views}x"] = sum(s["bytes"] for s in m["shards"]) / 2**20
        kb, rps = peak_rss_train(
            "--cache",
            c,
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[128]",
            "--data",
            data,
            "--out",
            work / f"syn-student-{views}x",
            "--epochs",
            1,
            "--batch-size",
            batch,
            "--num-workers",
            0,
            "--overwrite",
        )
        res[f"peak_rss_mib_{views}x"] = kb / 1024
        res[f"train_rows_per_s_{views}x"] = rps
    res["rss_growth"] = res["peak_rss_mib_10x"] / res["peak_rss_mib_1x"] - 1

    # 2. the reader alone vs the student step alone, on the 10x cache
    reader = CacheReader(caches[10])
    t0 = time.perf_counter()
    n = 0
    first = []
    for b in reader.iter_batches(batch_size=batch, seed=0, epoch=0):
        n += len(b["row_index"])
        if len(first) < 50:
            first.append(b)
    res["reader_rows_per_s"] = n / (time.perf_counter() - t0)
    torch.manual_seed(0)
    student = MLP((1, 8, 8), classes, hidden=[128])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = []
    for b in first:
        t0 = time.perf_counter()
        idx = torch.from_numpy(b["sample_index"])
        targets = targets_from_arrays(b, reader.mode, reader.num_classes)
        loss = kd_loss(student(xt[idx]), targets, yt[idx], temperature=4.0, alpha=0.9).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps.append((time.perf_counter() - t0, len(idx)))
    steps = steps[5:]  # warm-up
    res["step_rows_per_s"] = sum(r for _, r in steps) / sum(t for t, _ in steps)
    res["reader_over_step"] = res["reader_rows_per_s"] / res["step_rows_per_s"]
    return res


# -- 3. caching cost, 1 vs 2 processes -----------------------------------------------------------------------------
def cache_worker(args) -> None:
    """One process (or one torchrun rank): bare inference over this rank's rows, then cache-teacher, alternating;
    rank 0 writes the best wall times (slowest rank, between barriers) to --result."""
    import torch

    from kdcli.cache.manifest import split_contiguous
    from kdcli.config import CacheConfig
    from kdcli.data import _load_mnist, split_slice
    from kdcli.infra import distributed
    from kdcli.models.classifiers import load_run_model
    from kdcli.stages.cache import cache_teacher

    ctx = distributed.init(torch.device("cpu"))
    if not ctx.enabled:
        torch.set_num_threads(args.threads)
    shard, rows = 4096, args.mnist_rows
    mine = split_contiguous(list(range(-(-rows // shard))), ctx.rank, ctx.world)
    lo, hi = (mine[0] * shard, min((mine[-1] + 1) * shard, rows)) if mine else (0, 0)

    def bare() -> None:
        base, sl = split_slice(f"mnist:train[:{rows}]")
        x, _ = _load_mnist("train")
        x = torch.from_numpy(x[sl][lo:hi])
        model, _ = load_run_model(Path(args.teacher))
        model.eval()
        with torch.inference_mode():
            for a in range(0, len(x), 512):
                torch.log_softmax(model(x[a : a + 512]).float(), -1).half().numpy()

    def timed(fn) -> float:
        ctx.barrier()
        t0 = time.perf_counter()
        fn()
        return ctx.all_reduce([time.perf_counter() - t0], "max")[0]

    bare_s, cache_s = [], []
    for r in range(args.repeats):
        bare_s.append(timed(bare))
        out = Path(args.work) / f"mnist-cache-{ctx.world}p-{r}"
        if ctx.is_main:
            shutil.rmtree(out, ignore_errors=True)  # a fresh cache each time (timed() starts with a barrier)
        cache_s.append(
            timed(
                lambda out=out: cache_teacher(
                    CacheConfig(
                        teacher=args.teacher,
                        data=f"mnist:train[:{rows}]",
                        out=str(out),
                        shard_size=shard,
                        batch_size=512,
                    )
                )
            )
        )
    # the part of cache-teacher's overhead that is hashing every data row for the manifest (each rank hashes all)
    from kdcli.data import fingerprint, row_hashes

    x_all, y_all = _load_mnist("train")

    def hashing() -> None:
        fingerprint(row_hashes(x_all[:rows], y_all[:rows]))

    hash_s = min(timed(hashing) for _ in range(args.repeats))
    if ctx.is_main:
        Path(args.result).write_text(json.dumps({"bare_s": min(bare_s), "cache_s": min(cache_s), "hash_s": hash_s}))


def caching_cost(work: Path, args) -> dict:
    teacher = work / "mnist-teacher"
    # A 784-1200-1200-10 teacher (Hinton et al.'s MNIST teacher), one short epoch: its cost per row is what matters.
    if not (teacher / "summary.json").exists():
        kdcli(
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[1200,1200]",
            "--data",
            "mnist:train[:5000]",
            "--out",
            teacher,
            "--epochs",
            1,
        )
    common = [
        __file__,
        "--worker-cache",
        "--teacher",
        str(teacher),
        "--work",
        str(work),
        "--mnist-rows",
        str(args.mnist_rows),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    res = {"mnist_rows": args.mnist_rows}
    for procs in (1, 2):
        result = work / f"cache-{procs}p.json"
        launch = (
            [sys.executable]
            if procs == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
        )
        p = subprocess.run(
            [*launch, *common, "--result", str(result)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1" if procs > 1 else str(args.threads)},
        )
        if p.returncode:
            raise SystemExit(f"caching benchmark on {procs} process(es) failed:\n{p.stderr[-3000:]}")
        r = json.loads(result.read_text())
        res[f"bare_s_{procs}p"], res[f"cache_s_{procs}p"] = r["bare_s"], r["cache_s"]
        res[f"cache_over_bare_{procs}p"] = r["cache_s"] / r["bare_s"]
        res[f"row_hashing_s_{procs}p"] = r["hash_s"]
        res[f"cache_minus_hashing_over_bare_{procs}p"] = (r["cache_s"] - r["hash_s"]) / r["bare_s"]
    res["speedup_2p"] = res["cache_s_1p"] / res["cache_s_2p"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10000, help="samples of the synthetic set (the 1x cache)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--mnist-rows", type=int, default=30000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the 1-process run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", choices=("memory", "caching"), default=None)
    ap.add_argument("--worker-cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_cache:
        return cache_worker(args)
    work = Path(args.out or tempfile.mkdtemp(prefix="kdcli-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if args.skip != "memory":
        res["memory"] = memory_and_reader(work, args.rows, args.classes, args.batch_size)
    if args.skip != "caching":
        res["caching"] = caching_cost(work, args)
    (work / "bench_scale.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    if "memory" in res:
        m = res["memory"]
        print(
            f"peak RSS train-student 1x / 10x cache : {m['peak_rss_mib_1x']:.0f} / {m['peak_rss_mib_10x']:.0f} MiB "
            f"(caches {m['cache_mib_1x']:.0f} / {m['cache_mib_10x']:.0f} MiB): growth {m['rss_growth']:+.1%} "
            "(target <= 10%)"
        )
        print(
            f"reader alone / student step alone     : {m['reader_over_step']:.1f}x  ({m['reader_rows_per_s']:,.0f} "
            f"vs {m['step_rows_per_s']:,.0f} rows/s; target > 1)"
        )
    if "caching" in res:
        c = res["caching"]
        for p in (1, 2):
            print(
                f"cache-teacher / bare inference, {p} proc : {c[f'cache_over_bare_{p}p']:.3f}  "
                f"({c[f'cache_s_{p}p']:.2f} s vs {c[f'bare_s_{p}p']:.2f} s, {c['mnist_rows']} rows, target <= 1.05); "
                f"without the {c[f'row_hashing_s_{p}p']:.2f} s of row hashing: "
                f"{c[f'cache_minus_hashing_over_bare_{p}p']:.3f}"
            )
        print(f"cache-teacher wall 1 proc / 2 procs   : {c['speedup_2p']:.2f}x")


if __name__ == "__main__":
    main()
