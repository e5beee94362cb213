"""The task interface: what the one cache pass, the one training loop and the one eval ask of a task.

A *task* (classification, token-level language modelling) knows its data, its models and its metrics; the stages
(:mod:`kdcli.stages.cache`, :mod:`kdcli.stages.train`, :mod:`kdcli.stages.evaluate`) own everything else: directories,
locks, shards, the rank split, checkpoints, resume, DDP, device-side metric sums, crash points. Each stage asks the task
for one
*job* object built from its config:

- :class:`CacheJob`  -- the teacher, the manifest plan, and ``forward(rows) -> rows to cache``
- :class:`TrainJob`  -- the student, the cache reader, and ``step(batch) -> loss parts``, held-out metrics, saving
- :meth:`Task.evaluate` -- one report for the models named on the command line

:func:`kdcli.tasks.pick_task` chooses the task from the DATA spec; nothing else does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcli.cache.fused import FusedReader, open_fused
from kdcli.cache.manifest import stored_temperatures
from kdcli.cache.modes import DEFAULT, IMPLIED, check_temperature, get_mode, modes
from kdcli.cache.modes.base import Mode
from kdcli.cache.reader import CacheReader
from kdcli.config import CacheConfig, EvalConfig, TrainConfig, given, parse_temperatures
from kdcli.infra import log
from kdcli.infra.errors import UsageError
from kdcli.losses import LossParts
from kdcli.models.stats import bytes_on_disk, latency_timings, nonzero_parameters, spread, torch_threads
from kdcli.tasks.reports import CacheSummary, EvalReport, ModelRow, TrainSummary

LATENCY_WARMUP = 1  # untimed forwards at batch 1 before the timed ones (eval --latency-repeats)


def size_and_speed(
    model: nn.Module,
    path: str | None,
    example: torch.Tensor,
    batch_size: int,
    repeats: int,
    forward=None,
    pass_times: list[float] = (),
    warm: bool = False,
) -> dict:
    """The compression report's fields of one eval model (:class:`~kdcli.tasks.reports.SizeAndSpeed`).

    ``path``: the files the model was loaded from (a run dir, an HF dir, a .gguf or weights file), or None for a
    model built from a name (no files: bytes_on_disk is None). Latency per row, the median and the relative spread
    (:func:`~kdcli.models.stats.spread`) of timed forwards on rows of ``example`` (the eval data's first batch):

    - at batch 1: ``repeats`` timed forwards after ``LATENCY_WARMUP`` untimed ones, with ONE torch thread on a CPU
      (a batch-1 forward is too small to share; with a pool, one descheduled thread on a busy machine costs a
      scheduler slice, milliseconds, and the figure measures the machine's load instead of the model);
    - at ``batch_size``, with the threads the eval runs with (``latency_threads``): ``pass_times`` (seconds of the
      eval pass's own forwards at that many rows, its first forward left out as the warm-up), topped up to
      ``repeats`` timings with forwards on ``example``; ``warm``: the eval pass has just run this model at this
      batch size (no warm-up forward needed). Large eval sets thus cost no extra forward, small ones ``repeats``.

    ``repeats`` 0 skips the measurement (the latency fields are then None).
    """
    out = {
        "nonzero_parameters": nonzero_parameters(model),
        "bytes_on_disk": bytes_on_disk(path) if path is not None and Path(path).exists() else None,
        "latency_batch_size": batch_size,
        "latency_batch1_s": None,
        "latency_batch_s": None,
    }
    if repeats > 0:
        on_cpu = next((p.device.type for p in model.parameters()), "cpu") == "cpu"
        with torch_threads(1 if on_cpu else None):
            one = latency_timings(model, example, 1, repeats=repeats, warmup=LATENCY_WARMUP, forward=forward)
        per_row = [t / batch_size for t in pass_times]
        while len(per_row) < repeats:
            per_row += latency_timings(
                model,
                example,
                batch_size,
                repeats=1,
                forward=forward,
                warmup=0 if warm or per_row else LATENCY_WARMUP,
            )
        out.update(
            latency_batch1_s=float(np.median(one)),
            latency_batch_s=float(np.median(per_row)),
            latency_batch1_spread=spread(one),
            latency_batch_spread=spread(per_row),
            latency_threads=torch.get_num_threads() if on_cpu else None,
        )
    return out


def cache_mode(cfg) -> Mode:
    """``cache-teacher``'s mode (``--mode``, else topk with ``--top-k``, else full), refusing an option the mode would
    ignore (exit 2): ``--top-k`` or ``--samples`` where the mode has no use for it, ``--temperatures`` with a mode
    that is exact at every T."""
    mode = get_mode(cfg.mode or (IMPLIED["top_k"] if cfg.top_k else DEFAULT))
    if mode.size_option and not getattr(cfg, mode.size_option):
        raise UsageError(f"--mode {mode.name} needs --{mode.size_option.replace('_', '-')} K")
    for option in ("top_k", "samples"):
        if option != mode.size_option and (option in given(cfg) if option == "samples" else getattr(cfg, option)):
            flag = "--" + option.replace("_", "-")
            users = [m.name for m in modes() if m.size_option == option]
            raise UsageError(
                f"{flag} applies to --mode {' and '.join(users)}; a {mode.name} cache would ignore it"
                + (": drop one of them" if option == "top_k" else "")
            )
    if "temperatures" in given(cfg) and not mode.sparse:
        raise UsageError(
            f"--temperatures lists what a sparse cache stores per temperature; a {mode.name} cache "
            "is exact at every T and would ignore it"
        )
    return mode


def cache_layout(cfg, mode: Mode, width: int, token: bool) -> tuple[int | None, tuple[float, ...] | None, dict, dict]:
    """For ``cache-teacher``: (K, the temperatures a sparse cache stores statistics for, the manifest layout keys of
    the mode, the settings entries that make them part of the cache's identity). K is checked against ``width``
    (classes, or vocabulary entries); a mode exact at every T records no temperatures (its manifests stay as they
    were)."""
    k = mode.size(cfg)
    if k is not None:
        mode.check_size(k, width, "vocabulary entries" if token else "classes")
    layout = {"mode": mode.name, **mode.layout(k, width, token)}
    if not mode.sparse:
        return k, None, {**layout, **mode.temperature_layout(None)}, {}
    temps = parse_temperatures(cfg.temperatures)
    return k, temps, {**layout, **mode.temperature_layout(temps)}, {"temperatures": list(temps)}


def check_cache_use(
    reader: CacheReader, temperature: float, approximate: bool, evaluating: bool = False, divergence: str = "forward"
) -> None:
    """Refuse (exit 2, naming the stored temperatures) a sparse cache at a T it cannot serve exactly/unbiased,
    unless the documented approximation was asked for; and what a sparse fused teacher cannot serve
    (:meth:`FusedReader.check_use`, a divergence a mixture cannot train with). Called before anything is written."""
    reader.check_divergence(divergence)
    if isinstance(reader, FusedReader):
        reader.check_use(temperature, approximate, evaluating)
    stored = stored_temperatures(reader.manifest)["temperatures"]
    try:
        check_temperature(reader.mode, stored, temperature, approximate)
    except UsageError as e:
        raise UsageError(f"cache {reader.dir}: {e}") from None


def open_teacher(task: Task, cfg) -> CacheReader | None:
    """The teacher of ``train-student`` / ``eval``: None without ``--cache``, the cache given once, or the fused
    teacher of several (:mod:`kdcli.cache.fused`: refused, exit 3 naming the first difference, unless they cover
    the same data, classes/vocabulary, tokenizer and rows)."""
    if len(cfg.cache) < 2:
        if cfg.cache_weights:
            raise UsageError(f"--cache-weights weights several --cache values; {len(cfg.cache) or 'none'} was given")
        if "combine" in given(cfg):
            raise UsageError("--combine fuses several --cache values; one was given: drop --combine")
    if not cfg.cache:
        return None
    seen: dict[Path, str] = {}
    for c in cfg.cache:
        key = Path(c).resolve()
        if key in seen:
            raise UsageError(
                f"--cache {c} is given twice (as {seen[key]!r} too): a teacher fused with itself is that "
                "teacher; give each cache once"
            )
        seen[key] = c
    return open_fused([task.open_cache(c) for c in cfg.cache], cfg.cache_weights, cfg.combine)


def cache_label(cfg) -> str | list[str] | None:
    """What eval reports as its cache: the directory, or the list of fused ones."""
    if not cfg.cache:
        return None
    return cfg.cache[0] if len(cfg.cache) == 1 else list(cfg.cache)


class CacheJob(ABC):
    """One ``cache-teacher`` run of one task: built (data and teacher loaded, settings checked) by
    :meth:`Task.cache_job`; driven by :func:`kdcli.stages.cache.cache_teacher`."""

    model: nn.Module
    info: Any  # ModelInfo / LMInfo: ``num_parameters`` and ``identity()``
    plan: dict  # the manifest this run writes (complete: false, no shards)
    num_rows: int
    shard_size: int
    batch_size: int  # rows per teacher pass; batches never cross a shard
    token_keys: frozenset[str] = frozenset()  # arrays stored per token (flattened), not per row
    unit: str = "rows"  # what the progress line counts
    sampled: bool = False  # forward() draws (sample, priority): seeded per batch from (seed, first row)
    placed: bool = False  # the model is placed already (accelerate's device map): the pass never moves it

    @abstractmethod
    def units(self, start: int, stop: int) -> int:
        """Progress units in rows ``[start, stop)`` (rows, or predicted tokens)."""

    @abstractmethod
    def describe(self) -> str:
        """The log line saying what is cached."""

    @abstractmethod
    def forward(
        self, start: int, stop: int, device: torch.device, generator: torch.Generator | None
    ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """Rows ``[start, stop)`` through the teacher: (host arrays per row: ``row_index``, ``sample_index``,
        ``row_hash``, ...; reduced tensors still on the device, with ``nonfinite`` (rows,) bool). Nothing here may
        wait for the device: the pass copies the reduced tensors back while the next batch runs."""

    @abstractmethod
    def storage(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Reduced host arrays -> the dtypes the shards store."""

    @abstractmethod
    def nonfinite_message(self, row: int) -> str:
        """The error for NaN/inf teacher output at global row ``row``."""

    @abstractmethod
    def summary(self, base: CacheSummary, manifest: dict, computed_units: int) -> CacheSummary:
        """The stage's summary: ``base`` with this task's extra fields."""

    def files(self) -> dict[str, bytes]:
        """Files the cache holds beside its shards (name -> content; named and checksummed in the plan), written
        before any shard: a token cache's teacher vocabulary (kdcli.lm.xtok)."""
        return {}

    def complete(self, work: Path, manifest: dict) -> None:
        """Rank 0, every shard whole, before ``complete: true`` is written: write what the cache holds beside its
        shards and record it in ``manifest`` (``cache-teacher --generate``: the answers file). Nothing by default."""
        return None


class TrainJob(ABC):
    """One ``train-student`` run of one task: built by :meth:`Task.train_job`; driven by
    :func:`kdcli.stages.train.train_student`, which owns the loop, checkpoints, resume, DDP and the run dir."""

    model: nn.Module
    info: Any
    reader: CacheReader | None
    num_samples: int  # rows of the data set (the validation split draws from these)
    views: int = 1  # cache rows per sample (augmented views)
    unit: str = "rows"  # what the loss is averaged over and metrics count: "rows" or "tokens"
    # The epoch's batches are the cache's rows (CacheLoader), or, False, shuffled rows of the data that the job reads
    # its teacher targets for itself (a cross-tokenizer student: its rows are not the cache's)
    batches_from_cache: bool = True
    soft_term: str | None = None  # the soft term's formula in the printed loss, where it is not the divergence's

    @abstractmethod
    def build_student(self) -> None:
        """Build ``self.model`` and ``self.info`` (the stage has seeded torch's RNG just before)."""

    @abstractmethod
    def describe(self, train_samples: np.ndarray, n_val: int) -> str:
        """The log line naming the student and what it trains on."""

    @abstractmethod
    def step(
        self, net: nn.Module, batch: dict[str, np.ndarray], device: torch.device, global_step: int
    ) -> tuple[LossParts, torch.Tensor, int]:
        """One batch: (loss parts, correct predictions as a device tensor, units in the batch). ``net`` is the
        model as trained (DDP-wrapped under torchrun): every forward pass goes through it."""

    @abstractmethod
    def heldout_metrics(self, model: nn.Module, val_idx: np.ndarray, device: torch.device) -> dict:
        """Validation metrics (``val_*``) on the held-out samples, and ``eval_*`` on ``--eval-data``."""

    # the per-epoch log line's task part: (label, metrics.jsonl key, format) of what it shows when the record has it
    epoch_fields: tuple[tuple[str, str, str], ...] = ()

    def epoch_message(self, record: dict) -> str:
        """The per-epoch log line's task part (accuracy, perplexity, throughput), from :attr:`epoch_fields`."""
        return ", ".join(
            f"{label} {fmt.format(record[key])}".lstrip() for label, key, fmt in self.epoch_fields if key in record
        )

    @abstractmethod
    def save(self, out: Path, model: nn.Module) -> None:
        """Write the student into the run dir so that ``eval`` rebuilds it with no other flags."""

    @abstractmethod
    def summary(self, base: TrainSummary, last: dict, train_units: int) -> TrainSummary:
        """The stage's summary: ``base`` with this task's extra fields."""

    def forward_module(self, model: nn.Module) -> nn.Module:
        """What a DDP wrapper wraps (its forward is what :meth:`step` calls through ``net``): ``model`` itself by
        default; the LM task wraps it so one forward can return hidden states for the fused loss."""
        return model

    def train_units(self, train_samples: np.ndarray) -> int:
        """Units one epoch trains on (rows by default)."""
        return len(train_samples) * self.views


class EvalJob(ABC):
    """One ``eval`` run of one task: the data (and the teacher's targets from the cache) prepared once by
    :meth:`Task.eval_job`; :func:`kdcli.stages.evaluate.evaluate` measures every ``--model`` with :meth:`measure`
    and collects them with :meth:`report`. :meth:`measure` advances ``progress`` by the rows each of its eval
    batches covers (the stage sets it to a :class:`~kdcli.infra.log.Progress` over every model's rows)."""

    unit: str = "rows"  # what progress counts: rows, or sequences for a language model
    progress: log.Progress | None = None

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """Rows (sequences) of the eval data: one model's share of the progress."""

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    @abstractmethod
    def measure(self, spec: str) -> ModelRow:
        """One ``--model``: its metrics against the labels and (with a cache) the teacher, size and latency."""

    @abstractmethod
    def report(self, models: list) -> EvalReport:
        """The eval report of the measured models (``failures`` empty: the stage checks the gates)."""


class Task(ABC):
    """What differs between tasks. Implementations: :mod:`kdcli.tasks.classify`, :mod:`kdcli.tasks.lm`."""

    name: str  # kdcli.config.CLASSIFICATION or LANGUAGE_MODEL: the options a field declares for it
    builtin_models: tuple[str, ...] = ()  # MODEL names built in for this task (any other MODEL is a path)
    accuracy_name: str = "accuracy"  # what --min-accuracy checks

    @abstractmethod
    def cache_job(self, cfg: CacheConfig) -> CacheJob:
        """Check the options, load data and teacher, plan the manifest."""

    @abstractmethod
    def open_cache(self, cache_dir: str) -> CacheReader:
        """A reader for a cache of this task (a cache of another task is refused, exit 3)."""

    @abstractmethod
    def train_job(self, cfg: TrainConfig, alpha: float, reader: CacheReader | None) -> TrainJob:
        """Check the options and load the data (the cache, if any, is already open); the student comes later."""

    @abstractmethod
    def eval_job(self, cfg: EvalConfig, device: torch.device, reader: CacheReader | None) -> EvalJob:
        """Load the eval data (and the teacher's targets) once, checked against the cache."""
