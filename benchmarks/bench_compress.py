"""Compression benchmark: an MNIST-sized MLP (784-800-800-10) before and after `kdcli compress`. One run.

    python benchmarks/bench_compress.py [--hidden 800,800] [--train-rows 10000] [--epochs 2] [--test-rows 10000]
                                        [--batch 1024] [--threads 1,default] [--rounds 3] [--same-process]

Trains the MLP on labels (mnist:train[:N]), then writes int8, int8-dynamic, pruned (unstructured 0.5), pruned
(structured 0.5), structured + int8, structured + int8-dynamic and structured + fine-tuned (1 epoch) + int8-dynamic
runs with the kdcli stages, and reports for each: parameters (non-zero too), bytes on disk, test accuracy
(mnist:test[:M]) and latency per row (median of --repeats after --warmup forwards; the best of --rounds interleaved
rounds) at batch 1 and --batch, as ratios to the float model, once per thread count in --threads ("default": the
count torch starts with: OMP_NUM_THREADS or the cores).

Latency is timed in a fresh process that loads only the runs and one batch, as a server would (``--same-process``:
in the one that trained them, whose heap history changes how often large temporaries get fresh pages; see
docs/compress.md). Then one line per thread count: int8-dynamic ÷ float latency (time; below 1 is faster), the CPU,
its int8 instructions, the ATen CPU capability, which kernel multiplies int8-dynamic's integers and the minor page
faults per forward. ``ATEN_CPU_CAPABILITY=avx2`` runs ATen's AVX2 kernels (the activation quantisation) on an AVX-512
CPU; oneDNN (behind ``torch._int_mm``) and MKL (the float product) choose their own instructions. ``--no-onednn``
times with oneDNN disabled, as torch runs on a CPU without AVX512-VNNI: ``torch._int_mm`` becomes a scalar loop,
and kdcli multiplies the integers in float32 instead (kdcli.models.quant.fast_int_mm). Training uses the default
thread count. ``--hidden 128`` benchmarks the quick-start demo's 784-128-10 student. Writes
bench_compress.json in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def cpu_description() -> dict:
    """What the latencies depend on: the CPU model, its int8 instructions, the kernels torch was told to use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    int8 = [
        name
        for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX-INT8"))
        if flag in flags
    ]
    try:
        from kdcli.models.quant import fast_int_mm

        kernel = "torch._int_mm" if fast_int_mm(torch.device("cpu"), 1024, 784, 128) else "float32 product"
    except ImportError:  # kdcli before it chose (always torch._int_mm)
        kernel = "torch._int_mm (always)"
    return {
        "cpu": model,
        "int8_instructions": int8,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "int8_dynamic_kernel": kernel,
        "env": {
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")
            if k in os.environ
        },
        "default_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def page_faults_per_forward(model: torch.nn.Module, x: torch.Tensor, forwards: int = 10) -> float | None:
    """Minor page faults per forward (fresh heap pages touched): what made the old int8-dynamic forward slow."""
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    model.eval()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(forwards):
            model(x)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / forwards


def measure_latency(a: argparse.Namespace, runs: dict[str, Path], threads: list[int], example: torch.Tensor):
    """({threads: {run: {batch: [median s/row per round]}}}, {threads: {run: page faults per forward}}, the CPU
    description as the timed runs saw it)."""
    from kdcli.models.classifiers import load_run_model
    from kdcli.models.stats import latency_per_row

    models = {name: load_run_model(path)[0].to(a.device) for name, path in runs.items()}
    if a.no_onednn:
        torch.backends.mkldnn.enabled = False
    cpu = cpu_description()
    lat = {t: {name: {1: [], a.batch: []} for name in runs} for t in threads}
    for _ in range(a.rounds):  # interleaved rounds: background load hits every model alike; best round kept
        for t in threads:
            torch.set_num_threads(t)
            for name, model in models.items():
                for bs, sec in latency_per_row(
                    model, example, batch_sizes=(1, a.batch), repeats=a.repeats, warmup=a.warmup
                ).items():
                    lat[t][name][bs].append(sec)
    faults = {}
    batch = example.repeat(-(-a.batch // len(example)), *([1] * (example.dim() - 1)))[: a.batch].to(a.device)
    for t in threads:
        torch.set_num_threads(t)
        faults[t] = {name: page_faults_per_forward(models[name], batch) for name in ("float", "int8-dynamic")}
    torch.set_num_threads(cpu["default_threads"])
    return lat, faults, cpu


def thread_counts(spec: str, default: int) -> list[int]:
    return [default if t.strip() == "default" else int(t) for t in spec.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/kd-bench-compress")
    ap.add_argument("--hidden", default="800,800", help="hidden widths of the MLP, comma-separated")
    ap.add_argument("--train-rows", type=int, default=10000)
    ap.add_argument("--test-rows", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,default", help="thread counts to time, comma-separated ('default')")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--same-process",
        action="store_true",
        help="time the runs in the process that trained them (default: a fresh one)",
    )
    ap.add_argument(
        "--no-onednn", action="store_true", help="time with oneDNN disabled, as torch runs on a CPU without AVX512-VNNI"
    )
    ap.add_argument("--latency-of", help=argparse.SUPPRESS)  # the fresh process: time the runs of this --out
    a = ap.parse_args()
    cpu = cpu_description()
    threads = list(dict.fromkeys(thread_counts(a.threads, cpu["default_threads"])))
    if a.latency_of:
        runs = {name: Path(p) for name, p in json.loads((Path(a.latency_of) / "runs.json").read_text()).items()}
        example = torch.from_numpy(np.load(Path(a.latency_of) / "example.npy"))
        lat, faults, cpu = measure_latency(a, runs, threads, example)
        (Path(a.latency_of) / "latency.json").write_text(json.dumps({"latency": lat, "faults": faults, "cpu": cpu}))
        return
    hidden = [int(h) for h in a.hidden.split(",")]
    arch = "-".join(map(str, [784, *hidden, 10]))

    from kdcli.config import CompressConfig, EvalConfig, TrainConfig, resolve
    from kdcli.data import load_data
    from kdcli.models.classifiers import load_run_model
    from kdcli.models.stats import bytes_on_disk, nonzero_parameters
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
                student_args={"hidden": hidden},
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
    (out / "runs.json").write_text(json.dumps({name: str(path) for name, path in runs.items()}))
    example = load_data(test).x[: a.batch]
    np.save(out / "example.npy", example.numpy())
    if a.same_process:
        lat, faults, cpu = measure_latency(a, runs, threads, example)
    else:  # a fresh process that loads the runs and one batch, like a server: no heap history from training
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--latency-of", str(out)], check=True)
        measured = json.loads((out / "latency.json").read_text())
        lat = {
            int(t): {name: {int(bs): v for bs, v in per.items()} for name, per in runs_lat.items()}
            for t, runs_lat in measured["latency"].items()
        }
        faults = {int(t): v for t, v in measured["faults"].items()}
        cpu = measured["cpu"]
    best = {
        t: {name: {bs: min(v) for bs, v in per.items()} for name, per in runs_lat.items()}
        for t, runs_lat in lat.items()
    }
    rows = []
    for (name, path), m in zip(runs.items(), rep.models):
        model = load_run_model(path)[0]
        rows.append(
            {
                "run": name,
                "parameters": count_parameters(model),
                "nonzero": nonzero_parameters(model),
                "bytes_on_disk": bytes_on_disk(path),
                "accuracy": m.accuracy,
                "latency": {str(t): {str(bs): best[t][name][bs] for bs in (1, a.batch)} for t in threads},
            }
        )
    base = rows[0]
    env = " ".join([f"{k}={v}" for k, v in cpu["env"].items()] + ["oneDNN disabled"] * a.no_onednn) or "defaults"
    print(f"MLP {arch}, {a.epochs} epochs on {train}; accuracy on {test}; {a.device}; train {t_train:.0f} s")
    print(
        f"CPU: {cpu['cpu']} (int8: {', '.join(cpu['int8_instructions']) or 'no VNNI/AMX'}); torch {cpu['torch']}, "
        f"ATen CPU capability {cpu['aten_cpu_capability']} ({env}); default threads {cpu['default_threads']}; "
        f"int8-dynamic multiplies with {cpu['int8_dynamic_kernel']}"
    )
    hdr = f"{'run':<23}{'params':>11}{'non-zero':>11}{'bytes':>11}{'bytes x':>9}{'acc':>8}{'acc Δ':>8}"
    for t in threads:
        hdr += f"  |{t:>2} thr: {'µs/row@1':>9}{'x':>7}{f'µs/row@{a.batch}':>12}{'x':>7}"
    print(hdr)
    for r in rows:
        line = (
            f"{r['run']:<23}{r['parameters']:>11,}{r['nonzero']:>11,}{r['bytes_on_disk']:>11,}"
            f"{base['bytes_on_disk'] / r['bytes_on_disk']:>8.2f}x{r['accuracy']:>8.4f}"
            f"{r['accuracy'] - base['accuracy']:>+8.4f}"
        )
        for t in threads:
            b1, bb = best[t][r["run"]][1], best[t][r["run"]][a.batch]
            f1, fb = best[t]["float"][1], best[t]["float"][a.batch]
            line += f"  |{'':>8} {b1 * 1e6:>9.1f}{f1 / b1:>6.2f}x{bb * 1e6:>12.2f}{fb / bb:>6.2f}x"
        print(line)
    ratios = {}
    for t in threads:
        r1 = best[t]["int8-dynamic"][1] / best[t]["float"][1]
        rb = best[t]["int8-dynamic"][a.batch] / best[t]["float"][a.batch]
        ratios[str(t)] = {"1": r1, str(a.batch): rb}
        pf = faults[t]
        pf_text = (
            ""
            if pf["float"] is None
            else (
                f"; page faults per forward at batch {a.batch}: float "
                f"{pf['float']:.0f}, int8-dynamic {pf['int8-dynamic']:.0f}"
            )
        )
        print(
            f"int8-dynamic ÷ float latency, {t} thread(s){' (default)' if t == cpu['default_threads'] else ''}: "
            f"batch 1 {r1:.2f}, batch {a.batch} {rb:.2f}   [{cpu['cpu']}, ATen {cpu['aten_cpu_capability']}, "
            f"{cpu['int8_dynamic_kernel']}]"
            f"{pf_text}"
        )
    result = {
        "args": vars(a),
        "cpu": cpu,
        "train_seconds": t_train,
        "int8_dynamic_over_float": ratios,
        "page_faults_per_forward": {str(t): v for t, v in faults.items()},
        "rows": rows,
    }
    (out / "bench_compress.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
