"""The sparse-cache bias table, measured through the CLI: `kdcli eval --cache C --temperature T --json` on a
200-class teacher of our own, for a full cache (exact) and sample-24, priority-24 and topk-16 caches, at T = 1, 2.

    python benchmarks/bench_bias.py [--rows 8000] [--seeds 3] [--out /tmp/kd-bench-bias]

The teacher and the student are single Linear layers over inputs x = [t, e] (t: a peaked 200-class logit vector
per row, e: noise), built so that the teacher's logits are t and the student's 0.7 t + 1.5 e (the synthetic pair of
tests/test_sparse_temperatures.py): their KL is far from zero and known exactly from the full cache. Sample and
priority caches are drawn with --seeds different cache seeds; the table gives the mean and the spread over them.
"approx." rows: T = 1-only caches (--temperatures 1) at T = 2 with --approximate-temperature, what sparse caches
gave before they stored per-temperature statistics. "topk-16" is the exact bucketed KL (k + 1 buckets, a lower bound of
the full KL); its reference, computed here from the teacher's and student's logits in float64, is printed beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.models.classifiers import build_model, save_run_model

C = 200


def logits(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, C, generator=g) * 2.0
    t[torch.arange(rows), torch.randint(0, C, (rows,), generator=g)] += 6.0
    return t, torch.randn(rows, C, generator=g)


def linear_run(out: Path, weight: torch.Tensor) -> None:
    model, info = build_model("mlp", {"hidden": []}, num_classes=C, input_shape=(2 * C,))
    lin = model.net[-1]
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.zero_()
    out.mkdir(parents=True, exist_ok=True)
    save_run_model(out, model, info)


def cli(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exit_code:
        raise SystemExit(f"kdcli {' '.join(map(str, args))} failed ({r.exit_code}): {r.stderr or r.output}")
    return r.stdout


def bucket_kl(t: torch.Tensor, s: torch.Tensor, ids: torch.Tensor, T: float) -> float:
    """Exact KL between the teacher's and the student's (k + 1)-bucket distributions at T, float64."""

    def buckets(z):
        lp = torch.log_softmax(z.double() / T, -1)
        top = lp.gather(1, ids)
        tail = torch.logsumexp(lp.scatter(1, ids, float("-inf")), -1, keepdim=True)
        return torch.cat([top, tail], 1)

    p, q = buckets(t), buckets(s)
    return float((p.exp() * (p - q)).sum(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--seeds", type=int, default=3, help="cache seeds for the sample and priority caches")
    ap.add_argument("--out", default="/tmp/kd-bench-bias")
    args = ap.parse_args()
    out = Path(args.out)
    t, e = logits(args.rows)
    x = torch.cat([t, e], 1).numpy().astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "data.npz", x=x, y=t.argmax(1).numpy().astype(np.int64))
    eye = torch.eye(C)
    linear_run(out / "teacher", torch.cat([eye, torch.zeros(C, C)], 1))  # logits t
    linear_run(out / "student", torch.cat([0.7 * eye, 1.5 * eye], 1))  # logits 0.7 t + 1.5 e
    data = out / "data.npz"
    caches = {
        "exact (full)": [("full", ["--mode", "full"], 0)],
        "sample-24": [(f"sample-{i}", ["--mode", "sample", "--samples", 24], i) for i in range(args.seeds)],
        "priority-24": [(f"priority-{i}", ["--mode", "priority", "--samples", 24], i) for i in range(args.seeds)],
        "topk-16": [("topk", ["--top-k", 16], 0)],
    }
    # what sparse caches gave before they stored per-temperature statistics: a T = 1-only cache evaluated at T = 2
    # with --approximate-temperature (self-normalised draws; the tail spread evenly over the other classes)
    caches["sample-24 approx."] = [
        (f"sample-t1-{i}", ["--mode", "sample", "--samples", 24], i) for i in range(args.seeds)
    ]
    caches["topk-16 approx."] = [("topk-t1", ["--top-k", 16], 0)]
    temps = (1.0, 2.0)
    res: dict = {}
    for label, runs in caches.items():
        approx = label.endswith("approx.")
        for name, flags, seed in runs:
            cli(
                "cache-teacher",
                "--teacher",
                out / "teacher",
                "--data",
                data,
                "--out",
                out / name,
                *flags,
                "--seed",
                seed,
                "--temperatures",
                "1" if approx else "1,2,4",
                "--batch-size",
                1000,
                "--overwrite",
            )
            for T in temps:
                rep = json.loads(
                    cli(
                        "eval",
                        "--model",
                        out / "student",
                        "--data",
                        data,
                        "--cache",
                        out / name,
                        "--temperature",
                        T,
                        "--json",
                        *(["--approximate-temperature"] if approx else []),
                    )
                )
                res.setdefault(label, {}).setdefault(T, []).append(rep["models"][0]["kl_to_teacher"])
    s = 0.7 * t + 1.5 * e
    # the teacher's top 16 at T = 1 (ties aside, the cache's ids)
    ids = torch.topk(torch.log_softmax(t, -1), 16, -1).indices
    ref = {T: bucket_kl(t, s, ids, T) for T in temps}
    exact = {T: res["exact (full)"][T][0] for T in temps}
    print(
        f"{args.rows} rows, {C} classes; KL(teacher_T || student_T) per row from `kdcli eval --cache C "
        f"--temperature T --json`; sample/priority: mean (min..max) over {args.seeds} cache seeds"
    )
    print(f"{'':18}" + "".join(f"{f'T = {T:g}':>34}" for T in temps))
    for label, per_t in res.items():
        cells = []
        for T in temps:
            v = per_t[T]
            m = float(np.mean(v))
            cell = f"{m:.4f}"
            if len(v) > 1:
                cell += f" ({min(v):.4f}..{max(v):.4f})"
            if not label.startswith("topk-16"):
                cell += f" x{m / exact[T]:.4f}"
            else:
                cell += f" x{m / ref[T]:.4f} of {ref[T]:.4f}"
            cells.append(cell)
        print(f"{label:18}" + "".join(f"{c:>34}" for c in cells))
    (out / "bench_bias.json").write_text(
        json.dumps(
            {
                "rows": args.rows,
                "kl": {k: {str(T): v for T, v in d.items()} for k, d in res.items()},
                "topk16_bucket_reference": ref,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
