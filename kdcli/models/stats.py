"""Size and speed of a model, for ``kdcli compress`` and the compression report of ``kdcli eval``.

- :func:`nonzero_parameters`: parameters that are not exactly zero (int8-quantised weights included)
- :func:`bytes_on_disk`: the bytes a model occupies as files (a run dir's model files, an HF dir, a file)
- :func:`latency_per_row`: median seconds per row of a forward pass at several batch sizes, after warm-up
- :func:`latency_timings`: the timed forwards themselves (seconds per row), :func:`spread` their relative spread
- :func:`torch_threads`: run a block with a given number of torch intra-op threads
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli.models.quant import QuantLinear

# What a kdcli run dir needs to rebuild its model (training leftovers such as checkpoint.pt, metrics.jsonl,
# config.yaml are not the model). Names are those of kdcli/models/classifiers.py and kdcli/lm/text.py.
RUN_MODEL_FILES = ("model.json", "model.safetensors", "model_source.py")
RUN_MODEL_DIRS = ("tokenizer",)
RUN_LEFTOVERS = (
    "checkpoint.pt",
    "metrics.jsonl",
    "summary.json",
    "config.yaml",
    "compress.yaml",
    ".lock",
    ".hf-staging",
)  # in a run dir, not part of the model


def nonzero_parameters(model: nn.Module) -> int:
    """Entries of the parameters (tied tensors once) and of QuantLinear's int8 weights that are not zero."""
    n = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return n + sum(int(torch.count_nonzero(m.weight_int8)) for m in model.modules() if isinstance(m, QuantLinear))


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bytes_on_disk(path: str | Path) -> int:
    """Bytes of the files a model is made of.

    A kdcli run dir (``model.json``): every file but training leftovers (checkpoint, metrics, summary, configs,
    unfinished ``*.partial`` files): model.json + model.safetensors (+ model_source.py, tokenizer/) in kdcli's
    layout; config.json, the weights (all shards) and the tokenizer files of a Hugging Face run dir; the adapter
    of a peft run. Any other directory (e.g. a Hugging Face model dir): every file under it. A file (``.gguf``,
    ``.safetensors``): its size.
    """
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise FileNotFoundError(f"no model at {p}")
    if (p / RUN_MODEL_FILES[0]).is_file():
        return sum(
            f.stat().st_size
            for f in p.rglob("*")
            if f.is_file() and f.relative_to(p).parts[0] not in RUN_LEFTOVERS and not f.name.endswith(".partial")
        )
    return _tree_bytes(p)


def _rows(example: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows from ``example``, tiled when it has fewer."""
    reps = -(-n // example.shape[0])
    return (example.repeat(reps, *([1] * (example.dim() - 1))) if reps > 1 else example)[:n]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave them as they are), then restore them."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def spread(times: list[float]) -> float:
    """The relative spread of repeated timings: interquartile range / median (0.0 for fewer than 3 timings).
    Quiet cores give a few percent; a busy machine (descheduled threads) tens of percent or more."""
    if len(times) < 3:
        return 0.0
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / med if med > 0 else 0.0


def _device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in model.parameters()), None) or next(
        (t.device for t in model.buffers()), torch.device("cpu")
    )


@torch.inference_mode()
def latency_timings(
    model: nn.Module,
    example_batch: torch.Tensor,
    batch_size: int,
    *,
    repeats: int,
    warmup: int,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> list[float]:
    """Seconds per row of each of ``repeats`` timed forwards at ``batch_size`` after ``warmup`` untimed ones (rows,
    device and eval mode as in :func:`latency_per_row`)."""
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("latency_per_row needs repeats >= 1, warmup >= 0 and batch sizes >= 1")
    forward = forward or (lambda m, x: m(x))
    device = _device_of(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    try:
        x = _rows(example_batch, batch_size).to(device)
        for _ in range(warmup):
            forward(model, x)
        sync()
        times: list[float] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward(model, x)
            sync()
            times.append((time.perf_counter() - t0) / batch_size)
    finally:
        model.train(was_training)
    return times


def latency_per_row(
    model: nn.Module,
    example_batch: torch.Tensor,
    batch_sizes: tuple[int, ...] = (1, 256),
    *,
    repeats: int = 20,
    warmup: int = 3,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> dict[int, float]:
    """{batch size: median seconds per row} of ``forward(model, batch)`` (default ``model(batch)``).

    Rows come from ``example_batch`` (tiled when it has fewer rows than a batch size), on the model's device; the
    model runs in eval mode under ``inference_mode``. Each batch size runs ``warmup`` untimed forwards, then
    ``repeats`` timed ones; the median of the timed forwards,
    divided by the batch size, is reported. On CUDA each timing waits for the device (synchronize). For a language
    model pass (b, L) token ids and ``forward=lambda m, ids: lm_logits(m, ids)``: a row is then a sequence.
    """
    if not batch_sizes:
        raise ValueError("latency_per_row needs repeats >= 1, warmup >= 0 and batch sizes >= 1")
    return {
        bs: statistics.median(
            latency_timings(model, example_batch, bs, repeats=repeats, warmup=warmup, forward=forward)
        )
        for bs in batch_sizes
    }
