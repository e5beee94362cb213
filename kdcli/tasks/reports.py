"""What every task's summaries and eval reports share: the dataclasses the stages return, and the rows of the eval
table both tasks build (agreement and KL to the teacher, size, compression, speed). Each summary builds its own
:class:`~kdcli.infra.fmt.TableData`; :mod:`kdcli.report` renders any of them the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kdcli.infra.fmt import TableData, human_bytes, human_seconds, key_values, kl_text


@dataclass
class CacheSummary:
    cache_dir: str
    status: str  # "written", "resumed" or "up-to-date"
    mode: str
    num_rows: int
    rows_computed: int
    rows_skipped: int
    num_shards: int
    bytes: int
    bytes_per_row: float
    seconds: float
    rows_per_second: float
    teacher: str
    teacher_parameters: int
    device: str
    compression: str = "none"  # how the shards are stored (gzip-4+shuffle, lzf+shuffle, none)
    # sampled modes: distinct teacher ids stored per row (per predicted token in a token cache), the mean over the
    # cache (kdcli.cache.reader.mean_unique_ids); None for the others
    unique_ids: float | None = None

    def table(self) -> TableData:
        return key_values(
            f"cache-teacher: {self.status}",
            [
                ("cache", self.cache_dir),
                ("mode", self.mode),
                *self.count_rows(),
                ("shards", str(self.num_shards)),
                ("size", f"{human_bytes(self.bytes)} ({self.size_note()})"),
                ("compression", self.compression),
                ("teacher", f"{self.teacher} ({self.teacher_parameters:,} params) on {self.device}"),
                ("time", f"{self.seconds:.1f} s ({self.speed_note()})"),
            ],
        )

    # what a task counts in its rows; a token cache (LMCacheSummary) counts predicted tokens
    def count_rows(self) -> list[tuple[str, str]]:
        return [
            ("rows", f"{self.num_rows:,}"),
            ("computed / skipped", f"{self.rows_computed:,} / {self.rows_skipped:,}"),
        ]

    def size_note(self) -> str:
        ids = f", {self.unique_ids:.1f} distinct ids/row" if self.unique_ids is not None else ""
        return f"{self.bytes_per_row:.1f} B/row{ids}"

    def speed_note(self) -> str:
        return f"{self.rows_per_second:,.0f} rows/s"


@dataclass
class TrainSummary:
    run_dir: str
    loss_formula: str
    epochs: int
    steps: int
    train_rows: int
    final_train_loss: float
    final_train_accuracy: float
    val_accuracy: float | None
    eval_accuracy: float | None
    seconds: float
    rows_per_second: float
    student_parameters: int
    resumed_from_step: int

    def head_rows(self) -> list[tuple[str, str]]:
        return [("run", self.run_dir), ("loss", self.loss_formula), ("epochs / steps", f"{self.epochs} / {self.steps}")]

    def tail_rows(self) -> list[tuple[str, str]]:
        return [("resumed from step", str(self.resumed_from_step))] if self.resumed_from_step else []

    def table(self) -> TableData:
        rows = [*self.head_rows(), *self.count_rows()]
        rows += [
            ("final train loss", f"{self.final_train_loss:.4f}"),
            ("final train accuracy", f"{self.final_train_accuracy:.4f}"),
        ]
        if self.val_accuracy is not None:
            rows.append(("val accuracy", f"{self.val_accuracy:.4f}"))
        if self.eval_accuracy is not None:
            rows.append(("eval accuracy", f"{self.eval_accuracy:.4f}"))
        rows += [
            ("student parameters", f"{self.student_parameters:,}{self.parameters_note()}"),
            ("time", f"{self.seconds:.1f} s ({self.speed_note()} in the last epoch)"),
        ]
        return key_values("train-student", rows + self.tail_rows())

    # what a task counts; a language model (LMTrainSummary) counts tokens too
    def count_rows(self) -> list[tuple[str, str]]:
        return [("train rows", f"{self.train_rows:,}")]

    def parameters_note(self) -> str:
        return ""

    def speed_note(self) -> str:
        return f"{self.rows_per_second:,.0f} rows/s"


@dataclass(kw_only=True)
class SizeAndSpeed:
    """The compression report of one eval model (:func:`kdcli.tasks.base.size_and_speed`): non-zero parameters
    (int8 weights included), bytes of the model's files (None for a built-in name without files), median seconds
    per row at batch 1 and at ``latency_batch_size`` (None with --latency-repeats 0). A row is a sample, or for a
    language model a sequence of the eval data's first batch (padded to its longest)."""

    nonzero_parameters: int | None = None
    bytes_on_disk: int | None = None
    latency_batch_size: int | None = None
    latency_batch1_s: float | None = None
    latency_batch_s: float | None = None
    # the timings' relative spread (interquartile range / median) and the torch threads at latency_batch_size
    # (batch 1 runs on one thread); None for a model on a GPU
    latency_batch1_spread: float | None = None
    latency_batch_spread: float | None = None
    latency_threads: int | None = None


class ModelRow(Protocol):
    """What the shared eval rows read of a model's report (classification's ModelReport, LM's LMModelReport)."""

    model: str
    accuracy: float
    agreement: float | None
    kl_to_teacher: float | None
    num_parameters: int
    nonzero_parameters: int | None
    bytes_on_disk: int | None
    weight_bytes: int
    latency_batch_size: int | None
    latency_batch1_s: float | None
    latency_batch_s: float | None
    latency_batch1_spread: float | None
    latency_batch_spread: float | None
    latency_threads: int | None


class EvalReport(Protocol):
    """What ``eval`` returns for any task: the models' reports, the gates that failed, and its table."""

    data: str
    models: list
    failures: list[str]

    def table(self) -> TableData: ...


Rows = list[tuple[str, Callable[[Any], str]]]


def compression_rows(models: list, accuracy_name: str) -> list[tuple[str, Any]]:
    """The compression report's rows (size, speed, the change in accuracy), each model against the first one.

    Each model after the first shows in brackets how many times smaller (bytes) or faster (latency) it is than the
    first --model (the teacher, in a teacher -> student -> compressed comparison): below 1 means larger / slower.
    Rows whose values every model lacks (no files, --latency-repeats 0) are left out.
    """
    first = models[0]

    def ratio(a, b, m):
        if m is first or not a or not b:
            return ""
        r = a / b
        return f" ({r:.2f}×)" if r < 10 else f" ({r:.1f}×)" if r < 100 else f" ({r:,.0f}×)"

    rows: list[tuple[str, Any]] = [("non-zero parameters", lambda m: f"{m.nonzero_parameters:,}")]
    if any(m.bytes_on_disk is not None for m in models):
        rows.append(
            (
                "bytes on disk (× smaller)",
                lambda m: (
                    "-"
                    if m.bytes_on_disk is None
                    else human_bytes(m.bytes_on_disk) + ratio(first.bytes_on_disk, m.bytes_on_disk, m)
                ),
            )
        )
    if any(m.latency_batch1_s is not None for m in models):

        def latency(m, key):
            value, spread = getattr(m, f"latency_{key}_s"), getattr(m, f"latency_{key}_spread")
            text = human_seconds(value) + (f" ±{spread / 2:.0%}" if spread else "")
            return text + ratio(getattr(first, f"latency_{key}_s"), value, m)

        threads = {m.latency_threads for m in models} - {None}  # empty: every model ran on a GPU
        rows.append(
            (f"latency/row, batch 1{', 1 thread' if threads else ''} (× faster)", lambda m: latency(m, "batch1"))
        )
        if any(m.latency_batch_size != 1 for m in models):
            on = ""
            if len(threads) == 1:
                n = threads.pop()
                on = f", {n} thread{'s' if n > 1 else ''}"
            rows.append(
                (f"latency/row, batch {first.latency_batch_size:,}{on} (× faster)", lambda m: latency(m, "batch"))
            )
    if len(models) > 1:
        rows.append((f"{accuracy_name} Δ vs first", lambda m: f"{m.accuracy - first.accuracy:+.4f}"))
    return rows


def column_names(models: list) -> list[str]:
    """One column per model: its folder or file name, or the whole spec when two names would be the same."""
    names = [Path(m.model).name or m.model for m in models]
    return [m.model for m in models] if len(set(names)) < len(names) else names


def teacher_and_size_rows(
    cache: Any, temperature: float, models: list, agreement: str, accuracy_name: str, speed: tuple
) -> Rows:
    """The rows both eval tables end with: agreement and KL to the teacher (with a cache), then parameters, the
    compression rows, weights in memory and the ``speed`` row."""
    rows: Rows = []
    if cache:
        rows += [
            (agreement, lambda m: f"{m.agreement:.4f}"),
            (f"KL(teacher‖model) T={temperature:g}", lambda m: kl_text(m.kl_to_teacher)),
        ]
    return rows + [
        ("parameters", lambda m: f"{m.num_parameters:,}"),
        *compression_rows(models, accuracy_name),
        ("weights in memory", lambda m: human_bytes(m.weight_bytes)),
        speed,
    ]


def metric_table(title: str, models: list, rows: Rows, caption: str | None = None) -> TableData:
    """One column per model, one row per (name, format) pair."""
    return TableData(
        title=title,
        header=["metric", *column_names(models)],
        rows=[[name, *[f(m) for m in models]] for name, f in rows],
        justify=["left"] + ["right"] * len(models),
        caption=caption,
    )
