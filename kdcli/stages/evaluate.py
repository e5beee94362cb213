"""evaluate(cfg): models + data (+ cache) -> metrics against the labels and against the cached teacher.

The one eval for every task: the task (:mod:`kdcli.tasks`) measures each ``--model`` (accuracy, F1, NLL, ECE for
classifiers; perplexity and next-token accuracy for language models) and, with ``--cache``, its agreement and KL
with the teacher read from the cache, which must match the data (fingerprint and per-row hashes): the teacher is
never re-run. The gates (``--min-accuracy``, ``--min-agreement``) are checked here, the same way for every task.
"""

from __future__ import annotations

import os

from kdcli.config import EvalConfig, check_task_options
from kdcli.infra import log
from kdcli.infra.errors import UsageError
from kdcli.infra.precision import resolve_device
from kdcli.models.plugins import check_model_spec
from kdcli.models.stats import torch_threads
from kdcli.tasks import EvalReport, pick_task
from kdcli.tasks.base import check_cache_use, open_teacher

__all__ = ["evaluate", "threshold_failures"]


def threshold_failures(reports: list, cfg: EvalConfig, accuracy_name: str = "accuracy") -> list[str]:
    """One line per ``--min-accuracy`` / ``--min-agreement`` a model misses (any line makes eval exit 1)."""
    failures = []
    for r in reports:
        if cfg.min_accuracy is not None and r.accuracy < cfg.min_accuracy:
            failures.append(f"{r.model}: {accuracy_name} {r.accuracy:.4f} < --min-accuracy {cfg.min_accuracy:g}")
        if cfg.min_agreement is not None and r.agreement < cfg.min_agreement:
            failures.append(f"{r.model}: agreement {r.agreement:.4f} < --min-agreement {cfg.min_agreement:g}")
    return failures


def evaluate(cfg: EvalConfig) -> EvalReport:
    task = pick_task(cfg.data)
    check_task_options(cfg, task.name, cfg.data)  # an option this task would ignore: refused
    for spec in cfg.model:
        check_model_spec(spec, "--model", task.builtin_models)
    device = resolve_device(cfg.device)
    reader = open_teacher(task, cfg)  # one cache, or the fused teacher of several
    if reader is not None:
        check_cache_use(reader, cfg.temperature, cfg.approximate_temperature, evaluating=True)
    if cfg.min_agreement is not None and reader is None:
        raise UsageError("--min-agreement needs --cache (the teacher's outputs)")
    with torch_threads(cfg.threads):
        job = task.eval_job(cfg, device, reader)  # the data (and the teacher's targets) once
        with log.Progress(len(cfg.model) * job.num_rows, "eval", unit=job.unit) as job.progress:
            models = [job.measure(spec) for spec in cfg.model]  # every model measured the same way
    report = job.report(models)
    report.failures = threshold_failures(report.models, cfg, task.accuracy_name)
    warn_if_busy(report.models)
    return report


BUSY_SPREAD = 0.25  # latency timings whose interquartile range exceeds a quarter of their median: a busy machine


def warn_if_busy(models: list) -> None:
    """One warning line when the latency timings of some model spread too far to be trusted (busy cores)."""
    spreads = [
        (s, m.model)
        for m in models
        for s in (getattr(m, "latency_batch1_spread", None), getattr(m, "latency_batch_spread", None))
        if s is not None
    ]
    if not spreads:
        return
    worst, model = max(spreads)
    if worst > BUSY_SPREAD:
        load = (
            f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)" if hasattr(os, "getloadavg") else ""
        )
        log.warn(
            f"latency timings of {model} spread by {worst:.0%} of their median{load}: the machine is busy and the "
            "latency rows are noisy; rerun on quiet cores, with more --latency-repeats, or with --threads 1"
        )
