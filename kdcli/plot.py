"""``kdcli eval --plot PATH``: one figure with two panels, written atomically.

- left: test errors per epoch of every evaluated run, read from its ``metrics.jsonl`` (runs trained with
  ``--eval-data``), against the training rows seen so far (epoch x rows per epoch), so runs whose epochs differ
  in size (a distilled student's epoch covers every cached view) share one axis;
- right: a reliability diagram from the report's confidence bins (accuracy vs mean confidence per bin; the
  diagonal is perfect calibration), with each model's ECE.

matplotlib is an optional extra (``pip install 'kdcli[plot]'``); without it ``--plot`` is a usage error (exit 2).
The figure is drawn on a plain ``Figure`` (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdcli.infra.errors import UsageError

FORMATS = ("png", "svg", "pdf")
INSTALL_HINT = "install it with: pip install 'kdcli[plot]'"


@dataclass
class ErrorCurve:
    """Per-epoch test errors of one run: ``rows_seen[i]`` training rows after the epoch with ``errors[i]``."""

    label: str
    rows_seen: list[int]
    errors: list[int]
    eval_data: str | None


def error_curve(run_dir: Path, label: str | None = None) -> ErrorCurve | None:
    """The run's eval_errors per epoch, or None when it has no metrics or was trained without --eval-data."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash: the rest of the file is still usable
        if isinstance(rec, dict) and "eval_errors" in rec and "epoch" in rec:
            records.append(rec)
    if not records:
        return None
    config = _read_yaml(run_dir / "config.yaml")
    rows_per_epoch = _json_field(run_dir / "summary.json", "train_rows")
    if rows_per_epoch is None:  # an unfinished run: steps x batch size (counts a last partial batch as whole)
        batch = config.get("batch_size") or 1
        xs = [int(r.get("step", r["epoch"])) * int(batch) for r in records]
    else:
        xs = [int(r["epoch"]) * int(rows_per_epoch) for r in records]
    return ErrorCurve(
        label=label or run_dir.name,
        rows_seen=xs,
        errors=[int(r["eval_errors"]) for r in records],
        eval_data=config.get("eval_data"),
    )


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _json_field(path: Path, key: str):
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed", hint=INSTALL_HINT) from None
    return Figure


def _labels(report) -> list[str]:
    names = [Path(m.model).name or m.model for m in report.models]
    return names if len(set(names)) == len(names) else [m.model for m in report.models]


def build_figure(report):
    """A matplotlib ``Figure`` for an EvalReport: error curves (left) and the reliability diagram (right)."""
    if getattr(report, "kind", None) == "lm" or not hasattr(report.models[0], "reliability"):
        raise UsageError(
            "--plot draws classification reports (error curves, reliability); it does not support "
            "JSONL text evaluations"
        )
    Figure = _figure_class()
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_err, ax_rel = fig.subplots(1, 2)
    labels = _labels(report)

    curves = [error_curve(Path(m.model), name) for m, name in zip(report.models, labels)]
    drawn = [c for c in curves if c is not None]
    for c in drawn:
        ax_err.plot([x / 1e6 for x in c.rows_seen], c.errors, marker="o", markersize=3, label=c.label)
    sources = sorted({c.eval_data for c in drawn if c.eval_data})
    ax_err.set_title("test errors per epoch" + (f" on {', '.join(sources)}" if sources else ""))
    ax_err.set_xlabel("training rows seen (millions)")
    ax_err.set_ylabel("errors")
    if drawn:
        if max(max(c.errors) for c in drawn) > 5 * max(1, min(min(c.errors) for c in drawn)):
            from matplotlib.ticker import FuncFormatter

            ax_err.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 60, 100, 200 rather than 6x10^1
            ax_err.yaxis.set_major_formatter(plain)
            ax_err.yaxis.set_minor_formatter(plain)
        ax_err.grid(True, which="both", alpha=0.3)
        ax_err.legend()
    missing = [name for c, name in zip(curves, labels) if c is None]
    if missing:
        ax_err.text(
            0.02,
            0.02,
            "no per-epoch test metrics (train with --eval-data): " + ", ".join(missing),
            transform=ax_err.transAxes,
            fontsize=8,
            va="bottom",
        )

    ax_rel.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    low = 1.0  # zoom on the occupied range (MNIST models sit near confidence 1), diagonal kept
    for m, name in zip(report.models, labels):
        bins = [b for b in m.reliability if b["count"] > 0]
        if not bins:
            continue
        sizes = [12 + 60 * math.sqrt(b["count"] / m.num_samples) for b in bins]
        (line,) = ax_rel.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            linewidth=1,
            label=f"{name} (ECE {m.ece:.4f})",
        )
        ax_rel.scatter(
            [b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=sizes, color=line.get_color(), alpha=0.7
        )
        low = min(low, *(min(b["confidence"], b["accuracy"]) for b in bins))
    ax_rel.set_title(f"reliability on {report.data} (marker area ~ rows in bin)")
    ax_rel.set_xlabel("mean confidence in bin")
    ax_rel.set_ylabel("accuracy in bin")
    low = math.floor(max(0.0, low - 0.05) * 10) / 10
    ax_rel.set_xlim(low, 1.005)
    ax_rel.set_ylim(low, 1.005)
    ax_rel.grid(True, alpha=0.3)
    ax_rel.legend(loc="best", fontsize=8)
    return fig


def plot_report(report, path: Path) -> Path:
    """Write the figure to ``path`` (.png, .svg or .pdf) via a ``.partial`` file and an atomic rename."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    if fmt not in FORMATS:
        raise UsageError(f"--plot {path}: unsupported file type '.{fmt}'; use .png, .svg or .pdf")
    fig = build_figure(report)
    if path.exists() and path.is_dir():
        raise UsageError(f"--plot {path} is a directory; give a file name such as {path / 'report.png'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        fig.savefig(tmp, format=fmt, dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
