"""Hinton et al. 2015's omit-a-class experiment as kdcli options: the ``?omit=``/``?only=`` data filter and
``eval --class-bias`` (fixed or fitted on --bias-data), checked against brute force and hand-made cases."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_blobs, run_cli
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import EvalConfig
from kdcli.data import load_data, split_filter
from kdcli.infra.errors import UsageError
from kdcli.stages.evaluate import evaluate
from kdcli.tasks.classify import BIAS_GRID, apply_class_bias, fit_class_bias, parse_class_bias

runner = CliRunner()


# -- the data filter ---------------------------------------------------------------------------------------------
def test_omit_drops_the_class_and_keeps_the_label_space(blobs_npz: Path):
    full = load_data(str(blobs_npz))
    top = full.num_classes - 1
    d = load_data(f"{blobs_npz}?omit={top}")
    assert d.num_classes == full.num_classes  # the omitted class is still an output of the model
    assert not (d.y == top).any()
    keep = full.y != top
    assert d.n == int(keep.sum())
    assert torch.equal(d.x, full.x[keep]) and torch.equal(d.y, full.y[keep])
    assert np.array_equal(d.row_hash, full.row_hash[keep.numpy()])
    assert d.identity()["spec"].endswith(f"?omit={top}") and d.fingerprint != full.fingerprint


def test_slice_applies_before_the_filter_and_only_keeps(blobs_npz: Path):
    full = load_data(str(blobs_npz))
    d = load_data(f"{blobs_npz}[:100]?omit=1,2")
    want = full.y[:100][(full.y[:100] != 1) & (full.y[:100] != 2)]
    assert torch.equal(d.y, want)
    only = load_data(f"{blobs_npz}?only=2")
    assert set(only.y.tolist()) == {2} and only.n == int((full.y == 2).sum())


@pytest.mark.parametrize(
    "suffix, needle",
    [
        ("?drop=3", "unknown data filter '?drop='"),
        ("?omit=x", "comma-separated integer labels"),
        ("?omit=", "comma-separated integer labels"),
        ("?omit=9", "out of range for 4 classes"),
        ("?omit=-1", "out of range"),
        ("?only=1[:5]", "integer labels"),
    ],
)
def test_bad_filters_are_usage_errors(blobs_npz: Path, suffix: str, needle: str):
    with pytest.raises(UsageError, match=None) as e:
        load_data(f"{blobs_npz}{suffix}")
    assert needle in str(e.value)


def test_a_filter_that_leaves_nothing_is_refused(tmp_path: Path):
    p = tmp_path / "one.npz"
    np.savez(p, x=np.ones((4, 2), np.float32), y=np.array([0, 0, 1, 1]))
    with pytest.raises(UsageError, match="leaves no rows"):
        load_data(f"{p}?omit=0,1")
    assert split_filter("mnist:train") == ("mnist:train", None)
    assert split_filter("mnist:train[:10]?omit=3,5") == ("mnist:train[:10]", ("omit", frozenset({3, 5})))


def test_a_cache_of_the_filtered_set_trains_and_refuses_the_unfiltered_set(
    tmp_path: Path, teacher_run: Path, blobs_npz: Path
):
    spec = f"{blobs_npz}?omit=2"
    cache = tmp_path / "cache"
    run_cli("cache-teacher", "--teacher", teacher_run, "--data", spec, "--out", cache, check=True)
    ok = run_cli(
        "train-student",
        "--cache",
        cache,
        "--student",
        "mlp",
        "--student-arg",
        "hidden=[8]",
        "--data",
        spec,
        "--epochs",
        "1",
        "--out",
        tmp_path / "s1",
    )
    assert ok.returncode == 0, ok.stderr
    bad = run_cli(
        "train-student",
        "--cache",
        cache,
        "--student",
        "mlp",
        "--data",
        blobs_npz,
        "--epochs",
        "1",
        "--out",
        tmp_path / "s2",
    )
    assert bad.returncode == 3 and "error:" in bad.stderr and "Traceback" not in bad.stderr


# -- the bias fit --------------------------------------------------------------------------------------------------
def _errors(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.argmax(1) != y).sum())


def test_fit_class_bias_finds_the_brute_force_minimum():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    logits = torch.randn(400, 5, generator=g) * 2
    logits[torch.arange(400), y] += 2.0
    logits[:, 3] -= 3.0  # class 3 is under-predicted: its best bias is clearly positive
    b = fit_class_bias(logits, y, 3)
    brute = [_errors(apply_class_bias(logits, {3: float(v)}), y) for v in BIAS_GRID]
    assert _errors(apply_class_bias(logits, {3: b}), y) == min(brute)
    assert 1.0 < b < 6.0
    assert _errors(apply_class_bias(logits, {3: b}), y) < _errors(logits, y)


def test_fit_class_bias_hand_case_breaks_ties_by_nll():
    # two rows of class 1 whose logit trails class 0 by 1.0 and 2.0: any bias above 2 fixes both, and one row
    # of class 0 leads class 1 by 5.0: a bias above 5 breaks it. Errors are 0 for b in (2, 5); the lowest NLL in
    # that window is where the two kinds of rows balance, strictly inside it.
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    y = torch.tensor([1, 1, 0])
    b = fit_class_bias(logits, y, 1)
    assert 2.0 < b < 5.0
    nll = lambda v: float(torch.nn.functional.cross_entropy(apply_class_bias(logits, {1: v}), y))  # noqa: E731
    assert nll(b) <= min(nll(2.05), nll(4.95))


def test_fit_needs_rows_of_the_class():
    with pytest.raises(UsageError, match="no rows of class 2"):
        fit_class_bias(torch.zeros(3, 3), torch.tensor([0, 1, 1]), 2)


def test_parse_class_bias():
    assert parse_class_bias({"3": 3.5, "1": "fit", "0": -2}, 4) == {3: 3.5, 1: "fit", 0: -2.0}
    for bad in ({"4": 1.0}, {"x": 1.0}, {"1": "big"}, {"1": True}, {"1": float("nan")}):
        with pytest.raises(UsageError, match="--class-bias"):
            parse_class_bias(bad, 4)


# -- evaluate / CLI ------------------------------------------------------------------------------------------------
def test_evaluate_applies_the_bias_and_keeps_the_numbers_before(teacher_run: Path, blobs_npz: Path):
    plain = evaluate(EvalConfig(model=[str(teacher_run)], data=str(blobs_npz))).models[0]
    y = load_data(str(blobs_npz)).y
    counts = torch.bincount(y, minlength=4)
    assert sum(plain.per_class_errors) == plain.errors and plain.class_bias is None and plain.before_bias is None
    r = evaluate(EvalConfig(model=[str(teacher_run)], data=str(blobs_npz), class_bias={"0": 1000.0}))
    m = r.models[0]
    assert m.class_bias == {"0": 1000.0}
    assert m.before_bias["errors"] == plain.errors and m.before_bias["per_class_errors"] == plain.per_class_errors
    # a huge bias makes every prediction class 0: exactly the other classes' rows are wrong
    assert m.errors == len(y) - int(counts[0])
    assert m.per_class_errors == [0] + counts[1:].tolist()
    assert r.class_counts == counts.tolist()


def test_fit_on_bias_data_never_makes_the_fit_set_worse(teacher_run: Path, blobs_npz: Path, tmp_path: Path):
    x, y = make_blobs(n=300, seed=1)
    held = tmp_path / "held.npz"
    np.savez(held, x=x, y=y)
    r = evaluate(
        EvalConfig(model=[str(teacher_run)], data=str(blobs_npz), class_bias={"1": "fit"}, bias_data=str(held))
    )
    assert r.bias_data == str(held)
    b = r.models[0].class_bias["1"]
    on_held_plain = evaluate(EvalConfig(model=[str(teacher_run)], data=str(held))).models[0].errors
    on_held_fit = evaluate(EvalConfig(model=[str(teacher_run)], data=str(held), class_bias={"1": b})).models[0]
    assert on_held_fit.errors <= on_held_plain


def test_cli_class_bias_table_and_errors(teacher_run: Path, blobs_npz: Path):
    res = runner.invoke(app, ["eval", "--model", str(teacher_run), "--data", str(blobs_npz), "--class-bias", "2=fit"])
    assert res.exit_code == 0, res.output
    assert "errors on class 2 (of" in res.stdout and "errors before bias" in res.stdout and "→" in res.stdout
    assert "evaluation data itself" in res.stderr  # the optimistic choice is said out loud
    res = runner.invoke(
        app, ["eval", "--model", str(teacher_run), "--data", str(blobs_npz), "--bias-data", str(blobs_npz)]
    )
    assert res.exit_code == 2 and "--bias-data is only used" in res.stderr
    res = runner.invoke(app, ["eval", "--model", str(teacher_run), "--data", str(blobs_npz), "--class-bias", "7=1"])
    assert res.exit_code == 2 and "class index 0..3" in res.stderr
    res = runner.invoke(
        app, ["eval", "--model", str(teacher_run), "--data", f"{blobs_npz}?omit=2", "--class-bias", "2=fit"]
    )  # fitting on data without the class
    assert res.exit_code == 2 and "no rows of class 2" in res.stderr
