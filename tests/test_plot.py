"""``kdcli eval --plot``: the held-out and training-loss curves come from each run's metrics.jsonl, the
reliability diagram from the report's bins; the file is written atomically and its path said on stderr; a missing
matplotlib is one clear exit-2 line."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import EvalConfig, TrainConfig
from kdcli.infra.errors import UsageError
from kdcli.plot import build_figure, error_curve, plot_report
from kdcli.stages.evaluate import evaluate
from kdcli.stages.train import train_student
from kdcli.tasks.classify import EvalReport, ModelReport

pytest.importorskip("matplotlib")
runner = CliRunner()


def _fake_run(root: Path, name: str, errors: list[int], rows: int | None = 1000, torn: bool = False) -> Path:
    d = root / name
    d.mkdir()
    lines = [
        json.dumps(
            {"epoch": i + 1, "step": (i + 1) * 8, "train_loss": 1.0 / (i + 1), "eval_errors": e, "eval_accuracy": 1}
        )
        for i, e in enumerate(errors)
    ]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"epoch": 9, "eval_err' if torn else ""))
    (d / "config.yaml").write_text("batch_size: 128\neval_data: mnist:test\n")
    if rows is not None:
        (d / "summary.json").write_text(json.dumps({"train_rows": rows}))
    return d


def _report(models: list[str], ece: float = 0.02) -> EvalReport:
    bins = [
        {"bin": 13, "count": 20, "confidence": 0.9, "accuracy": 0.8},
        {"bin": 14, "count": 480, "confidence": 0.99, "accuracy": 0.995},
    ]
    ms = [
        ModelReport(
            model=m,
            num_samples=500,
            accuracy=0.98,
            errors=10,
            precision_macro=0.98,
            recall_macro=0.98,
            f1_macro=0.98,
            nll=0.07,
            ece=ece,
            agreement=None,
            kl_to_teacher=None,
            num_parameters=10,
            weight_bytes=40,
            samples_per_second=1e4,
            reliability=bins,
        )
        for m in models
    ]
    return EvalReport(data="mnist:test", cache=None, temperature=1.0, models=ms, failures=[])


def test_error_curve_reads_metrics_and_skips_a_torn_line(tmp_path: Path):
    c = error_curve(_fake_run(tmp_path, "a", [30, 20, 10], torn=True))
    assert c.errors == [30, 20, 10] and c.rows_seen == [1000, 2000, 3000] and c.eval_data == "mnist:test"
    unfinished = error_curve(_fake_run(tmp_path, "b", [5, 4], rows=None))
    assert unfinished.rows_seen == [8 * 128, 16 * 128]  # steps x batch size without a summary
    no_eval = tmp_path / "c"
    no_eval.mkdir()
    (no_eval / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.1}) + "\n")
    assert error_curve(no_eval) is None and error_curve(tmp_path / "missing") is None


def test_figure_holds_the_curves_and_the_reliability_bins(tmp_path: Path):
    a = _fake_run(tmp_path, "teacher", [300, 120, 60])
    b = _fake_run(tmp_path, "student", [200, 150], rows=4000)
    fig = build_figure(_report([str(a), str(b), str(tmp_path / "no-metrics")]))
    ax_err, ax_loss, ax_rel = fig.axes
    assert list({ln.get_label(): ln for ln in ax_loss.get_lines()}["teacher"].get_ydata()) == [1.0, 0.5, 1 / 3]
    assert "no-metrics" in " ".join(t.get_text() for t in ax_loss.texts)
    curves = {ln.get_label(): ln for ln in ax_err.get_lines()}
    assert list(curves["teacher"].get_ydata()) == [300, 120, 60]
    assert list(curves["student"].get_xdata()) == [0.004, 0.008]  # millions of rows seen
    assert "no-metrics" in " ".join(t.get_text() for t in ax_err.texts)  # said, not silently dropped
    labels = [ln.get_label() for ln in ax_rel.get_lines()]
    assert labels[0] == "perfect calibration" and "teacher (ECE 0.0200)" in labels
    rel = [ln for ln in ax_rel.get_lines() if ln.get_label().startswith("student")][0]
    assert list(rel.get_xdata()) == [0.9, 0.99] and list(rel.get_ydata()) == [0.8, 0.995]


def test_plot_report_writes_png_and_svg_atomically(tmp_path: Path):
    report = _report([str(_fake_run(tmp_path, "r", [9, 7]))])
    png = plot_report(report, tmp_path / "new" / "dir" / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plot_report(report, tmp_path / "fig.svg")
    assert b"<svg" in svg.read_bytes()[:500]
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("name, needle", [("fig.jpg2", "unsupported file type"), ("adir", "is a directory")])
def test_bad_plot_paths_are_usage_errors(tmp_path: Path, name: str, needle: str):
    (tmp_path / "adir").mkdir()
    with pytest.raises(UsageError, match=needle):
        plot_report(_report([str(tmp_path / "x")]), tmp_path / name)


def test_missing_matplotlib_is_a_clear_exit_2(tmp_path: Path, monkeypatch, teacher_run: Path, blobs_npz: Path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UsageError, match="needs matplotlib"):
        build_figure(_report(["x"]))
    res = runner.invoke(
        app, ["eval", "--model", str(teacher_run), "--data", str(blobs_npz), "--plot", str(tmp_path / "p.png")]
    )
    assert res.exit_code == 2
    assert (
        res.stderr.strip() == "error: --plot needs matplotlib, which is not installed (install it with: pip "
        "install 'kdcli[plot]')"
    )
    assert not (tmp_path / "p.png").exists()


def test_cli_eval_plot_end_to_end(tmp_path: Path, blobs_npz: Path):
    run = tmp_path / "run"
    train_student(
        TrainConfig(
            student="mlp",
            student_args={"hidden": [16]},
            data=str(blobs_npz),
            out=str(run),
            epochs=3,
            lr=3e-3,
            eval_data=str(blobs_npz),
        )
    )
    out = tmp_path / "plot.png"
    res = runner.invoke(app, ["eval", "--model", str(run), "--data", str(blobs_npz), "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG" and "accuracy" in res.stdout
    errors = [json.loads(x)["eval_errors"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert res.stderr.strip().endswith(f"plot: wrote {out}")  # where the picture went
    fig = build_figure(evaluate(EvalConfig(model=[str(run)], data=str(blobs_npz))))
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == errors and len(errors) == 3


def test_a_run_without_held_out_data_still_shows_how_it_trained(tmp_path: Path, blobs_npz: Path):
    """No --eval-data: no error panel, but the training loss per epoch (and the reliability diagram) are drawn."""
    run = tmp_path / "run"
    train_student(
        TrainConfig(student="mlp", student_args={"hidden": [16]}, data=str(blobs_npz), out=str(run), epochs=2)
    )
    fig = build_figure(evaluate(EvalConfig(model=[str(run)], data=str(blobs_npz))))
    ax_loss, ax_rel = fig.axes
    losses = [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert list(ax_loss.get_lines()[0].get_ydata()) == pytest.approx(losses) and len(losses) == 2
    assert ax_loss.get_title().startswith("training loss") and ax_rel.get_title().startswith("reliability")


def test_language_model_runs_plot_held_out_perplexity_and_loss(tmp_path: Path):
    from kdcli.tasks.lm import LMEvalReport, LMModelReport

    run = tmp_path / "lm-run"
    run.mkdir()
    recs = [
        {"epoch": i + 1, "step": 4 * (i + 1), "train_loss": 3.0 - i, "val_perplexity": 40.0 - 10 * i} for i in range(3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "summary.json").write_text(json.dumps({"train_rows": 100}))
    common = dict(num_tokens=10, perplexity=9.0, nll=2.2, accuracy=0.3, agreement=None, kl_to_teacher=None)
    models = [
        LMModelReport(model=str(run), num_parameters=1, weight_bytes=4, tokens_per_second=1.0, **common),
        LMModelReport(
            model=str(tmp_path / "model.gguf"), num_parameters=1, weight_bytes=4, tokens_per_second=1.0, **common
        ),
    ]
    report = LMEvalReport(
        data="x.jsonl",
        cache=None,
        temperature=1.0,
        num_sequences=2,
        num_tokens=10,
        teacher=None,
        models=models,
        failures=[],
    )
    ax_ppl, ax_loss = build_figure(report).axes
    assert list(ax_ppl.get_lines()[0].get_ydata()) == [40.0, 30.0, 20.0] and "validation" in ax_ppl.get_title()
    assert list(ax_ppl.get_lines()[0].get_xdata()) == [1e-4, 2e-4, 3e-4]
    assert "model.gguf" in " ".join(t.get_text() for t in ax_ppl.texts)
    assert list(ax_loss.get_lines()[0].get_ydata()) == [3.0, 2.0, 1.0]
    with pytest.raises(UsageError, match="none of the models has a training record"):
        build_figure(LMEvalReport(**{**report.__dict__, "models": models[1:]}))
