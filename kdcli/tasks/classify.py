"""Classification: one row = one (sample, view) of an input tensor with an integer label; one cached row per row.

Row ``r`` of a cache with ``views`` views over ``n`` samples is the pair (sample ``r % n``, view ``r // n``).
View 0 is the plain input; view ``v >= 1`` is ``augment.apply(x, params)`` with params drawn once from the seed
and stored in the shard (``aug_params``), so the student trains on exactly what the teacher saw.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdcli.augment import parse_augment
from kdcli.cache.manifest import new_manifest
from kdcli.cache.modes.base import Mode
from kdcli.cache.reader import CacheReader
from kdcli.cache.writer import resolve_compression
from kdcli.config import EvalConfig
from kdcli.data import LabelledData, load_data
from kdcli.infra import log
from kdcli.infra.errors import CacheError, UsageError
from kdcli.infra.fmt import TableData
from kdcli.infra.precision import precision_context
from kdcli.losses import kd_loss, soft_kl
from kdcli.models.classifiers import BUILTINS, build_model, is_run_dir, save_run_model
from kdcli.models.weights import MODEL_JSON, weight_bytes
from kdcli.tasks.base import CacheJob, EvalJob, Task, TrainJob, cache_label, cache_layout, cache_mode, size_and_speed
from kdcli.tasks.reports import CacheSummary, SizeAndSpeed, TrainSummary, metric_table, teacher_and_size_rows

ECE_BINS = 15
BIAS_GRID = torch.arange(-30.0, 30.0 + 1e-6, 0.05)  # candidate values for CLASS=fit


# -- cache pass ----------------------------------------------------------------------------------------------------


def teacher_num_classes(spec: str) -> int | None:
    """A run-dir teacher knows its width; other specs take it from the data."""
    if is_run_dir(spec):
        try:
            return int(json.loads((Path(spec) / MODEL_JSON).read_text())["num_classes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def augment_params(n: int, views: int, augment, seed: int) -> np.ndarray | None:
    """(n * views, P) float32 parameters, zeros for view 0; None when there are no augmented views."""
    if views == 1:
        return None
    g = torch.Generator().manual_seed(seed)
    params = torch.zeros((n * views, len(augment.param_names)), dtype=torch.float32)
    params[n:] = augment.sample(n * (views - 1), g)
    return params.numpy()


class ClassifyCacheJob(CacheJob):
    def __init__(self, cfg, mode: Mode):
        self.cfg, self.mode = cfg, mode
        self.augment = parse_augment(cfg.augment)
        if cfg.views > 1 and self.augment is None:
            raise UsageError("--views > 1 needs --augment (e.g. shift:2): views would be identical")
        if not is_run_dir(cfg.teacher) and not cfg.teacher_weights:
            raise UsageError(
                f"teacher {cfg.teacher!r} has no weights: pass --teacher-weights PATH, or a run "
                "directory made by `kdcli train-student`"
            )
        self.data = data = load_data(cfg.data, num_classes=teacher_num_classes(cfg.teacher))
        self.model, self.info = build_model(
            cfg.teacher,
            cfg.teacher_args,
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            weights=cfg.teacher_weights,
        )
        self.k, self.temperatures, mode_layout, temp_settings = cache_layout(cfg, mode, data.num_classes, token=False)
        self.num_rows = data.n * cfg.views
        self.shard_size, self.batch_size = cfg.shard_size, cfg.batch_size
        self.sampled = mode.sampled
        settings = {
            "mode": mode.name,
            "top_k": mode_layout["top_k"],
            "samples": mode_layout["samples"],
            "views": cfg.views,
            "augment": cfg.augment if cfg.views > 1 else None,
            "seed": cfg.seed if (cfg.views > 1 or self.sampled) else None,
            "shard_size": cfg.shard_size,
            "dtype": cfg.dtype,
            **temp_settings,
        }
        self.layout = layout = {
            "kind": "classification",
            "num_classes": data.num_classes,
            **mode_layout,
            "views": cfg.views,
            "augment": cfg.augment if cfg.views > 1 else None,
            "aug_param_names": list(self.augment.param_names) if (self.augment and cfg.views > 1) else [],
            "shard_size": cfg.shard_size,
            "compression": resolve_compression(cfg.compression, token=False, mode=mode.name),
        }
        self.plan = new_manifest(
            teacher=self.info.identity(), data=data.identity(), settings=settings, layout=layout, num_rows=self.num_rows
        )
        self.params = augment_params(data.n, cfg.views, self.augment, cfg.seed)

    def units(self, start: int, stop: int) -> int:
        return stop - start

    def describe(self) -> str:
        cfg = self.cfg
        return (
            f"caching teacher {cfg.teacher} ({self.info.num_parameters:,} parameters): {self.num_rows} rows "
            f"({self.data.n} samples x {cfg.views} view(s)), mode {self.mode.name}"
            + self.mode.describe(self.k, token=False)
        )

    def forward(self, start, stop, device, generator):
        data, n = self.data, self.data.n
        rows = np.arange(start, stop, dtype=np.int64)
        samples = rows % n
        s0 = start % n  # rows of one view are consecutive samples: a view of x, not a gathered copy
        x = data.x[s0 : s0 + len(rows)] if s0 + len(rows) <= n else data.x[samples]  # (b, *input_shape)
        if self.params is not None:
            x = self.augment.apply(x, torch.from_numpy(self.params[start:stop]))  # view 0: zero params, identity
        if device.type == "cuda":
            x = x.pin_memory()  # a pinned source makes the copy below truly asynchronous
        logits = self.model(x.to(device, non_blocking=True))  # (b, num_classes)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (b, num_classes) fp32
        reduced = self.mode.reduce(logp, self.k, generator, self.temperatures)
        reduced["nonfinite"] = ~torch.isfinite(logits).all(dim=1)  # (b,) checked on the host
        host = {"row_index": rows, "sample_index": samples.astype(np.int64), "row_hash": data.row_hash[samples]}
        if self.params is not None:
            host["aug_params"] = self.params[start:stop]
        return host, reduced

    def storage(self, arrays):
        return self.mode.storage(arrays, self.layout)

    def nonfinite_message(self, row: int) -> str:
        return f"teacher produced NaN/inf logits at row {row} (sample {row % self.data.n})"

    def summary(self, base: CacheSummary, manifest: dict, computed_units: int) -> CacheSummary:
        return base


# -- training ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 2048) -> torch.Tensor:
    """(n, C) float32 logits on the CPU, in eval mode."""
    was = model.training
    model.eval()
    outs = [model(x[a : a + batch_size].to(device)).float().cpu() for a in range(0, len(x), batch_size)]
    model.train(was)
    return torch.cat(outs)


def heldout_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, prefix: str) -> dict:
    logits = predict(model, x, device)
    nll = float(F.cross_entropy(logits, y))
    correct = int((logits.argmax(1) == y).sum())
    return {f"{prefix}_accuracy": correct / len(y), f"{prefix}_nll": nll, f"{prefix}_errors": len(y) - correct}


def check_row_hashes(batch: dict, data: LabelledData, reader: CacheReader) -> None:
    expect = data.row_hash[batch["sample_index"]]
    bad = np.flatnonzero(expect != batch["row_hash"])
    if len(bad):
        i = int(batch["sample_index"][bad[0]])
        raise CacheError(
            f"cache {reader.dir} row {int(batch['row_index'][bad[0]])} was made from different "
            f"content than data row {i}; the cache does not belong to this data"
        )


class ClassifyTrainJob(TrainJob):
    def __init__(self, cfg, alpha: float, reader: CacheReader | None):
        self.cfg, self.alpha, self.reader = cfg, alpha, reader
        self.data = data = load_data(cfg.data)  # its own label range first: a misfit is exit 3, not 2
        if reader is not None:
            reader.check_data(data.identity())
            data.num_classes = reader.num_classes  # the data's labels fit: the student outputs the cache's classes
            if cfg.augment:
                raise UsageError(
                    "--augment applies to label-only training; with --cache the student trains on the "
                    "cached views (build the cache with --views N --augment ...)"
                )
        self.augment = parse_augment(reader.manifest.get("augment") if reader else cfg.augment)
        self.views = reader.manifest["views"] if reader else 1
        self.num_samples = data.n
        self.eval_data = load_data(cfg.eval_data, num_classes=data.num_classes) if cfg.eval_data else None
        if self.eval_data is not None and self.eval_data.input_shape != data.input_shape:
            raise UsageError(
                f"--eval-data {cfg.eval_data} has input shape {self.eval_data.input_shape}, the "
                f"training data {data.input_shape}"
            )

    def build_student(self) -> None:
        cfg, data = self.cfg, self.data
        self.model, self.info = build_model(
            cfg.student, cfg.student_args, num_classes=data.num_classes, input_shape=data.input_shape
        )

    def describe(self, train_samples, n_val):
        return (
            f"student {self.cfg.student} ({self.info.num_parameters:,} parameters); "
            f"{len(train_samples) * self.views} training rows ({len(train_samples)} samples x {self.views} "
            f"view(s)), {n_val} validation samples"
        )

    def step(self, net, batch, device, global_step):
        cfg, data = self.cfg, self.data
        idx = torch.from_numpy(batch["sample_index"])
        x, y = data.x[idx], data.y[idx]  # (b, *input_shape), (b,)
        targets = None
        if self.reader is not None:
            check_row_hashes(batch, data, self.reader)
            targets = self.reader.targets(batch).to(device)
            if "aug_params" in batch:
                x = self.augment.apply(x, torch.from_numpy(batch["aug_params"]))
        elif self.augment is not None:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + global_step)
            x = self.augment.apply(x, self.augment.sample(len(x), g))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision_context(cfg.precision, device):
            logits = net(x)  # (b, C)
        parts = kd_loss(
            logits.float(),
            targets,
            y,
            temperature=cfg.temperature,
            alpha=self.alpha,
            divergence=cfg.divergence,
            beta=cfg.jsd_beta,
            approximate=cfg.approximate_temperature,
        )
        return parts, (logits.detach().argmax(dim=1) == y).sum(), len(y)

    epoch_fields = (
        ("train acc", "train_accuracy", "{:.4f}"),
        ("val acc", "val_accuracy", "{:.4f}"),
        ("eval acc", "eval_accuracy", "{:.4f}"),
        ("", "seconds", "{:.1f}s"),
    )

    def heldout_metrics(self, model, val_idx, device):
        out = {}
        if len(val_idx):
            out.update(heldout_metrics(model, self.data.x[val_idx], self.data.y[val_idx], device, "val"))
        if self.eval_data is not None:
            out.update(heldout_metrics(model, self.eval_data.x, self.eval_data.y, device, "eval"))
        return out

    def save(self, out, model):
        save_run_model(out, model, self.info)

    def summary(self, base: TrainSummary, last: dict, train_units: int) -> TrainSummary:
        return base


# -- eval ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelReport(SizeAndSpeed):
    model: str
    num_samples: int
    accuracy: float
    errors: int
    precision_macro: float
    recall_macro: float
    f1_macro: float
    nll: float
    ece: float
    agreement: float | None
    kl_to_teacher: float | None
    num_parameters: int
    weight_bytes: int
    samples_per_second: float
    reliability: list[dict] = field(default_factory=list)  # per confidence bin: count, confidence, accuracy
    per_class_errors: list[int] = field(default_factory=list)  # misclassified rows of each true class
    class_bias: dict[str, float] | None = None  # --class-bias as applied to the logits (fitted values resolved)
    before_bias: dict | None = None  # errors, accuracy, nll, per_class_errors without the class bias


@dataclass
class EvalReport:
    data: str
    cache: str | list[str] | None  # the cache, or the fused caches
    temperature: float
    models: list[ModelReport]
    failures: list[str]
    class_counts: list[int] = field(default_factory=list)  # rows of each class in the data
    bias_data: str | None = None  # where CLASS=fit biases were chosen

    def table(self) -> TableData:
        fmt = [
            ("errors", lambda m: f"{m.errors:,}"),
            ("accuracy", lambda m: f"{m.accuracy:.4f}"),
            ("macro F1", lambda m: f"{m.f1_macro:.4f}"),
            ("macro precision", lambda m: f"{m.precision_macro:.4f}"),
            ("macro recall", lambda m: f"{m.recall_macro:.4f}"),
            ("NLL", lambda m: f"{m.nll:.4f}"),
            ("ECE", lambda m: f"{m.ece:.4f}"),
        ]
        biased = [m for m in self.models if m.class_bias]
        if biased:  # --class-bias: the corrected numbers above, what changed below the errors row
            classes = sorted({int(c) for m in biased for c in m.class_bias}, key=int)
            rows = [
                ("class bias", lambda m: ", ".join(f"{c}: {b:+.2f}" for c, b in (m.class_bias or {}).items())),
                ("errors before bias", lambda m: f"{m.before_bias['errors']:,}" if m.before_bias else ""),
            ]
            for c in classes:
                rows.append(
                    (
                        f"errors on class {c} (of {self.class_counts[c]:,})",
                        lambda m, c=c: (
                            f"{m.before_bias['per_class_errors'][c]} → {m.per_class_errors[c]}"
                            if m.before_bias
                            else f"{m.per_class_errors[c]}"
                        ),
                    )
                )
            fmt[1:1] = rows
        fmt += teacher_and_size_rows(
            self.cache,
            self.temperature,
            self.models,
            "agreement w/ teacher",
            "accuracy",
            ("samples/s", lambda m: f"{m.samples_per_second:,.0f}"),
        )
        return metric_table(f"eval on {self.data} ({self.models[0].num_samples:,} rows)", self.models, fmt)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1 (over classes present in labels or predictions), NLL, ECE."""
    pred = logits.argmax(1)
    correct = pred == y
    cm = torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    present = (support + predicted) > 0
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), torch.zeros_like(tp)
    )
    probs = logits.softmax(1)
    conf = probs.max(1).values
    bins = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    ece = 0.0
    reliability = []
    for b in range(ECE_BINS):
        m = bins == b
        cnt = int(m.sum())
        if cnt:
            c, a = float(conf[m].mean()), float(correct[m].float().mean())
            ece += cnt / len(y) * abs(a - c)
            reliability.append({"bin": b, "count": cnt, "confidence": c, "accuracy": a})
    return {
        "accuracy": float(correct.float().mean()),
        "errors": int((~correct).sum()),
        "per_class_errors": (cm.sum(1) - cm.diag()).tolist(),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "nll": float(F.cross_entropy(logits, y)),
        "ece": ece,
        "reliability": reliability,
    }


def parse_class_bias(spec: dict, num_classes: int) -> dict[int, float | str]:
    """``{"3": 3.5, "5": "fit"}`` -> ``{3: 3.5, 5: "fit"}``, checked against the number of classes."""
    out: dict[int, float | str] = {}
    for key, value in spec.items():
        try:
            c = int(str(key))
        except ValueError:
            c = -1
        if not 0 <= c < num_classes:
            raise UsageError(f"--class-bias {key}={value}: CLASS must be a class index 0..{num_classes - 1}")
        if value == "fit":
            out[c] = "fit"
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out[c] = float(value)
        else:
            raise UsageError(f"--class-bias {key}={value!r}: VALUE must be a number (e.g. 3.5) or 'fit'")
    return out


def apply_class_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """A copy of (n, C) logits with ``bias[c]`` added to column c."""
    out = logits.clone()
    for c, b in bias.items():
        out[:, c] += b
    return out


def fit_class_bias(logits: torch.Tensor, y: torch.Tensor, c: int, grid: torch.Tensor = BIAS_GRID) -> float:
    """The bias for class ``c`` with the fewest errors on (logits, y); ties go to the lowest NLL.

    Class c is predicted where ``logits[:, c] + b`` beats the best other logit, so every grid value is scored in
    one vectorised pass (Hinton et al. 2015, section 3, chose the 3s' bias this way: +3.5 on their test set).
    """
    if not bool((y == c).any()):
        raise UsageError(
            f"--class-bias {c}=fit: the fitting data has no rows of class {c}; pass --bias-data with "
            "labelled rows of that class"
        )
    own = logits[:, c]  # (n,)
    others = logits.clone()
    others[:, c] = float("-inf")
    best_other, other_pred = others.max(1)  # (n,)
    picks_c = own[None, :] + grid[:, None] > best_other[None, :]  # (g, n)
    correct = torch.where(picks_c, (y == c)[None, :], (other_pred == y)[None, :])
    errors = (~correct).sum(1)  # (g,)
    tied = torch.nonzero(errors == errors.min()).flatten()
    nll = [float(F.cross_entropy(apply_class_bias(logits, {c: float(grid[i])}), y)) for i in tied]
    return round(float(grid[tied[int(np.argmin(nll))]]), 4)


def load_eval_model(spec: str, num_classes: int | None, input_shape):
    """A run dir, or ``MODEL@WEIGHTS`` for a built-in/plugin model with a weights file."""
    weights = None
    if not is_run_dir(spec) and "@" in spec:
        spec, weights = spec.rsplit("@", 1)
    if not is_run_dir(spec) and weights is None:
        if Path(spec).exists():
            raise UsageError(f"{spec} is not a kdcli run directory (no model.json)")
        if "/" in spec or os.sep in spec or spec.startswith("."):
            raise UsageError(f"--model {spec}: not found (no such run directory)")
        raise UsageError(
            f"--model {spec!r}: give a kdcli run directory, or MODEL@WEIGHTS for a built-in or file.py:factory model"
        )
    return build_model(spec, None, num_classes=num_classes, input_shape=input_shape, weights=weights)


@torch.inference_mode()
def batched_logits(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int,
    device: torch.device,
    times: list[float] | None = None,
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(n, C) float32 logits on the CPU; ``times`` (if given) gets the seconds of each full ``batch_size`` batch,
    ``advance`` (if given) the rows of each batch (progress)."""
    out = []
    for a in range(0, len(x), batch_size):
        t0 = time.perf_counter()
        out.append(model(x[a : a + batch_size].to(device)).float().cpu())
        if times is not None and len(out[-1]) == batch_size:
            times.append(time.perf_counter() - t0)
        if advance is not None:
            advance(len(out[-1]))
    return torch.cat(out)


class ClassifyEvalJob(EvalJob):
    """The eval data (and the teacher's targets from the cache) prepared once; every --model measured the same way:
    accuracy/F1/NLL/ECE, agreement and KL to the teacher, the optional class bias, size and latency."""

    def __init__(self, cfg: EvalConfig, device: torch.device, reader: CacheReader | None):
        self.cfg, self.device = cfg, device
        widths = {teacher_num_classes(m.rsplit("@", 1)[0] if "@" in m else m) for m in cfg.model} - {None}
        if len(widths) > 1:
            raise UsageError(f"the models output different numbers of classes: {sorted(widths)}")
        num_classes = reader.num_classes if reader else (widths.pop() if widths else None)
        self.data = data = load_data(cfg.data, num_classes=num_classes)
        self.targets = None
        if reader is not None:
            reader.check_data(data.identity())
            rows = reader.read_rows(0, data.n)  # view 0 of every sample
            if not np.array_equal(rows["sample_index"], np.arange(data.n)) or not np.array_equal(
                rows["row_hash"], data.row_hash
            ):
                raise CacheError(f"cache {reader.dir} rows do not line up with {cfg.data}")
            self.targets = reader.targets(rows)
        self.bias_spec = parse_class_bias(cfg.class_bias, data.num_classes)
        self.fit_classes = [c for c, b in self.bias_spec.items() if b == "fit"]
        if cfg.bias_data and not self.fit_classes:
            raise UsageError("--bias-data is only used to fit --class-bias CLASS=fit; add one or drop --bias-data")
        self.fit_data = data
        if self.fit_classes and cfg.bias_data:
            self.fit_data = load_data(cfg.bias_data, num_classes=data.num_classes)
            if self.fit_data.input_shape != data.input_shape:
                raise UsageError(
                    f"--bias-data {cfg.bias_data} has input shape {self.fit_data.input_shape}, --data "
                    f"{data.input_shape}"
                )
        elif self.fit_classes:
            log.warn(
                "--class-bias CLASS=fit chooses the bias on the evaluation data itself (as Hinton et al. did), "
                "so the corrected numbers are optimistic; pass --bias-data DATA to choose it on held-out rows"
            )

    @property
    def num_rows(self) -> int:
        return self.data.n

    def measure(self, spec: str) -> ModelReport:
        cfg, data, device = self.cfg, self.data, self.device
        lat_batch = min(cfg.batch_size, data.n)
        model, info = load_eval_model(spec, data.num_classes, data.input_shape)
        model.to(device).eval()
        t0 = time.perf_counter()
        pass_times: list[float] = []
        logits = batched_logits(model, data.x, lat_batch, device, pass_times, self.advance)  # (n, C)
        secs = time.perf_counter() - t0
        files = spec if is_run_dir(spec) else spec.rsplit("@", 1)[1]  # a run dir, or MODEL@WEIGHTS's file
        stats = size_and_speed(
            model, files, data.x[:lat_batch], lat_batch, cfg.latency_repeats, pass_times=pass_times[1:], warm=True
        )
        applied = before = None
        if self.bias_spec:
            applied = {c: b for c, b in self.bias_spec.items() if b != "fit"}
            fit_data = self.fit_data
            fit_logits = logits if fit_data is data else batched_logits(model, fit_data.x, cfg.batch_size, device)
            for _ in range(3 if len(self.fit_classes) > 1 else 1):  # coordinate descent when several are fitted
                for c in self.fit_classes:
                    rest = {k: v for k, v in applied.items() if k != c}
                    applied[c] = fit_class_bias(apply_class_bias(fit_logits, rest), fit_data.y, c)
            for c in self.fit_classes:
                log.info(f"{spec}: class {c} bias {applied[c]:+.2f} (fewest errors on {fit_data.spec})")
            plain = classification_metrics(logits, data.y, data.num_classes)
            before = {k: plain[k] for k in ("errors", "accuracy", "nll", "per_class_errors")}
            logits = apply_class_bias(logits, applied)
        m = classification_metrics(logits, data.y, data.num_classes)
        agreement = kl = None
        if self.targets is not None:
            agreement = float((logits.argmax(1) == self.targets.top1()).float().mean())
            kl = float(soft_kl(logits, self.targets, cfg.temperature, approximate=cfg.approximate_temperature).mean())
        return ModelReport(
            model=spec,
            num_samples=data.n,
            agreement=agreement,
            kl_to_teacher=kl,
            num_parameters=info.num_parameters,
            weight_bytes=weight_bytes(model),
            samples_per_second=data.n / max(secs, 1e-9),
            before_bias=before,
            class_bias=None if applied is None else {str(c): applied[c] for c in sorted(applied)},
            **m,
            **stats,
        )

    def report(self, models: list[ModelReport]) -> EvalReport:
        data, cfg = self.data, self.cfg
        return EvalReport(
            data=cfg.data,
            cache=cache_label(cfg),
            temperature=cfg.temperature,
            models=models,
            failures=[],
            class_counts=torch.bincount(data.y, minlength=data.num_classes).tolist(),
            bias_data=(self.fit_data.spec if self.fit_classes else None),
        )


# -- the task ------------------------------------------------------------------------------------------------------


class ClassifyTask(Task):
    name = "classification"
    builtin_models = tuple(BUILTINS)

    def cache_job(self, cfg) -> ClassifyCacheJob:
        return ClassifyCacheJob(cfg, cache_mode(cfg))

    def open_cache(self, cache_dir: str) -> CacheReader:
        reader = CacheReader(cache_dir)
        if reader.manifest.get("kind", "classification") != "classification":
            raise CacheError(
                f"cache {reader.dir} is a token-level (language-model) cache; use it with the .jsonl "
                "(or Parquet) text it was built from"
            )
        return reader

    def train_job(self, cfg, alpha, reader) -> ClassifyTrainJob:
        return ClassifyTrainJob(cfg, alpha, reader)

    def eval_job(self, cfg: EvalConfig, device: torch.device, reader: CacheReader | None) -> ClassifyEvalJob:
        return ClassifyEvalJob(cfg, device, reader)
