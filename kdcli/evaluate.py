"""evaluate(cfg): models + data (+ cache) -> metrics against the labels and against the cached teacher.

The teacher is never re-run: agreement and KL come from the cache's view-0 rows, which must match the data
(fingerprint and per-row hashes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcli import log
from kdcli.cache.reader import CacheReader
from kdcli.config import EvalConfig
from kdcli.data import load_data
from kdcli.errors import CacheError, UsageError
from kdcli.losses import soft_kl, targets_from_arrays
from kdcli.models import build_model, is_run_dir, resolve_device
from kdcli.teacher import teacher_num_classes

ECE_BINS = 15


@dataclass
class ModelReport:
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
    cache: str | None
    temperature: float
    models: list[ModelReport]
    failures: list[str]
    class_counts: list[int] = field(default_factory=list)  # rows of each class in the data
    bias_data: str | None = None  # where CLASS=fit biases were chosen


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
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
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
    return {"accuracy": float(correct.float().mean()), "errors": int((~correct).sum()),
            "per_class_errors": (cm.sum(1) - cm.diag()).tolist(),
            "precision_macro": float(precision[present].mean()), "recall_macro": float(recall[present].mean()),
            "f1_macro": float(f1[present].mean()), "nll": float(F.cross_entropy(logits, y)), "ece": ece,
            "reliability": reliability}


BIAS_GRID = torch.arange(-30.0, 30.0 + 1e-6, 0.05)  # candidate values for CLASS=fit


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
        raise UsageError(f"--class-bias {c}=fit: the fitting data has no rows of class {c}; pass --bias-data with "
                         "labelled rows of that class")
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


def _load_model(spec: str, num_classes: int | None, input_shape):
    """A run dir, or ``MODEL@WEIGHTS`` for a built-in/plugin model with a weights file."""
    weights = None
    if not is_run_dir(spec) and "@" in spec:
        spec, weights = spec.rsplit("@", 1)
    if not is_run_dir(spec) and weights is None:
        if Path(spec).exists():
            raise UsageError(f"{spec} is not a kdcli run directory (no model.json)")
        raise UsageError(f"--model {spec!r}: give a kdcli run directory, or MODEL@WEIGHTS for a built-in or "
                         "file.py:factory model")
    return build_model(spec, None, num_classes=num_classes, input_shape=input_shape, weights=weights)


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
    from kdcli.lm import is_text_spec

    if is_text_spec(cfg.data):  # JSONL text: language-model metrics
        if cfg.class_bias or cfg.bias_data:
            raise UsageError("--class-bias/--bias-data apply to classification data, not JSONL text")
        from kdcli.lm.evaluate import evaluate_lm

        return evaluate_lm(cfg)
    device = resolve_device(cfg.device)
    widths = {teacher_num_classes(m.rsplit("@", 1)[0] if "@" in m else m) for m in cfg.model} - {None}
    if len(widths) > 1:
        raise UsageError(f"the models output different numbers of classes: {sorted(widths)}")
    reader = CacheReader(cfg.cache) if cfg.cache else None
    num_classes = reader.num_classes if reader else (widths.pop() if widths else None)
    data = load_data(cfg.data, num_classes=num_classes)
    targets = None
    if reader is not None:
        reader.check_data(data.identity())
        rows = reader.read_rows(0, data.n)  # view 0 of every sample
        if not np.array_equal(rows["sample_index"], np.arange(data.n)) or not np.array_equal(
                rows["row_hash"], data.row_hash):
            raise CacheError(f"cache {cfg.cache} rows do not line up with {cfg.data}")
        targets = targets_from_arrays(rows, reader.mode, reader.num_classes)
    if cfg.min_agreement is not None and reader is None:
        raise UsageError("--min-agreement needs --cache (the teacher's outputs)")
    bias_spec = parse_class_bias(cfg.class_bias, data.num_classes)
    fit_classes = [c for c, b in bias_spec.items() if b == "fit"]
    if cfg.bias_data and not fit_classes:
        raise UsageError("--bias-data is only used to fit --class-bias CLASS=fit; add one or drop --bias-data")
    fit_data = data
    if fit_classes and cfg.bias_data:
        fit_data = load_data(cfg.bias_data, num_classes=data.num_classes)
        if fit_data.input_shape != data.input_shape:
            raise UsageError(f"--bias-data {cfg.bias_data} has input shape {fit_data.input_shape}, --data "
                             f"{data.input_shape}")
    elif fit_classes:
        log.warn("--class-bias CLASS=fit chooses the bias on the evaluation data itself (as Hinton et al. did), "
                 "so the corrected numbers are optimistic; pass --bias-data DATA to choose it on held-out rows")
    reports = []
    for spec in cfg.model:
        model, info = _load_model(spec, data.num_classes, data.input_shape)
        model.to(device).eval()
        t0 = time.perf_counter()
        logits = _logits(model, data.x, cfg.batch_size, device)  # (n, C)
        secs = time.perf_counter() - t0
        applied = before = None
        if bias_spec:
            applied = {c: b for c, b in bias_spec.items() if b != "fit"}
            fit_logits = logits if fit_data is data else _logits(model, fit_data.x, cfg.batch_size, device)
            for _ in range(3 if len(fit_classes) > 1 else 1):  # coordinate descent when several are fitted
                for c in fit_classes:
                    rest = {k: v for k, v in applied.items() if k != c}
                    applied[c] = fit_class_bias(apply_class_bias(fit_logits, rest), fit_data.y, c)
            for c in fit_classes:
                log.info(f"{spec}: class {c} bias {applied[c]:+.2f} (fewest errors on {fit_data.spec})")
            plain = classification_metrics(logits, data.y, data.num_classes)
            before = {k: plain[k] for k in ("errors", "accuracy", "nll", "per_class_errors")}
            logits = apply_class_bias(logits, applied)
        m = classification_metrics(logits, data.y, data.num_classes)
        agreement = kl = None
        if targets is not None:
            agreement = float((logits.argmax(1) == targets.top1()).float().mean())
            kl = float(soft_kl(logits, targets, cfg.temperature).mean())
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        reports.append(ModelReport(model=spec, num_samples=data.n, agreement=agreement, kl_to_teacher=kl,
                                   num_parameters=info.num_parameters, weight_bytes=weight_bytes,
                                   samples_per_second=data.n / max(secs, 1e-9), before_bias=before,
                                   class_bias=None if applied is None else {str(c): applied[c] for c in sorted(applied)},
                                   **m))
    return EvalReport(data=cfg.data, cache=cfg.cache, temperature=cfg.temperature, models=reports,
                      failures=threshold_failures(reports, cfg),
                      class_counts=torch.bincount(data.y, minlength=data.num_classes).tolist(),
                      bias_data=(fit_data.spec if fit_classes else None))


@torch.inference_mode()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """(n, C) float32 logits on the CPU."""
    return torch.cat([model(x[a:a + batch_size].to(device)).float().cpu() for a in range(0, len(x), batch_size)])
