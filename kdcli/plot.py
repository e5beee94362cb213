"""``kdcli eval --plot PATH``: one figure of what the evaluated runs recorded, written atomically.

Panels, left to right, each drawn when some model has something for it:

- held-out curve per epoch from each run's ``metrics.jsonl``: test errors (classification runs trained with
  ``--eval-data``) or held-out perplexity (language-model runs with ``--eval-data`` or ``--val-fraction``), against
  the training rows seen so far (epoch x rows per epoch), so runs whose epochs differ in size (a distilled
  student's epoch covers every cached view) share one axis;
- training loss per epoch (every kdcli run records it: cross-entropy for a run on labels, the KD loss for a
  distilled one), so a run trained without held-out data still shows how it trained;
- classification: a reliability diagram from the report's confidence bins (accuracy vs mean confidence per bin;
  the diagonal is perfect calibration), with each model's ECE.

A model with nothing recorded (a compressed copy, a model file) is named in a note on the panel, not dropped
silently. matplotlib is an optional extra (``pip install 'kdcli[plot]'``); without it ``--plot`` is a usage error
(exit 2). The figure is drawn on a plain ``Figure`` (no pyplot, no global state, no display needed).
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
class Curve:
    """One recorded metric of one run per epoch: ``rows_seen[i]`` training rows after the epoch with ``values[i]``."""

    label: str
    rows_seen: list[int]
    values: list[float]
    eval_data: str | None

    @property
    def errors(self) -> list[int]:
        return [int(v) for v in self.values]


ErrorCurve = Curve


def run_curve(run_dir: Path, key: str, label: str | None = None) -> Curve | None:
    """The run's ``key`` per epoch from its metrics.jsonl, or None when it has no metrics or never recorded it."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash: the rest of the file is still usable
        if isinstance(rec, dict) and isinstance(rec.get(key), (int, float)) and "epoch" in rec:
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
    return Curve(
        label=label or run_dir.name,
        rows_seen=xs,
        values=[float(r[key]) for r in records],
        eval_data=config.get("eval_data"),
    )


def error_curve(run_dir: Path, label: str | None = None) -> Curve | None:
    """The run's eval_errors per epoch, or None when it has no metrics or was trained without --eval-data."""
    return run_curve(run_dir, "eval_errors", label)


def heldout_curve(run_dir: Path, label: str | None = None) -> tuple[Curve | None, str]:
    """A language-model run's held-out perplexity per epoch (--eval-data, else the --val-fraction rows)."""
    for key, what in (("eval_perplexity", "test"), ("val_perplexity", "validation")):
        c = run_curve(run_dir, key, label)
        if c is not None:
            return c, what
    return None, ""


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


def _draw_curves(ax, curves: list[Curve], labels: list[str], title: str, ylabel: str, hint: str) -> None:
    drawn = [c for c in curves if c is not None]
    for c in drawn:
        ax.plot([x / 1e6 for x in c.rows_seen], c.values, marker="o", markersize=3, label=c.label)
    ax.set_title(title)
    ax.set_xlabel("training rows seen (millions)")
    ax.set_ylabel(ylabel)
    if drawn:
        low, high = min(min(c.values) for c in drawn), max(max(c.values) for c in drawn)
        if low > 0 and high > 5 * low:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 60, 100, 200 rather than 6x10^1
            ax.yaxis.set_major_formatter(plain)
            # within about a decade the minor ticks (200, 300, ...) need labels; across several they would overlap
            ax.yaxis.set_minor_formatter(plain if high <= 20 * low else NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    missing = [name for c, name in zip(curves, labels) if c is None]
    if missing:
        ax.text(0.02, 0.02, f"{hint}: " + ", ".join(missing), transform=ax.transAxes, fontsize=8, va="bottom")


def _draw_reliability(ax, report, labels: list[str]) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    low = 1.0  # zoom on the occupied range (MNIST models sit near confidence 1), diagonal kept
    for m, name in zip(report.models, labels):
        bins = [b for b in m.reliability if b["count"] > 0]
        if not bins:
            continue
        sizes = [12 + 60 * math.sqrt(b["count"] / m.num_samples) for b in bins]
        (line,) = ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            linewidth=1,
            label=f"{name} (ECE {m.ece:.4f})",
        )
        ax.scatter(
            [b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=sizes, color=line.get_color(), alpha=0.7
        )
        low = min(low, *(min(b["confidence"], b["accuracy"]) for b in bins))
    ax.set_title(f"reliability on {report.data} (marker area ~ rows in bin)")
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    low = math.floor(max(0.0, low - 0.05) * 10) / 10
    ax.set_xlim(low, 1.005)
    ax.set_ylim(low, 1.005)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def build_figure(report):
    """A matplotlib ``Figure`` for an eval report: the panels the runs' records allow (see the module doc)."""
    Figure = _figure_class()
    labels = _labels(report)
    runs = [Path(m.model) for m in report.models]
    classification = hasattr(report.models[0], "reliability")
    panels = []  # (draw(ax),) in order
    if classification:
        heldout = [error_curve(r, name) for r, name in zip(runs, labels)]
        sources = sorted({c.eval_data for c in heldout if c is not None and c.eval_data})
        title = "test errors per epoch" + (f" on {', '.join(sources)}" if sources else "")
        ylabel, hint = "errors", "no per-epoch test errors (train with --eval-data)"
    else:
        found = [heldout_curve(r, name) for r, name in zip(runs, labels)]
        heldout = [c for c, _ in found]
        kinds = sorted({what for c, what in found if c is not None})
        title = f"held-out perplexity per epoch ({', '.join(kinds)} data)"
        ylabel, hint = "perplexity", "no held-out perplexity (train with --eval-data or --val-fraction)"
    if any(c is not None for c in heldout):
        panels.append(lambda ax: _draw_curves(ax, heldout, labels, title, ylabel, hint))
    losses = [run_curve(r, "train_loss", name) for r, name in zip(runs, labels)]
    if any(c is not None for c in losses):
        panels.append(
            lambda ax: _draw_curves(
                ax,
                losses,
                labels,
                "training loss per epoch (as trained: labels or KD)",
                "train loss",
                "no training record (metrics.jsonl)",
            )
        )
    if classification:
        panels.append(lambda ax: _draw_reliability(ax, report, labels))
    if not panels:
        raise UsageError(
            "--plot: none of the models has a training record (a kdcli run dir's metrics.jsonl) to draw; plot "
            "kdcli runs, or drop --plot"
        )
    fig = Figure(figsize=(6 * len(panels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for draw, ax in zip(panels, axes):
        draw(ax)
    return fig


def check_plot_path(path: Path) -> str:
    """Refuse (exit 2) a --plot target that cannot be written, before eval measures anything: an unknown file
    type, a directory, no matplotlib. Returns the format."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    if fmt not in FORMATS:
        raise UsageError(f"--plot {path}: unsupported file type '.{fmt}'; use .png, .svg or .pdf")
    if path.exists() and path.is_dir():
        raise UsageError(f"--plot {path} is a directory; give a file name such as {path / 'report.png'}")
    _figure_class()
    return fmt


def plot_report(report, path: Path) -> Path:
    """Write the figure to ``path`` (.png, .svg or .pdf) via a ``.partial`` file and an atomic rename."""
    path = Path(path)
    fmt = check_plot_path(path)
    fig = build_figure(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        fig.savefig(tmp, format=fmt, dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
