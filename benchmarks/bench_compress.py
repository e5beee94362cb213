"""Compression benchmark: an MNIST-sized MLP (784-800-800-10) before and after `kdcli compress`. One run.

    python benchmarks/bench_compress.py [--train-rows 10000] [--epochs 2] [--test-rows 10000] [--threads 1]

Trains the MLP on labels (mnist:train[:N]), then writes int8, int8-dynamic, pruned (unstructured 0.5), pruned
(structured 0.5), structured + int8, structured + int8-dynamic and structured + fine-tuned (1 epoch) + int8-dynamic
runs with the kdcli stages, and reports for each:
parameters (non-zero too), bytes on disk, test accuracy (mnist:test[:M]) and latency per row (median of
--repeats after --warmup forwards; the best of --rounds interleaved rounds) at batch 1 and --batch, as ratios to the
float model. Writes
bench_compress.json in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/kd-bench-compress")
    ap.add_argument("--train-rows", type=int, default=10000)
    ap.add_argument("--test-rows", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from kdcli.config import CompressConfig, EvalConfig, TrainConfig, resolve
    from kdcli.data import load_data
    from kdcli.models.classifiers import load_run_model
    from kdcli.models.stats import bytes_on_disk, latency_per_row, nonzero_parameters
    from kdcli.models.weights import count_parameters
    from kdcli.stages.compress import compress
    from kdcli.stages.evaluate import evaluate
    from kdcli.stages.train import train_student

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train = f"mnist:train[:{a.train_rows}]"
    test = f"mnist:test[:{a.test_rows}]"
    t0 = time.perf_counter()
    train_student(
        resolve(
            TrainConfig,
            None,
            dict(
                student="mlp",
                student_args={"hidden": [800, 800]},
                data=train,
                out=str(out / "float"),
                epochs=a.epochs,
                lr=1e-3,
                seed=0,
                device=a.device,
            ),
        )
    )
    t_train = time.perf_counter() - t0
    runs = {"float": out / "float"}
    for name, kw in (
        ("int8", dict(quantize="int8")),
        ("int8-dynamic", dict(quantize="int8-dynamic")),
        ("prune0.5", dict(prune=0.5)),
        ("struct0.5", dict(prune=0.5, structured=True)),
        ("struct0.5+int8", dict(prune=0.5, structured=True, quantize="int8")),
        ("struct0.5+int8-dyn", dict(prune=0.5, structured=True, quantize="int8-dynamic")),
    ):
        compress(resolve(CompressConfig, None, dict(model=str(out / "float"), out=str(out / name), **kw)))
        runs[name] = out / name
    train_student(
        resolve(
            TrainConfig,
            None,
            dict(
                student=str(out / "struct0.5"),
                data=train,
                out=str(out / "ft"),
                epochs=1,
                lr=3e-4,
                seed=0,
                device=a.device,
            ),
        )
    )
    compress(
        resolve(
            CompressConfig,
            None,
            dict(model=str(out / "ft"), out=str(out / "struct0.5+ft+int8-dyn"), quantize="int8-dynamic"),
        )
    )
    runs["struct0.5+ft+int8-dyn"] = out / "struct0.5+ft+int8-dyn"

    rep = evaluate(
        resolve(
            EvalConfig,
            None,
            dict(model=[str(p) for p in runs.values()], data=test, device=a.device, batch_size=a.batch),
        )
    )
    example = load_data(test).x[: a.batch]
    models = {name: load_run_model(path)[0].to(a.device) for name, path in runs.items()}
    lat: dict[str, dict[int, list[float]]] = {name: {1: [], a.batch: []} for name in runs}
    for _ in range(a.rounds):  # interleaved rounds: background load hits every model alike; best round kept
        for name, model in models.items():
            for bs, sec in latency_per_row(
                model, example, batch_sizes=(1, a.batch), repeats=a.repeats, warmup=a.warmup
            ).items():
                lat[name][bs].append(sec)
    rows = []
    for (name, path), m in zip(runs.items(), rep.models):
        model = models[name]
        rows.append(
            {
                "run": name,
                "parameters": count_parameters(model),
                "nonzero": nonzero_parameters(model),
                "bytes_on_disk": bytes_on_disk(path),
                "accuracy": m.accuracy,
                "latency_1": min(lat[name][1]),
                f"latency_{a.batch}": min(lat[name][a.batch]),
            }
        )
    base = rows[0]
    hdr = (
        f"{'run':<23}{'params':>11}{'non-zero':>11}{'bytes':>11}{'bytes x':>9}{'acc':>8}{'acc Δ':>8}"
        f"{'µs/row@1':>10}{'x':>6}{f'µs/row@{a.batch}':>12}{'x':>6}"
    )
    print(
        f"MLP 784-800-800-10, {a.epochs} epochs on {train}; accuracy on {test}; {a.threads} thread(s), "
        f"{a.device}; train {t_train:.0f} s"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['run']:<23}{r['parameters']:>11,}{r['nonzero']:>11,}{r['bytes_on_disk']:>11,}"
            f"{base['bytes_on_disk'] / r['bytes_on_disk']:>8.2f}x{r['accuracy']:>8.4f}"
            f"{r['accuracy'] - base['accuracy']:>+8.4f}{r['latency_1'] * 1e6:>10.1f}"
            f"{base['latency_1'] / r['latency_1']:>5.2f}x{r[f'latency_{a.batch}'] * 1e6:>12.2f}"
            f"{base[f'latency_{a.batch}'] / r[f'latency_{a.batch}']:>5.2f}x"
        )
    (out / "bench_compress.json").write_text(
        json.dumps({"args": vars(a), "train_seconds": t_train, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
