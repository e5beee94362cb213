"""Tasks: what differs between classification and token-level language modelling, behind one interface.

- :mod:`kdcli.tasks.base`     -- the interface (:class:`Task`, :class:`CacheJob`, :class:`TrainJob`,
  :class:`EvalJob`) and what the jobs share (cache modes and layout, fused teachers, size and speed)
- :mod:`kdcli.tasks.reports`  -- the summaries and eval rows every task returns, each building its own table
- :mod:`kdcli.tasks.classify` -- classification: tensors + integer labels, one cached row per (sample, view)
- :mod:`kdcli.tasks.lm`       -- language models: token sequences, one cached entry per predicted token
- :mod:`kdcli.tasks.lm_xtok`  -- the same task with a student (eval model) of another tokenizer (--cross-tokenizer)

:func:`pick_task` is the one place that decides which task a run is.
"""

from __future__ import annotations

from pathlib import Path

from kdcli.data import split_slice
from kdcli.infra.errors import UsageError
from kdcli.lm import is_text_spec
from kdcli.tasks.base import CacheJob, EvalJob, Task, TrainJob
from kdcli.tasks.reports import CacheSummary, EvalReport, TrainSummary

__all__ = [
    "CacheJob",
    "CacheSummary",
    "EvalJob",
    "EvalReport",
    "Task",
    "TrainJob",
    "TrainSummary",
    "is_text_spec",
    "pick_task",
]


def pick_task(data_spec: str | None, generate: bool = False) -> Task:
    """The task a DATA spec belongs to: text (:func:`kdcli.lm.is_text_spec`) -> language modelling, anything else
    -> classification. ``generate`` (``cache-teacher --generate``): the language-model task whose cache job has the
    teacher answer the rows (:mod:`kdcli.tasks.generate`)."""
    if is_text_spec(data_spec):
        if generate:
            from kdcli.tasks.generate import GenerateTask

            return GenerateTask()
        from kdcli.tasks.lm_xtok import CrossTokenTask  # the LM task, with --cross-tokenizer

        return CrossTokenTask()
    base = Path(split_slice(str(data_spec or ""))[0])
    if base.is_dir():  # no DATA is a plain directory: say what one must hold, before any model is loaded
        raise UsageError(
            f"DATA {data_spec} is a directory without .parquet files or a saved dataset (state.json + "
            "dataset_info.json); give a .jsonl / .parquet file, a directory of .parquet files, a "
            "datasets.save_to_disk directory, or classification data (mnist:train, file.npz, file.h5)"
        )
    from kdcli.tasks.classify import ClassifyTask

    return ClassifyTask()
