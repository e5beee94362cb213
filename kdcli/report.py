"""Summaries -> a rich table on stdout, or exactly one JSON document (rates as fractions, never percentages)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdcli.tasks.base import CacheSummary, TrainSummary
from kdcli.tasks.classify import EvalReport
from kdcli.tasks.lm import LMCacheSummary, LMEvalReport, LMTrainSummary

out_console = Console(highlight=False, soft_wrap=True)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2) + "\n")
    sys.stdout.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


def render_cache(s: CacheSummary) -> Table:
    if isinstance(s, LMCacheSummary):
        return render_lm_cache(s)
    return key_value_table(f"cache-teacher: {s.status}", [
        ("cache", s.cache_dir), ("mode", s.mode), ("rows", f"{s.num_rows:,}"),
        ("computed / skipped", f"{s.rows_computed:,} / {s.rows_skipped:,}"), ("shards", str(s.num_shards)),
        ("size", f"{human_bytes(s.bytes)} ({s.bytes_per_row:.1f} B/row"
                 + (f", {s.unique_ids:.1f} distinct ids/row" if s.unique_ids is not None else "") + ")"),
        ("compression", s.compression),
        ("teacher", f"{s.teacher} ({s.teacher_parameters:,} params) on {s.device}"),
        ("time", f"{s.seconds:.1f} s ({s.rows_per_second:,.0f} rows/s)")])


def render_lm_cache(s: LMCacheSummary) -> Table:
    """A token-level (LM) cache: sizes per predicted token."""
    return key_value_table(f"cache-teacher: {s.status}", [
        ("cache", s.cache_dir), ("mode", s.mode), ("sequences", f"{s.num_rows:,}"),
        ("predicted tokens", f"{s.num_tokens:,}"), ("shards", str(s.num_shards)),
        ("size", f"{human_bytes(s.bytes)} ({s.bytes_per_token:.1f} B/token"
                 + (f" for {s.unique_ids:.1f} distinct ids/token" if s.unique_ids is not None else "")
                 + f", {s.full_fp16_ratio:,.0f}x smaller than full fp16 log-probs over {s.vocab_size:,})"),
        ("compression", s.compression),
        ("teacher", f"{s.teacher} ({s.teacher_parameters:,} params) on {s.device}"),
        ("time", f"{s.seconds:.1f} s ({s.tokens_per_second:,.0f} tokens/s)")])


def render_train(s: TrainSummary) -> Table:
    rows = [("run", s.run_dir), ("loss", s.loss_formula), ("epochs / steps", f"{s.epochs} / {s.steps}"),
            ("train rows", f"{s.train_rows:,}"), ("final train loss", f"{s.final_train_loss:.4f}"),
            ("final train accuracy", f"{s.final_train_accuracy:.4f}")]
    if s.val_accuracy is not None:
        rows.append(("val accuracy", f"{s.val_accuracy:.4f}"))
    if s.eval_accuracy is not None:
        rows.append(("eval accuracy", f"{s.eval_accuracy:.4f}"))
    rows += [("student parameters", f"{s.student_parameters:,}"),
             ("time", f"{s.seconds:.1f} s ({s.rows_per_second:,.0f} rows/s in the last epoch)")]
    if isinstance(s, LMTrainSummary):  # LM runs: sequences are rows; tokens are what matters
        rows[-1] = ("time", f"{s.seconds:.1f} s ({s.tokens_per_second:,.0f} tokens/s in the last epoch)")
        rows.insert(4, ("train tokens", f"{s.train_tokens:,} ({s.divergence} divergence)"))
        if s.eval_perplexity is not None:
            rows.insert(5, ("eval perplexity", f"{s.eval_perplexity:.2f}"))
        if s.trainable_parameters is not None:
            i = next(i for i, r in enumerate(rows) if r[0] == "student parameters")
            rows[i] = ("student parameters", f"{s.student_parameters:,} ({s.trainable_parameters:,} trainable)")
    if s.resumed_from_step:
        rows.append(("resumed from step", str(s.resumed_from_step)))
    return key_value_table("train-student", rows)


def kl_text(x: float) -> str:
    """A KL is >= 0; fp16-stored teacher log-probs can make a model's KL to itself -1e-6 (shown as 0.0000)."""
    return f"{max(x, 0.0):.4f}"


def human_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


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
        rows.append(("bytes on disk (× smaller)", lambda m: "-" if m.bytes_on_disk is None else
                     human_bytes(m.bytes_on_disk) + ratio(first.bytes_on_disk, m.bytes_on_disk, m)))
    if any(m.latency_batch1_s is not None for m in models):
        rows.append(("latency/row, batch 1 (× faster)", lambda m: human_seconds(m.latency_batch1_s)
                     + ratio(first.latency_batch1_s, m.latency_batch1_s, m)))
        if any(m.latency_batch_size != 1 for m in models):
            rows.append((f"latency/row, batch {first.latency_batch_size:,} (× faster)",
                         lambda m: human_seconds(m.latency_batch_s) + ratio(first.latency_batch_s, m.latency_batch_s,
                                                                              m)))
    if len(models) > 1:
        rows.append((f"{accuracy_name} Δ vs first", lambda m: f"{m.accuracy - first.accuracy:+.4f}"))
    return rows


def column_names(models: list) -> list[str]:
    """One column per model: its folder or file name, or the whole spec when two names would be the same."""
    names = [Path(m.model).name or m.model for m in models]
    return [m.model for m in models] if len(set(names)) < len(names) else names


def render_eval(r: EvalReport | LMEvalReport) -> Table:
    if isinstance(r, LMEvalReport):
        return render_lm_eval(r)
    fmt = [("errors", lambda m: f"{m.errors:,}"), ("accuracy", lambda m: f"{m.accuracy:.4f}"),
           ("macro F1", lambda m: f"{m.f1_macro:.4f}"), ("macro precision", lambda m: f"{m.precision_macro:.4f}"),
           ("macro recall", lambda m: f"{m.recall_macro:.4f}"), ("NLL", lambda m: f"{m.nll:.4f}"),
           ("ECE", lambda m: f"{m.ece:.4f}")]
    biased = [m for m in r.models if getattr(m, "class_bias", None)]
    if biased:  # --class-bias: the corrected numbers above, what changed below the errors row
        classes = sorted({int(c) for m in biased for c in m.class_bias}, key=int)
        rows = [("class bias", lambda m: ", ".join(f"{c}: {b:+.2f}" for c, b in (m.class_bias or {}).items())),
                ("errors before bias", lambda m: f"{m.before_bias['errors']:,}" if m.before_bias else "")]
        for c in classes:
            rows.append((f"errors on class {c} (of {r.class_counts[c]:,})",
                         lambda m, c=c: f"{m.before_bias['per_class_errors'][c]} → {m.per_class_errors[c]}"
                         if m.before_bias else f"{m.per_class_errors[c]}"))
        fmt[1:1] = rows
    fmt += teacher_and_size_rows(r, "agreement w/ teacher", "accuracy",
                                 ("samples/s", lambda m: f"{m.samples_per_second:,.0f}"))
    return metric_table(f"eval on {r.data} ({r.models[0].num_samples:,} rows)", r.models, fmt)


def teacher_and_size_rows(r: EvalReport | LMEvalReport, agreement: str, accuracy_name: str, speed: tuple) -> list:
    """The rows both eval tables end with: agreement and KL to the teacher (with a cache), then parameters, the
    compression rows, weights in memory and the ``speed`` row."""
    rows = []
    if r.cache:
        rows += [(agreement, lambda m: f"{m.agreement:.4f}"),
                 (f"KL(teacher‖model) T={r.temperature:g}", lambda m: kl_text(m.kl_to_teacher))]
    return rows + [("parameters", lambda m: f"{m.num_parameters:,}"), *compression_rows(r.models, accuracy_name),
                   ("weights in memory", lambda m: human_bytes(m.weight_bytes)), speed]


def metric_table(title: str, models: list, rows: list) -> Table:
    """One column per model, one row per (name, format) pair."""
    t = Table(title=title, title_justify="left")
    t.add_column("metric", style="bold")
    for name in column_names(models):
        t.add_column(name, justify="right", overflow="fold")
    for name, f in rows:
        t.add_row(name, *[f(m) for m in models])
    return t


def show(table: Table) -> None:
    out_console.print(table)


def render_verify(r) -> Table:
    """``kdcli cache verify``: one row per shard, its problems (if any) in the status column."""
    t = Table(title=f"cache verify {r.cache_dir}: {'ok' if r.ok else 'FAILED'} ({r.kind}, mode {r.mode}, "
                    f"{r.rows_verified:,}/{r.num_rows:,} rows verified, {'complete' if r.complete else 'INCOMPLETE'})",
              title_justify="left")
    for name, justify in (("shard", "left"), ("rows", "right"), ("bytes", "right"), ("sha256", "center"),
                          ("status", "left")):
        t.add_column(name, justify=justify, overflow="fold")
    for s in r.shards:
        sha = {True: "ok", False: "MISMATCH", None: "-"}[s.sha256_ok]
        t.add_row(s.name, f"{s.row_start:,}..{s.row_stop:,}", f"{s.bytes:,}", sha,
                  "ok" if s.ok else "; ".join(s.problems))
    if not r.shards:
        t.add_row("(none)", "", "", "", "the manifest lists no shards")
    return t


def render_lm_eval(r: LMEvalReport) -> Table:
    fmt = [("perplexity", lambda m: f"{m.perplexity:.3f}"), ("NLL / token", lambda m: f"{m.nll:.4f}"),
           ("next-token accuracy", lambda m: f"{m.accuracy:.4f}")]
    fmt += teacher_and_size_rows(r, "top-1 agreement w/ teacher", "next-token accuracy",
                                 ("tokens/s (forward)", lambda m: f"{m.tokens_per_second:,.0f}"))
    t = metric_table(f"eval on {r.data} ({r.num_sequences:,} sequences, {r.num_tokens:,} predicted tokens)",
                     r.models, fmt)
    if r.teacher:
        t.caption = (f"teacher (from the cache, {r.teacher['mode']}): {r.teacher['spec']}, "
                     f"{r.teacher['num_parameters']:,} parameters, perplexity {r.teacher['perplexity']:.3f}")
    return t
