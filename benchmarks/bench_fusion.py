"""Fused teachers on MNIST: three MLP teachers (different seeds and widths, each trained on labels) cached in full,
one small student distilled from each teacher alone and from the three fused (mean and geometric). One run.

    python benchmarks/bench_fusion.py [--train-rows 10000] [--test-rows 10000] [--out /tmp/kd-bench-fusion]

Every model is measured on mnist:test[:M] with `kdcli eval`: test accuracy, and top-1 agreement / KL (T = 1) to
the fused teacher (a cache of the test rows per teacher, fused the same way). The fused teacher's own accuracy is
the accuracy of the argmax of the mixture, read from the fused test caches. Writes bench_fusion.json in --out.

``--sparse``: also caches every teacher's training rows as topk (k = 3), sample (8 draws) and priority (K = 4), and
distils the same student at T = 1 (where fused sparse caches are exact / unbiased) from the three teachers fused
from each kind, next to the fused full caches at T = 1: the cost of fusing sparse caches instead of full ones.
``--sparse-only`` skips the T = 4 table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/kd-bench-fusion")
    ap.add_argument("--train-rows", type=int, default=10000)
    ap.add_argument("--test-rows", type=int, default=10000)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--student-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sparse", action="store_true", help="also fuse topk / sample / priority caches (T = 1)")
    ap.add_argument("--sparse-only", action="store_true", help="only the sparse table (implies --sparse)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from kdcli.cache.fused import FusedReader
    from kdcli.cache.reader import CacheReader
    from kdcli.config import CacheConfig, EvalConfig, TrainConfig
    from kdcli.data import load_data
    from kdcli.stages.cache import cache_teacher
    from kdcli.stages.evaluate import evaluate
    from kdcli.stages.train import train_student

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = f"mnist:train[:{a.train_rows}]", f"mnist:test[:{a.test_rows}]"
    t0 = time.perf_counter()
    teachers = {"A (800, seed 0)": ([800], 0), "B (400, seed 1)": ([400], 1), "C (200, seed 2)": ([200], 2)}
    caches: dict[str, tuple[str, str]] = {}
    results: dict = {"train": train, "test": test, "teachers": {}, "students": {}}
    for i, (name, (hidden, seed)) in enumerate(teachers.items()):
        run = out / f"teacher{i}"
        train_student(
            TrainConfig(
                student="mlp",
                student_args={"hidden": hidden},
                data=train,
                out=str(run),
                epochs=a.teacher_epochs,
                seed=seed,
                lr=1e-3,
                overwrite=True,
            )
        )
        caches[name] = (str(out / f"cache{i}-train"), str(out / f"cache{i}-test"))
        cache_teacher(CacheConfig(teacher=str(run), data=train, out=caches[name][0]))
        cache_teacher(CacheConfig(teacher=str(run), data=test, out=caches[name][1]))
        results["teachers"][name] = {"accuracy": evaluate(EvalConfig(model=[str(run)], data=test)).models[0].accuracy}
    labels = load_data(test).y
    for combine in ("mean", "geometric"):
        fused = FusedReader([CacheReader(c[1]) for c in caches.values()], (1 / 3,) * 3, combine)
        top1 = fused.read_rows(0, a.test_rows)["logprobs"].argmax(1)
        results["teachers"][f"fused {combine}"] = {"accuracy": float(np.mean(top1 == np.asarray(labels)))}
    test_fused = [c[1] for c in caches.values()]
    runs = {name: ([c[0]], "mean", 4.0) for name, c in caches.items()}
    runs["fused mean"] = ([c[0] for c in caches.values()], "mean", 4.0)
    runs["fused geometric"] = ([c[0] for c in caches.values()], "geometric", 4.0)
    runs["labels only"] = ([], "mean", 4.0)
    if a.sparse_only:
        runs = {}
    if a.sparse or a.sparse_only:
        sparse = {
            "topk": dict(top_k=3),
            "sample": dict(mode="sample", samples=8),
            "priority": dict(mode="priority", samples=4),
        }
        for kind, kw in sparse.items():
            for i in range(len(teachers)):
                cache_teacher(
                    CacheConfig(
                        teacher=str(out / f"teacher{i}"),
                        data=train,
                        temperatures="1",
                        out=str(out / f"cache{i}-train-{kind}"),
                        **kw,
                    )
                )
        runs["T=1: fused full"] = ([c[0] for c in caches.values()], "mean", 1.0)
        for kind in sparse:
            what = {"topk": "k = 3", "sample": "8 draws", "priority": "K = 4"}[kind]
            runs[f"T=1: fused {kind} ({what})"] = (
                [str(out / f"cache{i}-train-{kind}") for i in range(len(teachers))],
                "mean",
                1.0,
            )
    for i, (name, (cs, combine, temp)) in enumerate(runs.items()):
        run = out / f"student{i}"
        train_student(
            TrainConfig(
                student="mlp",
                student_args={"hidden": [32]},
                data=train,
                out=str(run),
                cache=cs,
                combine=combine,
                epochs=a.student_epochs,
                seed=7,
                lr=1e-3,
                temperature=temp,
                overwrite=True,
                **({} if cs else {"alpha": 0.0}),
            )
        )
        m = evaluate(EvalConfig(model=[str(run)], data=test, cache=test_fused)).models[0]
        results["students"][name] = {
            "accuracy": m.accuracy,
            "agreement_with_fused_teacher": m.agreement,
            "kl_to_fused_teacher": m.kl_to_teacher,
        }
        if "bytes" not in results:
            results["bytes"] = {}
        results["bytes"][name] = sum(
            sum(s["bytes"] for s in json.loads((Path(c) / "manifest.json").read_text())["shards"]) for c in cs
        )
    results["wall_seconds"] = time.perf_counter() - t0
    (out / "bench_fusion.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
