"""The compression report of ``kdcli eval``: non-zero parameters, bytes on disk, latency per row, accuracy change.

References: non-zero counts recomputed from the safetensors tensors directly; bytes on disk from the files'
sizes (os.stat); the teacher's KL to its own cache is ~0 and its agreement 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import CacheConfig, CompressConfig, TrainConfig, resolve
from kdcli.stages.cache import cache_teacher
from kdcli.stages.compress import compress
from kdcli.stages.train import train_student

runner = CliRunner()
NEW_FIELDS = ("nonzero_parameters", "bytes_on_disk", "latency_batch_size", "latency_batch1_s", "latency_batch_s")


def eval_json(*args) -> dict:
    r = runner.invoke(app, ["eval", *map(str, args), "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def nonzero_in_file(run: Path) -> int:
    """Non-zero entries of every float parameter and int8 weight in model.safetensors (scales are not weights)."""
    return sum(
        int(torch.count_nonzero(t))
        for k, t in load_file(run / "model.safetensors").items()
        if not k.endswith("weight_scale")
    )


def model_file_bytes(run: Path) -> int:
    return sum((run / f).stat().st_size for f in ("model.json", "model.safetensors") if (run / f).is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained MLP, its cache over the eval data, an int8 copy and a 50%-pruned + int8 copy."""
    from conftest import make_blobs

    root = tmp_path_factory.mktemp("report")
    x, y = make_blobs(n=300)
    data = root / "blobs.npz"
    np.savez(data, x=x, y=y)
    train_student(
        resolve(
            TrainConfig,
            None,
            dict(
                student="mlp",
                student_args={"hidden": [256]},
                data=str(data),
                out=str(root / "student"),
                epochs=2,
                seed=0,
            ),
        )
    )
    cache_teacher(
        resolve(CacheConfig, None, dict(teacher=str(root / "student"), data=str(data), out=str(root / "cache")))
    )
    compress(resolve(CompressConfig, None, dict(model=str(root / "student"), out=str(root / "int8"), quantize="int8")))
    compress(resolve(CompressConfig, None, dict(model=str(root / "student"), out=str(root / "pruned"), prune=0.5)))
    compress(
        resolve(
            CompressConfig, None, dict(model=str(root / "student"), out=str(root / "pq"), prune=0.5, quantize="int8")
        )
    )
    return root


def test_classifier_report_fields(runs):
    rep = eval_json(
        "--model",
        runs / "student",
        "--model",
        runs / "int8",
        "--model",
        runs / "pruned",
        "--model",
        runs / "pq",
        "--data",
        runs / "blobs.npz",
        "--cache",
        runs / "cache",
        "--batch-size",
        128,
        "--latency-repeats",
        2,
    )
    full, int8, pruned, pq = rep["models"]
    for m in rep["models"]:
        assert all(f in m for f in NEW_FIELDS)
        assert m["latency_batch_size"] == 128 and m["latency_batch1_s"] > 0 and m["latency_batch_s"] > 0
        # the existing fields keep their names and meaning
        assert m["num_parameters"] == full["num_parameters"] and 0 <= m["accuracy"] <= 1
    for name, m in zip(("student", "int8", "pruned", "pq"), rep["models"]):
        assert m["nonzero_parameters"] == nonzero_in_file(runs / name)
        assert m["bytes_on_disk"] == model_file_bytes(runs / name)  # checkpoint/metrics/config are not the model
    # 50% of every Linear weight pruned: the weights' zeros are exactly half of each layer (rounded), biases kept
    weights = 8 * 256 + 256 * 4
    assert full["nonzero_parameters"] == full["num_parameters"]
    assert pruned["nonzero_parameters"] == pytest.approx(full["num_parameters"] - weights // 2, abs=2)
    assert pq["nonzero_parameters"] <= pruned["nonzero_parameters"]  # int8 rounding can add zeros, never remove
    # int8 weights: 1 byte instead of 4 (less one float32 scale per output row and a longer header); unstructured
    # pruning keeps dense tensors
    assert full["bytes_on_disk"] - int8["bytes_on_disk"] > 2 * weights
    assert full["bytes_on_disk"] - pq["bytes_on_disk"] > 2 * weights
    assert pruned["bytes_on_disk"] >= full["bytes_on_disk"] * 0.9
    # the student is the cached teacher: agreement 1, KL ~0; the compressed copies are measured against it
    assert full["agreement"] == 1.0 and abs(full["kl_to_teacher"]) < 1e-3
    assert int8["agreement"] > 0.9 and int8["kl_to_teacher"] > 0


def test_table_shows_the_comparison_against_the_first_model(runs, monkeypatch):

    monkeypatch.setenv("COLUMNS", "200")  # no wrapped cells
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(runs / "student"),
            "--model",
            str(runs / "pq"),
            "--data",
            str(runs / "blobs.npz"),
            "--batch-size",
            "64",
            "--latency-repeats",
            "1",
        ],
    )
    assert r.exit_code == 0, r.stderr
    for row in (
        "non-zero parameters",
        "bytes on disk",
        "latency/row, batch 1",
        "latency/row, batch 64",
        "accuracy Δ vs first",
        "bytes on disk (× smaller)",
    ):
        assert row in r.stdout, row
    ratio = model_file_bytes(runs / "student") / model_file_bytes(runs / "pq")
    assert f"({ratio:.2f}×)" in r.stdout  # the compressed run's size against the first model's


def test_latency_repeats_0_skips_latency(runs):
    rep = eval_json("--model", runs / "student", "--data", runs / "blobs.npz", "--latency-repeats", 0)
    m = rep["models"][0]
    assert m["latency_batch1_s"] is None and m["latency_batch_s"] is None and m["bytes_on_disk"] > 0
    r = runner.invoke(
        app, ["eval", "--model", str(runs / "student"), "--data", str(runs / "blobs.npz"), "--latency-repeats", "0"]
    )
    assert r.exit_code == 0 and "latency" not in r.stdout and "bytes on disk" in r.stdout


def test_builtin_model_with_weights_file_counts_the_file(runs, tmp_path):
    weights = runs / "student" / "model.safetensors"
    rep = eval_json("--model", f"mlp@{weights}", "--data", runs / "blobs.npz", "--latency-repeats", 0)
    assert rep["models"][0]["bytes_on_disk"] == weights.stat().st_size


def test_lm_report_fields(tmp_path, monkeypatch):
    from lm_helpers import make_tokenizer, text_rows, write_jsonl

    tok = make_tokenizer(tmp_path / "tok")
    text = write_jsonl(tmp_path / "text.jsonl", text_rows(12))
    train_student(
        resolve(
            TrainConfig,
            None,
            dict(
                student="transformer",
                out=str(tmp_path / "lm"),
                data=str(text),
                tokenizer=str(tok),
                epochs=1,
                max_length=32,
                batch_size=8,
                student_args={"d_model": 32, "n_layers": 1, "n_heads": 2},
            ),
        )
    )
    compress(
        resolve(
            CompressConfig,
            None,
            dict(model=str(tmp_path / "lm"), out=str(tmp_path / "lm8"), quantize="int8", prune=0.5),
        )
    )
    rep = eval_json(
        "--model",
        tmp_path / "lm",
        "--model",
        tmp_path / "lm8",
        "--data",
        text,
        "--batch-size",
        4,
        "--latency-repeats",
        2,
    )
    full, small = rep["models"]
    for name, m in (("lm", full), ("lm8", small)):
        assert all(f in m for f in NEW_FIELDS)
        assert m["latency_batch_size"] == 4 and m["latency_batch1_s"] > 0 and m["latency_batch_s"] > 0
        assert m["nonzero_parameters"] == nonzero_in_file(tmp_path / name)
        tokenizer_bytes = sum(f.stat().st_size for f in (tmp_path / name / "tokenizer").rglob("*") if f.is_file())
        assert m["bytes_on_disk"] == model_file_bytes(tmp_path / name) + tokenizer_bytes
    assert small["nonzero_parameters"] < full["nonzero_parameters"] and small["bytes_on_disk"] < full["bytes_on_disk"]
    assert np.isfinite(small["perplexity"])
    monkeypatch.setenv("COLUMNS", "200")  # no wrapped cells
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "lm"),
            "--model",
            str(tmp_path / "lm8"),
            "--data",
            str(text),
            "--batch-size",
            "4",
        ],
    )
    assert r.exit_code == 0, r.stderr
    for row in (
        "non-zero parameters",
        "bytes on disk (× smaller)",
        "×)",
        "latency/row, batch 1",
        "latency/row, batch 4",
        "next-token accuracy Δ vs first",
    ):
        assert row in r.stdout, row


def test_latency_reuses_the_eval_pass_timings_and_tops_up_small_sets():
    from kdcli.tasks.base import size_and_speed

    calls = []
    net = torch.nn.Linear(3, 2)

    def forward(m, x):
        calls.append(len(x))
        return m(x)

    x = torch.randn(8, 3)
    # a large eval set: 5 timed full batches of 8 rows -> their median, no extra forward at batch 8
    s = size_and_speed(net, None, x, 8, 3, forward=forward, pass_times=[0.8, 0.08, 0.16, 0.24, 8.0], warm=True)
    assert s["latency_batch_s"] == pytest.approx(0.24 / 8)  # median of 0.08, 0.16, 0.24, 0.8, 8.0
    assert s["bytes_on_disk"] is None
    assert s["latency_batch_spread"] == pytest.approx((0.8 - 0.16) / 0.24)  # interquartile range / median
    assert calls == [1] * 4  # batch 1: one warm-up + 3 timed
    # a small one (one batch, the warm-up): 3 timed forwards at batch 8, no second warm-up
    calls.clear()
    s = size_and_speed(net, None, x, 8, 3, forward=forward, warm=True)
    assert calls == [1] * 4 + [8] * 3 and s["latency_batch_s"] > 0
    # not warmed up: one untimed forward first
    calls.clear()
    size_and_speed(net, None, x, 8, 2, forward=forward)
    assert calls == [1] * 3 + [8] * 3
    calls.clear()
    s = size_and_speed(net, None, x, 8, 0, forward=forward, pass_times=[0.1])
    assert calls == [] and s["latency_batch1_s"] is None and s["latency_batch_s"] is None
    assert s["nonzero_parameters"] == int((net.weight != 0).sum() + (net.bias != 0).sum())


def test_batch_one_latency_runs_on_one_thread_and_batch_n_on_the_eval_threads():
    """A batch-1 forward is timed with one torch thread (a descheduled pool thread on busy cores would cost a
    scheduler slice per forward); the batch-N figure with the threads eval runs with, which are then restored."""
    from kdcli.tasks.base import size_and_speed

    seen = []

    def forward(m, x):
        seen.append((len(x), torch.get_num_threads()))
        return m(x)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s = size_and_speed(torch.nn.Linear(3, 2), None, torch.randn(8, 3), 8, 3, forward=forward)
        assert {t for n, t in seen if n == 1} == {1} and {t for n, t in seen if n == 8} == {2}
        assert torch.get_num_threads() == 2 and s["latency_threads"] == 2
        assert s["latency_batch1_spread"] >= 0 and s["latency_batch_spread"] >= 0
    finally:
        torch.set_num_threads(before)


def test_spread_is_the_interquartile_range_over_the_median():
    from kdcli.models.stats import spread

    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.0 - 2.0) / 3.0)
    assert spread([5.0, 5.0, 5.0]) == 0.0 and spread([1.0, 9.0]) == 0.0  # too few timings to say


def test_a_busy_machine_is_named_in_one_warning(monkeypatch):
    from types import SimpleNamespace

    from kdcli.stages import evaluate as ev

    warned = []
    monkeypatch.setattr(ev.log, "warn", warned.append)
    quiet = SimpleNamespace(model="a", latency_batch1_spread=0.04, latency_batch_spread=0.1)
    busy = SimpleNamespace(model="b", latency_batch1_spread=0.9, latency_batch_spread=0.3)
    ev.warn_if_busy([quiet])
    assert warned == []
    ev.warn_if_busy([quiet, busy])
    [line] = warned
    assert line.startswith("latency timings of b spread by 90% of their median") and "--threads 1" in line
    ev.warn_if_busy([SimpleNamespace(model="c", latency_batch1_spread=None, latency_batch_spread=None)])
    assert len(warned) == 1  # --latency-repeats 0: nothing to judge


def test_eval_threads_option_and_the_table_say_how_latency_was_timed(runs, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    r = runner.invoke(
        app, ["eval", "--model", str(runs / "student"), "--data", str(runs / "blobs.npz"), "--threads", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    [m] = json.loads(r.stdout)["models"]
    assert m["latency_threads"] == 1 and m["latency_batch1_spread"] is not None
    r = runner.invoke(
        app, ["eval", "--model", str(runs / "student"), "--data", str(runs / "blobs.npz"), "--threads", "1"]
    )
    assert "latency/row, batch 1, 1 thread" in r.stdout and ", 1 thread (× faster)" in r.stdout
